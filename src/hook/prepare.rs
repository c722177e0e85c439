//! `prepare`: validate everything, then build the cache, make the instance, start the server;
//! undo what this run made if a step fails.

use super::confine::{exists, remove_regular};
use super::log::HookLog;
use super::owner::claim;
use super::plan::DiskPlan;
use super::server::{start_server, stop_server};
use crate::chain::build::BuildOptions;
use crate::chain::build::{build_cache, cache_meta, make_instance, require_base_matches};
use crate::chain::serve::backing_path;
use crate::config::{Config, DiskMode, OnBaseChange, ResolvedImage};
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheState;
use crate::{Error, Result};
use std::fs::{File, OpenOptions as FsOpen};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What a failed prepare must undo.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    servers: Vec<DiskPlan>,
}

pub(super) fn prepare(cfg: &Config, plans: &[DiskPlan], log: &HookLog) -> Result<()> {
    // Everything that can be checked without changing anything, for every disk, first.
    for p in plans {
        p.owner()?;
        let img = p.image()?;
        let cache = p.cache.as_ref().expect("resolved");
        // A sealed cache needs nothing of its base (a storage node may be down): what it
        // recorded of the base is compared below without reading it.
        let sealed = if exists(cache) {
            Image::open(cache, &OpenOptions::read_only())
                .ok()
                .and_then(|c| cache_meta(&c).ok().flatten())
                .is_some_and(|m| m.state == CacheState::Sealed)
        } else {
            // One the hoard holds comes sealed.
            cfg.dirs
                .hoard
                .as_ref()
                .is_some_and(|h| matches!(in_hoard(&h.0, img), Ok(Some(_))))
        };
        if !sealed {
            let m =
                std::fs::metadata(&img.base).map_err(|e| Error::io(&img.base, "base image", e))?;
            if !m.is_file() && !m.file_type().is_block_device() {
                return Err(Error::refused(&img.base, "base image is not a file"));
            }
        }
        if exists(cache) && cfg.on_base_change == OnBaseChange::Refuse {
            let c = Image::open(cache, &OpenOptions::read_only())?;
            require_base_matches(&c).map_err(|e| {
                Error::refused(
                    cache,
                    format!(
                        "{}; refusing to start (on_base_change: refuse)",
                        strip_path(&e, cache)
                    ),
                )
            })?;
        }
        if exists(&p.instance) && !p.ephemeral() && exists(cache) {
            check_instance_over(&p.instance, cache)?;
        }
        if let Some(s) = &p.socket {
            if let Ok(m) = std::fs::symlink_metadata(s) {
                if !m.file_type().is_socket() {
                    return Err(Error::refused(s, "refused: exists and is not a socket"));
                }
            }
        }
    }
    let mut undo = Undo::default();
    let r = prepare_disks(cfg, plans, log, &mut undo);
    if let Err(e) = &r {
        if undo.files.is_empty() && undo.servers.is_empty() {
            return r;
        }
        for s in &undo.servers {
            let _ = stop_server(s, log);
        }
        for f in undo.files.iter().rev() {
            let _ = remove_regular(f);
        }
        log.line(&format!("prepare failed, undone: {e}"));
    }
    r
}

