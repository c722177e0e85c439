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
//! removes what this run made.
//!
//! It never calls back into libvirt, and its servers are detached (`setsid`, output to a log
//! file in the state directory, a pid file), so libvirt does not wait for them.

use crate::chain::build::BuildOptions;
use crate::chain::build::{build_cache, cache_meta, make_instance, require_base_matches};
use crate::chain::serve::backing_path;
use crate::config::{safe_name, Config, DiskMode, OnBaseChange, ResolvedImage};
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheState;
use crate::{Error, Result};
use std::fs::{File, OpenOptions as FsOpen};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The XML namespace of the `<metadata>` element.
pub const NS: &str = "https://vmicache.dev/ns/1";

/// A managed disk as the domain XML declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedDisk {
    /// Target dev (`vda`).
    pub dev: String,
    /// `base=`: an image name of the configuration or an absolute path.
    pub base: String,
    /// `mode=` if given.
    pub mode: Option<DiskMode>,
    /// `instance=` (NBD mode only; default `INSTANCES/GUEST.DEV.qcow2`).
    pub instance: Option<PathBuf>,
    /// The `<disk>`'s source.
    pub source: Source,
}

/// Where QEMU reads a managed disk from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `<disk type='file'>`: the instance overlay itself.
    File { path: PathBuf },
    /// `<disk type='network'>` NBD over a Unix socket.
    Nbd { socket: PathBuf, export: String },
}

/// What the hook needs from a domain XML.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub disks: Vec<ManagedDisk>,
}

/// The first child element `name` of `n` in no namespace.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

fn xml_err(what: impl Into<String>) -> Error {
    Error::request("domain XML", what)
}

