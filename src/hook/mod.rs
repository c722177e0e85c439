//! The libvirt qemu hook (<https://libvirt.org/hooks.html>): `vmicache hook GUEST OP SUBOP
//! EXTRA` with the domain XML on stdin, installed as `/etc/libvirt/hooks/qemu`.
//!
//! Which disks are managed is declared in the domain's `<metadata>`:
//!
//! ```xml
//! <metadata>
//!   <vmicache:disks xmlns:vmicache="https://vmicache.dev/ns/1">
//!     <vmicache:disk dev="vda" base="debian" mode="nbd"/>
//!   </vmicache:disks>
//! </metadata>
//! ```
//!
//! and the `<disk>` with that target dev names the instance overlay (native mode: a qcow2
//! `<source file=.../>`, QEMU opens instance → cache → base) or the NBD socket (NBD mode:
//! `<source protocol="nbd" name="EXPORT"><host transport="unix" socket="..."/></source>`, a
//! `vmicache serve` daemon the hook starts exports the instance, filling an unsealed cache by
//! copy-on-read).
//!
//! The hook runs as root on XML whoever may define domains controls. Every path it creates,
//! writes or deletes lies inside a directory of the configuration ([`confine`]): absolute, no
//! `.`/`..`, the parent resolved through symlinks must stay inside, the final component must
//! not be a symlink, and files are created with `O_EXCL`/`O_NOFOLLOW`. Anything else is
//! refused with one line before anything is changed; a failure half-way through `prepare`
//! removes what this run made. An instance belongs to the guest it was made for (`owner.rs`):
//! another guest's XML naming it is refused. Servers are signalled only if their pid file's
//! start time and executable match (`proc.rs`), and log lines escape control characters
//! ([`escape`]).
//!
//! It never calls back into libvirt, and its servers are detached (`setsid`, output to a log
//! file in the state directory, a pid file), so libvirt does not wait for them.

mod confine;
mod log;
mod owner;
mod plan;
mod prepare;
mod proc;
mod server;
mod xml;

pub use confine::confine;
pub use log::escape;
pub use owner::Owner;
pub use plan::{plan, DiskPlan};
pub use xml::{parse_domain, Domain, ManagedDisk, Source, NS};

use crate::chain::build::cache_meta;
use crate::config::{Config, DiskMode};
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheState;
use crate::{Error, Result};
use confine::{exists, remove_regular};
use log::HookLog;
use prepare::prepare;
use server::{running, seal_after_recording, start_server, stop_server, Server};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

/// What the hook printed for libvirt: `Some(xml)` for the XML filters (migrate, restore).
pub type Output = Option<String>;

/// Run the hook for `guest`'s operation `op` with the domain XML `xml`. The configuration is
/// loaded only when the domain has managed disks, so a broken configuration never stops other
/// domains.
pub fn run(
    guest: &str,
    op: &str,
    xml: &str,
    load: impl FnOnce() -> Result<Config>,
) -> Result<Output> {
    let filter = matches!(op, "migrate" | "restore");
    let acts = matches!(
        op,
        "prepare" | "release" | "stopped" | "reconnect" | "migrate" | "restore"
    );
    if !acts {
        return Ok(None);
    }
    let dom = parse_domain(xml)?;
    if dom.disks.is_empty() {
        return Ok(filter.then(|| xml.to_string()));
    }
    let cfg = load()?;
    ensure_dirs(&cfg)?;
    let plans = plan(&cfg, guest, &dom)?;
    if op != "release" && op != "stopped" {
        // Another guest's instance: refused before anything changes. (release and stopped
        // still stop this guest's own servers, and then refuse.)
        for p in &plans {
            p.owner()?;
        }
    }
    let log = HookLog::open(
        confine(
            &cfg.dirs.state.0.join("hook.log"),
            &cfg.dirs.state.0,
            "state",
        )
        .ok(),
    );
    match op {
        "prepare" => prepare(&cfg, &plans, &log).map(|_| None),
        "release" | "stopped" => release(&plans, op == "release", &log).map(|_| None),
        "reconnect" => reconnect(&cfg, &plans, &log).map(|_| None),
        // The paths lie in the configured directories, which the destination (or the restoring
        // host) configures alike: the XML stays valid as it is.
        _ => Ok(Some(xml.to_string())),
    }
}

/// Create the configured directories that are missing (0755, root's), and refuse
/// world-writable ones (anybody could plant links there).
pub fn ensure_dirs(cfg: &Config) -> Result<()> {
    let d = &cfg.dirs;
    for dir in [&d.caches, &d.instances, &d.traces, &d.sockets, &d.state] {
        let p = &dir.0;
        if !exists(p) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(p)
                .map_err(|e| Error::io(p, "create directory", e))?;
        }
        let m = std::fs::metadata(p).map_err(|e| Error::io(p, "stat", e))?;
        if !m.is_dir() {
            return Err(Error::refused(p, "configured directory is not a directory"));
        }
        if m.permissions().mode() & 0o002 != 0 {
            return Err(Error::refused(
                p,
                "refused: configured directory is writable by every user",
            ));
        }
    }
    Ok(())
}

fn release(plans: &[DiskPlan], remove: bool, log: &HookLog) -> Result<()> {
    let mut first_err = None;
    for p in plans {
        if let Err(e) = p.owner() {
            // Not this guest's instance: stop this guest's own server if it has one (its pid
            // file is named after the guest), touch nothing else.
            if p.mode == DiskMode::Nbd {
                if let Err(e) = stop_server(p, log) {
                    first_err.get_or_insert(e);
                }
            }
            first_err.get_or_insert(e);
            continue;
        }
        if p.mode == DiskMode::Nbd {
            if let Err(e) = stop_server(p, log) {
                first_err.get_or_insert(e);
                continue;
            }
            // The recorded first boot is over: seal its cache, so later boots share it
            // read-only and never touch the base.
            if let Err(e) = seal_after_recording(p, log) {
                first_err.get_or_insert(e);
            }
        }
        if remove && p.ephemeral() && exists(&p.instance) {
            match remove_regular(&p.instance) {
                Ok(()) => log.line(&format!(
                    "{}: removed ephemeral instance {}",
                    p.dev,
                    p.instance.display()
                )),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn reconnect(cfg: &Config, plans: &[DiskPlan], log: &HookLog) -> Result<()> {
    server::start_hoard_sync(cfg, log);
    for p in plans.iter().filter(|p| p.mode == DiskMode::Nbd) {
        if matches!(running(p)?, Server::Ours(_)) {
            continue;
        }
        if !exists(&p.instance) {
            return Err(Error::refused(
                &p.instance,
                "instance of a running domain is missing; cannot restart its server",
            ));
        }
        let img = p.image()?;
        let cache = p.cache.as_ref().expect("resolved");
        let c = Image::open(cache, &OpenOptions::read_only())?;
        let state = cache_meta(&c)?
            .map(|m| m.state)
            .unwrap_or(CacheState::Sealed);
        drop(c);
        let record = (img.settings.record && state != CacheState::Sealed)
            .then(|| p.trace.clone())
            .flatten();
        log.line(&format!("{}: server was not running; restarting it", p.dev));
        start_server(cfg, p, record.as_deref(), log)?;
    }
    Ok(())
}