fn prepare_disks(cfg: &Config, plans: &[DiskPlan], log: &HookLog, undo: &mut Undo) -> Result<()> {
    for p in plans {
        let img = p.image()?;
        let cache = p.cache.as_ref().expect("resolved");
        // The instance's owner record first (O_EXCL: of guests racing for one name, one wins).
        if let Some(rec) = claim(&p.instance, &p.guest)? {
            if exists(&p.instance) {
                log.line(&format!(
                    "{}: adopted instance {} (owner record {})",
                    p.dev,
                    p.instance.display(),
                    rec.display()
                ));
            } else {
                undo.files.push(rec);
            }
        }
        let state = ensure_cache(cfg, p, img, log, undo)?;
        if exists(&p.instance) && p.ephemeral() {
            // A leftover of a run whose release did not happen.
            stop_server(p, log)?;
            remove_regular(&p.instance)?;
            log.line(&format!(
                "{}: removed leftover ephemeral instance {}",
                p.dev,
                p.instance.display()
            ));
        }
        if exists(&p.instance) {
            check_instance_over(&p.instance, cache)?;
        } else {
            make_instance(
                cache,
                &p.instance,
                crate::chain::build::INSTANCE_CLUSTER_SIZE,
            )?;
            undo.files.push(p.instance.clone());
            log.line(&format!(
                "{}: created instance {}",
                p.dev,
                p.instance.display()
            ));
        }
        if p.mode == DiskMode::Nbd {
            stop_server(p, log)?;
            let record = (img.settings.record && state != CacheState::Sealed)
                .then(|| p.trace.clone())
                .flatten();
            start_server(cfg, p, record.as_deref(), log)?;
            undo.servers.push(p.clone());
        }
    }
    Ok(())
}

/// A library error's text without its leading `PATH: ` (when it names `path`).
fn strip_path(e: &Error, path: &Path) -> String {
    let s = e.to_string();
    let pre = format!("{}: ", path.display());
    s.strip_prefix(&pre).map(str::to_string).unwrap_or(s)
}

/// Refuse an existing instance that does not stand on `cache`.
fn check_instance_over(instance: &Path, cache: &Path) -> Result<()> {
    let b = backing_path(instance)?;
    let same = match (std::fs::canonicalize(&b), std::fs::canonicalize(cache)) {
        (Ok(a), Ok(c)) => a == c,
        _ => false,
    };
    if !same {
        return Err(Error::refused(
            instance,
            format!(
                "refused: existing instance stands on {}, not on the cache {}",
                b.display(),
                cache.display()
            ),
        ));
    }
    Ok(())
}