/// Parse a domain XML (as `virsh dumpxml` prints it) and find the managed disks.
pub fn parse_domain(xml: &str) -> Result<Domain> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| xml_err(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(xml_err(format!(
            "root element is <{}>, expected <domain>",
            root.tag_name().name()
        )));
    }
    let name = child(root, "name")
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut decls = Vec::new();
    if let Some(meta) = child(root, "metadata") {
        for group in meta
            .children()
            .filter(|c| c.is_element() && c.tag_name().namespace() == Some(NS))
        {
            if group.tag_name().name() != "disks" {
                return Err(xml_err(format!(
                    "unknown element <{}> in the vmicache namespace (expected <disks>)",
                    group.tag_name().name()
                )));
            }
            for d in group.children().filter(|c| c.is_element()) {
                if d.tag_name().namespace() != Some(NS) || d.tag_name().name() != "disk" {
                    return Err(xml_err(format!(
                        "unexpected <{}> in <vmicache:disks> (expected <vmicache:disk>)",
                        d.tag_name().name()
                    )));
                }
                for a in d.attributes() {
                    if !["dev", "base", "mode", "instance"].contains(&a.name()) {
                        return Err(xml_err(format!(
                            "<vmicache:disk>: unknown attribute '{}' (dev, base, mode, instance)",
                            a.name()
                        )));
                    }
                }
                let dev = d
                    .attribute("dev")
                    .ok_or_else(|| xml_err("<vmicache:disk> without dev="))?;
                let base = d
                    .attribute("base")
                    .ok_or_else(|| xml_err(format!("<vmicache:disk dev='{dev}'> without base=")))?;
                let mode = match d.attribute("mode") {
                    None => None,
                    Some("nbd") => Some(DiskMode::Nbd),
                    Some("native") => Some(DiskMode::Native),
                    Some(m) => {
                        return Err(xml_err(format!(
                            "<vmicache:disk dev='{dev}'>: mode '{m}' (nbd or native)"
                        )))
                    }
                };
                if decls.iter().any(|(d2, ..): &(String, _, _, _)| d2 == dev) {
                    return Err(xml_err(format!(
                        "disk '{dev}' declared twice in <vmicache:disks>"
                    )));
                }
                decls.push((
                    dev.to_string(),
                    base.to_string(),
                    mode,
                    d.attribute("instance").map(PathBuf::from),
                ));
            }
        }
    }
    let mut disks = Vec::new();
    if decls.is_empty() {
        return Ok(Domain { name, disks });
    }
    let devices = child(root, "devices").ok_or_else(|| xml_err("no <devices>"))?;
    for (dev, base, mode, instance) in decls {
        let disk = devices
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "disk")
            .find(|d| child(*d, "target").and_then(|t| t.attribute("dev")) == Some(dev.as_str()))
            .ok_or_else(|| {
                xml_err(format!(
                    "<vmicache:disk dev='{dev}'>: no <disk> with <target dev='{dev}'/>"
                ))
            })?;
        let src =
            child(disk, "source").ok_or_else(|| xml_err(format!("disk '{dev}': no <source>")))?;
        let driver = child(disk, "driver").and_then(|d| d.attribute("type"));
        let source = match disk.attribute("type") {
            Some("file") => {
                if let Some(t) = driver.filter(|t| *t != "qcow2") {
                    return Err(xml_err(format!(
                        "disk '{dev}': <driver type='{t}'/>: a vmicache instance is qcow2"
                    )));
                }
                let f = src
                    .attribute("file")
                    .ok_or_else(|| xml_err(format!("disk '{dev}': <source> without file=")))?;
                Source::File {
                    path: PathBuf::from(f),
                }
            }
            Some("network") => {
                if src.attribute("protocol") != Some("nbd") {
                    return Err(xml_err(format!(
                        "disk '{dev}': network source protocol must be 'nbd'"
                    )));
                }
                if let Some(t) = driver.filter(|t| *t != "raw") {
                    return Err(xml_err(format!(
                        "disk '{dev}': <driver type='{t}'/>: an NBD export is raw"
                    )));
                }
                let host = child(src, "host").ok_or_else(|| {
                    xml_err(format!(
                        "disk '{dev}': NBD source without <host transport='unix'>"
                    ))
                })?;
                if host.attribute("transport") != Some("unix") {
                    return Err(xml_err(format!(
                        "disk '{dev}': NBD source must use <host transport='unix' socket='...'/>"
                    )));
                }
                let socket = host.attribute("socket").ok_or_else(|| {
                    xml_err(format!(
                        "disk '{dev}': <host transport='unix'> without socket="
                    ))
                })?;
                Source::Nbd {
                    socket: PathBuf::from(socket),
                    export: src.attribute("name").unwrap_or_default().to_string(),
                }
            }
            t => {
                return Err(xml_err(format!(
                    "disk '{dev}': type '{}' cannot be managed (file or network)",
                    t.unwrap_or("?")
                )))
            }
        };
        disks.push(ManagedDisk {
            dev,
            base,
            mode,
            instance,
            source,
        });
    }
    Ok(Domain { name, disks })
}

// ---------------------------------------------------------------------------------------------
// Paths confined to the configured directories
// ---------------------------------------------------------------------------------------------