/// Make sure the cache exists and matches its base; returns its state. Exactly one hook builds
/// a missing cache (an flock on `CACHES/.NAME.lock`); the others wait and use it. A cache is
/// built under a temporary name and renamed, so nobody sees half a cache.
fn ensure_cache(
    cfg: &Config,
    p: &DiskPlan,
    img: &ResolvedImage,
    log: &HookLog,
    undo: &mut Undo,
) -> Result<CacheState> {
    let cache = p.cache.as_ref().expect("resolved");
    let opts = BuildOptions {
        cluster_size: img.settings.cluster_size,
        quota: img.settings.quota,
        base_format: None,
    };
    if !exists(cache) {
        let _lock = lock_file(p.lock.as_ref().expect("resolved"))?;
        if !exists(cache) {
            if let Some(h) = &cfg.dirs.hoard {
                // The hoard is a shortcut: when it fails, the cache is built as before.
                match from_hoard(&h.0, img, cache) {
                    Ok(Some((name, gen))) => {
                        undo.files.push(cache.clone());
                        log.line(&format!(
                            "{}: took cache {} from the hoard ('{name}', generation {gen}): no first boot here",
                            p.dev,
                            cache.display()
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => log.line(&format!(
                        "{}: the hoard's cache of {} could not be taken ({e}); building one",
                        p.dev,
                        img.base.display()
                    )),
                }
            }
        }
        if !exists(cache) {
            build_into(&img.base, cache, &opts)?;
            undo.files.push(cache.clone());
            log.line(&format!(
                "{}: built cache {} over {}",
                p.dev,
                cache.display(),
                img.base.display()
            ));
        }
    }
    let c = Image::open(cache, &OpenOptions::read_only())?;
    if let Err(e) = require_base_matches(&c) {
        drop(c);
        if cfg.on_base_change == OnBaseChange::Refuse {
            return Err(Error::refused(
                cache,
                format!(
                    "{}; refusing to start (on_base_change: refuse)",
                    strip_path(&e, cache)
                ),
            ));
        }
        let _lock = lock_file(p.lock.as_ref().expect("resolved"))?;
        let still = Image::open(cache, &OpenOptions::read_only())
            .and_then(|c| require_base_matches(&c))
            .is_err();
        if still {
            if exists(&p.instance) && !p.ephemeral() {
                return Err(Error::refused(
                    &p.instance,
                    "refused: the base changed and this persistent instance stands on the old cache; remove it to start over",
                ));
            }
            build_into(&img.base, cache, &opts)?;
            log.line(&format!(
                "{}: base changed ({}); rebuilt cache {}",
                p.dev,
                strip_path(&e, cache),
                cache.display()
            ));
        }
    }
    let c = Image::open(cache, &OpenOptions::read_only())?;
    Ok(cache_meta(&c)?
        .map(|m| m.state)
        .unwrap_or(CacheState::Sealed))
}

/// The hoarded cache of `img`'s base, checked out to `cache` (at a temporary name, renamed
/// into place): the one named as the image when it stands on this base, else the first that
/// does. None when the hoard holds none (the hook then builds and records as before).
fn from_hoard(dir: &Path, img: &ResolvedImage, cache: &Path) -> Result<Option<(String, u64)>> {
    let Some((h, name, gen)) = in_hoard(dir, img)? else {
        return Ok(None);
    };
    into_place(cache, "hoard", |tmp| {
        let tmp_trace = crate::hoard::checkout::trace_path(tmp);
        let _ = remove_regular(&tmp_trace);
        // Without waiting: a sync or gc at work means building here, not holding up the start.
        let r = crate::hoard::checkout::checkout_with(&h, &name, tmp, None, false).and_then(|_| {
            // Recorded over this very base (not another one at the same path)?
            let c = Image::open(tmp, &OpenOptions::read_only())?;
            require_base_matches(&c)
        });
        let _ = remove_regular(&tmp_trace);
        r
    })?;
    Ok(Some((name, gen)))
}

/// The hoard at `dir`, the name of its cache over `img`'s base and the hoard's generation;
/// None when it holds none.
fn in_hoard(dir: &Path, img: &ResolvedImage) -> Result<Option<(crate::hoard::Hoard, String, u64)>> {
    let h = crate::hoard::Hoard::open(dir)?;
    let Some((_, g)) = h.head()? else {
        return Ok(None);
    };
    let caches = g.indexes()?;
    let base = img.base.to_string_lossy();
    // The one named as the image first, then the others (each index read once).
    let mut names: Vec<(&String, &[u8; 32])> = caches.iter().collect();
    names.sort_by_key(|(n, _)| **n != img.name);
    for (name, id) in names {
        if h.stored_index(id)
            .is_ok_and(|i| i.backing_file.as_deref() == Some(&*base))
        {
            return Ok(Some((h, name.clone(), g.generation)));
        }
    }
    Ok(None)
}

/// Build a cache at a temporary name beside `cache` and rename it into place.
fn build_into(base: &Path, cache: &Path, opts: &BuildOptions) -> Result<()> {
    into_place(cache, "tmp", |tmp| build_cache(base, tmp, opts).map(|_| ()))
}

/// Make `cache` with `make` at a temporary name beside it (`.FILE.TAGPID`), and rename it
/// into place; the temporary file goes when anything fails.
fn into_place(cache: &Path, tag: &str, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = cache.with_file_name(format!(
        ".{}.{tag}{}",
        cache.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = remove_regular(&tmp);
    if let Err(e) = make(&tmp) {
        let _ = remove_regular(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, cache).map_err(|e| {
        let _ = remove_regular(&tmp);
        Error::io(cache, "rename", e)
    })
}

/// An exclusive flock on `path` (created 0600, never through a link), held while the value
/// lives.
fn lock_file(path: &Path) -> Result<nix::fcntl::Flock<File>> {
    let f = FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(path, "open lock", e))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(path, "lock", e.into()))
}