/// The path the hook may create, write or delete for `p`, which must lie in `dir` (the
/// configuration's `what` directory): absolute, no `.`/`..`, its parent resolved through
/// symlinks still inside `dir` resolved, and its final component not a symlink. Returns the
/// resolved path.
pub fn confine(p: &Path, dir: &Path, what: &str) -> Result<PathBuf> {
    let refuse = |why: String| Error::request(p, format!("refused: {why}"));
    if !crate::config::lexically_clean(p) {
        return Err(refuse(
            "must be an absolute path without '.' or '..'".into(),
        ));
    }
    let name = p
        .file_name()
        .ok_or_else(|| refuse("names no file".into()))?;
    let real_dir =
        std::fs::canonicalize(dir).map_err(|e| Error::io(dir, "configured directory", e))?;
    let parent = p.parent().unwrap_or(Path::new("/"));
    let real_parent = std::fs::canonicalize(parent).map_err(|e| Error::io(parent, "resolve", e))?;
    if !real_parent.starts_with(&real_dir) {
        return Err(refuse(format!(
            "outside the configured {what} directory {}",
            dir.display()
        )));
    }
    let real = real_parent.join(name);
    if let Ok(m) = std::fs::symlink_metadata(&real) {
        if m.file_type().is_symlink() {
            return Err(refuse("is a symbolic link".into()));
        }
    }
    Ok(real)
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Remove a regular file (never a link, never a directory).
fn remove_regular(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_file() => {
            std::fs::remove_file(p).map_err(|e| Error::io(p, "remove", e))
        }
        Ok(_) => Err(Error::request(p, "refused: not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, "stat", e)),
    }
}

/// Open for appending, creating with `mode`, never through a symlink.
fn open_append(p: &Path, mode: u32) -> Result<File> {
    FsOpen::new()
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(p)
        .map_err(|e| Error::io(p, "open", e))
}

// ---------------------------------------------------------------------------------------------
// The plan: every path of every managed disk, validated before anything changes
// ---------------------------------------------------------------------------------------------

/// One managed disk with every path the hook touches for it.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    pub dev: String,
    pub mode: DiskMode,
    /// The base's resolution (an error is reported where the base is needed: prepare).
    pub image: std::result::Result<ResolvedImage, String>,
    pub cache: Option<PathBuf>,
    pub lock: Option<PathBuf>,
    pub trace: Option<PathBuf>,
    pub instance: PathBuf,
    pub socket: Option<PathBuf>,
    pub export: String,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl DiskPlan {
    fn image(&self) -> Result<&ResolvedImage> {
        self.image
            .as_ref()
            .map_err(|e| Error::request(format!("disk {}", self.dev), e.clone()))
    }
    fn ephemeral(&self) -> bool {
        // A base that no longer resolves keeps its instances (never delete on doubt).
        self.image
            .as_ref()
            .map(|i| i.settings.ephemeral)
            .unwrap_or(false)
    }
}

/// Validate a domain's managed disks against the configuration and name every path.
pub fn plan(cfg: &Config, guest: &str, dom: &Domain) -> Result<Vec<DiskPlan>> {
    if !safe_name(guest) {
        return Err(Error::request(
            format!("domain '{guest}'"),
            "refused: a domain with vmicache disks needs a name of letters, digits and ._-+",
        ));
    }
    let d = &cfg.dirs;
    let mut out = Vec::new();
    for m in &dom.disks {
        if !safe_name(&m.dev) {
            return Err(xml_err(format!("refused: target dev '{}'", m.dev)));
        }
        let image = cfg.resolve_image(&m.base).map_err(|e| e.to_string());
        let source_mode = match m.source {
            Source::File { .. } => DiskMode::Native,
            Source::Nbd { .. } => DiskMode::Nbd,
        };
        let wanted = m
            .mode
            .or_else(|| image.as_ref().ok().and_then(|i| i.settings.mode));
        if let Some(w) = wanted {
            if w != source_mode {
                return Err(xml_err(format!(
                    "disk '{}': mode {w} is asked for, but its <disk> source is {}",
                    m.dev,
                    if source_mode == DiskMode::Nbd {
                        "an NBD socket (mode nbd)"
                    } else {
                        "a file (mode native)"
                    }
                )));
            }
        }
        let stem = format!("{guest}.{}", m.dev);
        let (instance, socket, export) = match &m.source {
            Source::File { path } => {
                if m.instance.is_some() {
                    return Err(xml_err(format!(
                        "disk '{}': instance= is for NBD disks; a file disk's <source file> is the instance",
                        m.dev
                    )));
                }
                (
                    confine(path, &d.instances.0, "instances")?,
                    None,
                    String::new(),
                )
            }
            Source::Nbd { socket, export } => {
                let inst = m
                    .instance
                    .clone()
                    .unwrap_or_else(|| d.instances.0.join(format!("{stem}.qcow2")));
                (
                    confine(&inst, &d.instances.0, "instances")?,
                    Some(confine(socket, &d.sockets.0, "sockets")?),
                    export.clone(),
                )
            }
        };
        let (cache, lock, trace) = match &image {
            Ok(i) => (
                Some(confine(
                    &d.caches.0.join(format!("{}.qcow2", i.name)),
                    &d.caches.0,
                    "caches",
                )?),
                Some(confine(
                    &d.caches.0.join(format!(".{}.lock", i.name)),
                    &d.caches.0,
                    "caches",
                )?),
                Some(confine(
                    &d.traces.0.join(format!("{}.trace", i.name)),
                    &d.traces.0,
                    "traces",
                )?),
            ),
            Err(_) => (None, None, None),
        };
        if out.iter().any(|p: &DiskPlan| p.instance == instance) {
            return Err(xml_err(format!(
                "refused: two disks use the instance {}",
                instance.display()
            )));
        }
        out.push(DiskPlan {
            dev: m.dev.clone(),
            mode: source_mode,
            image,
            cache,
            lock,
            trace,
            instance,
            socket,
            export,
            pid: confine(&d.state.0.join(format!("{stem}.pid")), &d.state.0, "state")?,
            log: confine(&d.state.0.join(format!("{stem}.log")), &d.state.0, "state")?,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Running the hook
// ---------------------------------------------------------------------------------------------

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
    let log = HookLog::open(&cfg);
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
            return Err(Error::request(p, "configured directory is not a directory"));
        }
        if m.permissions().mode() & 0o002 != 0 {
            return Err(Error::request(
                p,
                "refused: configured directory is writable by every user",
            ));
        }
    }
    Ok(())
}

use std::os::unix::fs::DirBuilderExt;

/// `STATE/hook.log`: one line per action, for the operator (opened at the first line, so a
/// refusal leaves the state directory as it was).
struct HookLog(Option<PathBuf>);

impl HookLog {
    fn open(cfg: &Config) -> HookLog {
        let p = cfg.dirs.state.0.join("hook.log");
        HookLog(confine(&p, &cfg.dirs.state.0, "state").ok())
    }
    fn line(&self, what: &str) {
        let Some(Ok(mut f)) = self.0.as_ref().map(|p| open_append(p, 0o640)) else {
            return;
        };
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let _ = writeln!(f, "{t} [{}] {what}", std::process::id());
    }
}

/// What a failed prepare must undo.
#[derive(Default)]
struct Undo {
    files: Vec<PathBuf>,
    servers: Vec<DiskPlan>,
}

fn prepare(cfg: &Config, plans: &[DiskPlan], log: &HookLog) -> Result<()> {
    // Everything that can be checked without changing anything, for every disk, first.
    for p in plans {
        let img = p.image()?;
        let m = std::fs::metadata(&img.base).map_err(|e| Error::io(&img.base, "base image", e))?;
        if !m.is_file() && !m.file_type().is_block_device() {
            return Err(Error::request(&img.base, "base image is not a file"));
        }
        let cache = p.cache.as_ref().expect("resolved");
        if exists(cache) && cfg.on_base_change == OnBaseChange::Refuse {
            let c = Image::open(cache, &OpenOptions::read_only())?;
            require_base_matches(&c).map_err(|e| {
                Error::request(
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
                    return Err(Error::request(s, "refused: exists and is not a socket"));
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
        return Err(Error::request(
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
            return Err(Error::request(
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
                return Err(Error::request(
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

/// Build a cache at a temporary name beside `cache` and rename it into place.
fn build_into(base: &Path, cache: &Path, opts: &BuildOptions) -> Result<()> {
    let tmp = cache.with_file_name(format!(
        ".{}.tmp{}",
        cache.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = remove_regular(&tmp);
    if let Err(e) = build_cache(base, &tmp, opts) {
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

fn release(plans: &[DiskPlan], remove: bool, log: &HookLog) -> Result<()> {
    let mut first_err = None;
    for p in plans {
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
    for p in plans.iter().filter(|p| p.mode == DiskMode::Nbd) {
        if running(p)?.is_some() {
            continue;
        }
        if !exists(&p.instance) {
            return Err(Error::request(
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

// ---------------------------------------------------------------------------------------------
// Servers: detached `vmicache serve` daemons with a pid file and a log file
// ---------------------------------------------------------------------------------------------

/// The pid of the live server for this disk, from its pid file (a pid whose process is not a
/// `vmicache serve` on this socket is stale).
fn running(p: &DiskPlan) -> Result<Option<i32>> {
    let mut s = String::new();
    match FsOpen::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&p.pid)
    {
        Ok(mut f) => {
            f.read_to_string(&mut s)
                .map_err(|e| Error::io(&p.pid, "read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p.pid, "open", e)),
    }
    let Ok(pid) = s.trim().parse::<i32>() else {
        return Ok(None);
    };
    if pid <= 1 || !alive(pid) {
        return Ok(None);
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let sock = p
        .socket
        .as_ref()
        .map(|s| s.as_os_str().as_encoded_bytes())
        .unwrap_or_default();
    let ours = args.contains(&&b"serve"[..]) && args.contains(&sock);
    Ok(ours.then_some(pid))
}

/// A process that exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Stop this disk's server if one runs (SIGTERM; SIGKILL after 10 s), remove its pid file.
/// Seal the disk's cache if its server was recording (a cache still warming, recording on).
fn seal_after_recording(p: &DiskPlan, log: &HookLog) -> Result<()> {
    let (Ok(img), Some(cache)) = (p.image(), p.cache.as_ref()) else {
        return Ok(());
    };
    if !img.settings.record || !exists(cache) {
        return Ok(());
    }
    let state = {
        let c = Image::open(cache, &OpenOptions::read_only())?;
        cache_meta(&c)?.map(|m| m.state)
    };
    if state == Some(CacheState::Warming) {
        match crate::chain::warm::seal(cache) {
            Ok(()) => log.line(&format!("{}: sealed cache {}", p.dev, cache.display())),
            // Another domain's server is still filling it; its release seals it.
            Err(Error::Locked { .. }) => log.line(&format!(
                "{}: cache {} still being filled by another server; not sealed yet",
                p.dev,
                cache.display()
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn stop_server(p: &DiskPlan, log: &HookLog) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if let Some(pid) = running(p)? {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            log.line(&format!("{}: server {pid} ignored SIGTERM; killed", p.dev));
        } else {
            log.line(&format!("{}: stopped server {pid}", p.dev));
        }
    }
    remove_regular(&p.pid)
}

/// The last non-empty line of a server's log (why it stopped).
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim()
        .trim_start_matches("vmicache: ")
        .to_string()
}

/// Start `vmicache serve` for this disk as a detached daemon, write its pid file, wait until
/// the socket accepts, and give the socket its configured owner, group and mode.
fn start_server(cfg: &Config, p: &DiskPlan, record: Option<&Path>, log: &HookLog) -> Result<()> {
    let sock = p.socket.as_ref().expect("NBD disks have a socket");
    if UnixStream::connect(sock).is_ok() {
        return Err(Error::request(
            sock,
            "refused: another process is already listening on this socket",
        ));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", "resolve", e))?;
    let out = open_append(&p.log, 0o640)?;
    let err = out.try_clone().map_err(|e| Error::io(&p.log, "dup", e))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg(&p.instance)
        .arg("--socket")
        .arg(sock)
        .arg("--pass-through-if-busy");
    if !p.export.is_empty() {
        // An empty export name (no name= in the XML) reaches the only export anyway.
        cmd.arg("--export").arg(&p.export);
    }
    if let Some(t) = record {
        cmd.arg("--record").arg(t);
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{signal, SigHandler, Signal};
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // The socket is created 0600; the hook then applies the configured mode.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            for s in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGPIPE,
            ] {
                let _ = signal(s, SigHandler::SigDfl);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(&exe, "start vmicache serve", e))?;
    let pid = child.id();
    let write_pid = || -> Result<()> {
        remove_regular(&p.pid)?;
        let mut f = FsOpen::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&p.pid)
            .map_err(|e| Error::io(&p.pid, "create", e))?;
        writeln!(f, "{pid}").map_err(|e| Error::io(&p.pid, "write", e))
    };
    let fail = |child: &mut std::process::Child, e: Error| {
        let _ = child.kill();
        let _ = child.wait();
        let _ = remove_regular(&p.pid);
        e
    };
    if let Err(e) = write_pid() {
        return Err(fail(&mut child, e));
    }
    let t0 = Instant::now();
    let limit = Duration::from_secs(cfg.start_timeout.0);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let _ = remove_regular(&p.pid);
            return Err(Error::request(
                sock,
                format!(
                    "vmicache serve exited ({st}): {} (log: {})",
                    last_line(&p.log),
                    p.log.display()
                ),
            ));
        }
        if std::fs::symlink_metadata(sock)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
            && UnixStream::connect(sock).is_ok()
        {
            break;
        }
        if t0.elapsed() > limit {
            return Err(fail(
                &mut child,
                Error::request(
                    sock,
                    format!(
                        "vmicache serve did not accept within {} s (log: {})",
                        limit.as_secs(),
                        p.log.display()
                    ),
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Err(e) = socket_access(cfg, sock) {
        return Err(fail(&mut child, e));
    }
    log.line(&format!(
        "{}: started server {pid}: {} on {}{}",
        p.dev,
        p.instance.display(),
        sock.display(),
        record
            .map(|t| format!(", recording {}", t.display()))
            .unwrap_or_default()
    ));
    Ok(())
}

/// Give a fresh socket its configured owner, group and mode.
fn socket_access(cfg: &Config, sock: &Path) -> Result<()> {
    let (uid, gid) = cfg.socket.ids()?;
    let m = std::fs::symlink_metadata(sock).map_err(|e| Error::io(sock, "stat", e))?;
    if !m.file_type().is_socket() {
        return Err(Error::request(sock, "refused: not a socket"));
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(sock, uid, gid).map_err(|e| Error::io(sock, "chown", e))?;
    }
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(cfg.socket.mode.0))
        .map_err(|e| Error::io(sock, "chmod", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>0b8c6a36-3b1b-4a0e-9a43-2b6b2d7e3f10</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <vmicache:disks xmlns:vmicache="https://vmicache.dev/ns/1">
      <vmicache:disk dev="vda" base="debian" mode="nbd"/>
      <vmicache:disk dev="vdb" base="/srv/bases/data.raw"/>
    </vmicache:disks>
  </metadata>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='web1'>
        <host transport='unix' socket='/run/vmicache/web1.sock'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/vmicache/instances/web1-data.qcow2' index='1'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn parses_managed_disks() {
        let d = parse_domain(XML).unwrap();
        assert_eq!(d.name, "web1");
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].mode, Some(DiskMode::Nbd));
        assert_eq!(
            d.disks[0].source,
            Source::Nbd {
                socket: "/run/vmicache/web1.sock".into(),
                export: "web1".into()
            }
        );
        assert_eq!(
            d.disks[1].source,
            Source::File {
                path: "/var/lib/vmicache/instances/web1-data.qcow2".into()
            }
        );
    }

    #[test]
    fn example_domains_parse() {
        let n = parse_domain(include_str!("../tools/libvirt/domain-nbd.xml")).unwrap();
        assert_eq!(n.disks[0].base, "debian-12");
        assert!(matches!(n.disks[0].source, Source::Nbd { .. }));
        let f = parse_domain(include_str!("../tools/libvirt/domain-native.xml")).unwrap();
        assert!(matches!(f.disks[0].source, Source::File { .. }));
    }

    #[test]
    fn unmanaged_and_bad() {
        let plain = "<domain type='kvm'><name>x</name><devices/></domain>";
        assert!(parse_domain(plain).unwrap().disks.is_empty());
        assert!(parse_domain("<domain>").is_err());
        let e = parse_domain(&XML.replace("dev='vdb' bus", "dev='vdc' bus"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no <disk> with <target dev='vdb'/>"), "{e}");
        let e = parse_domain(&XML.replace("type='qcow2'", "type='raw'"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("qcow2"), "{e}");
        // No DTDs, hence no entity expansion.
        assert!(parse_domain("<!DOCTYPE d [<!ENTITY a 'b'>]><domain/>").is_err());
    }
}
