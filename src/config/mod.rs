//! The operator's configuration file, `/etc/vmicache/config.yaml` (see `tools/libvirt/config.yaml`
//! for a documented example and `docs/libvirt.md` for how the libvirt hook uses it).
//!
//! Everything is validated while it is parsed, so that every error carries the line and column
//! of the offending value: unknown keys, relative directories, sizes, cluster sizes, modes and
//! image names. An error renders as one line, `PATH:LINE:COLUMN: message`.

use crate::{Error, Result, Subject};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

mod values;
pub use values::*;

/// Where the configuration is read from when neither `--config` nor `VMICACHE_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/vmicache/config.yaml";
/// Environment variable naming the configuration file.
pub const ENV_VAR: &str = "VMICACHE_CONFIG";

/// The configuration file to read: `explicit` (from `--config`), else `$VMICACHE_CONFIG`, else
/// [`DEFAULT_PATH`].
pub fn config_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(ENV_VAR) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where everything lives.
    pub dirs: Dirs,
    /// Settings for every image unless its entry in `images` says otherwise.
    #[serde(default)]
    pub defaults: Defaults,
    /// What to do when a cache's base changed since the cache was built.
    #[serde(default)]
    pub on_base_change: OnBaseChange,
    /// Owner, group and mode of the NBD sockets the hook's servers listen on.
    #[serde(default)]
    pub socket: SocketAccess,
    /// Seconds the hook waits for a server's socket to accept (1–300).
    #[serde(default = "default_start_timeout")]
    pub start_timeout: Seconds,
    /// Limits of the NBD servers the hook starts; unset ones keep the defaults of
    /// [`crate::nbd::Limits`].
    #[serde(default)]
    pub nbd: NbdLimits,
    /// The OCI registry hoards travel through (`vmicache hoard push|pull|sync`, `register`).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Per-image settings, keyed by a name (used in the domain XML as `base="NAME"`, with a
    /// `base:` path) or by the base image's absolute path.
    #[serde(default)]
    pub images: BTreeMap<ImageKey, ImageEntry>,
    /// The file this was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

/// The directories of [`Config::dirs`]. Every path the hook creates, writes or deletes lies
/// inside one of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dirs {
    /// Directories base images may be read from, symlinks resolved (a base named in `images`
    /// is allowed wherever it is).
    #[serde(default)]
    pub bases: Vec<AbsDir>,
    /// Cache layers, one per base (`NAME.qcow2`).
    pub caches: AbsDir,
    /// Per-VM instance overlays.
    pub instances: AbsDir,
    /// Boot traces recorded while a cache fills.
    pub traces: AbsDir,
    /// NBD sockets of the servers the hook starts.
    pub sockets: AbsDir,
    /// Pid files, server logs and the hook's log.
    pub state: AbsDir,
    /// The hoard (`vmicache hoard`): the caches of many images, deduplicated and compressed.
    #[serde(default)]
    pub hoard: Option<AbsDir>,
}

/// Image settings that apply unless an image entry overrides them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default = "default_cluster")]
    pub cluster_size: ClusterSize,
    #[serde(default)]
    pub quota: Size,
    /// None: follow the `<disk>` element (a file source is native, an NBD source is nbd).
    #[serde(default)]
    pub mode: Option<DiskMode>,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default = "yes")]
    pub record: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            cluster_size: default_cluster(),
            quota: Size(0),
            mode: None,
            ephemeral: false,
            record: true,
        }
    }
}

/// One entry of `images`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// The base image (required when the key is a name, forbidden when it is a path).
    pub base: Option<AbsDir>,
    pub cluster_size: Option<ClusterSize>,
    pub quota: Option<Size>,
    pub mode: Option<DiskMode>,
    /// Remove the instance overlay when the domain is released, make a fresh one at prepare.
    pub ephemeral: Option<bool>,
    /// Record a boot trace while the cache fills (NBD mode).
    pub record: Option<bool>,
}

/// How a managed disk reaches QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// QEMU opens instance → cache → base itself (a `<disk type='file'>` qcow2 source).
    Native,
    /// `vmicache serve` exports the instance on a Unix socket (a `<disk type='network'>` NBD
    /// source); copy-on-read fills an unsealed cache.
    Nbd,
}

impl fmt::Display for DiskMode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            DiskMode::Native => "native",
            DiskMode::Nbd => "nbd",
        })
    }
}

/// What to do with a cache whose base changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBaseChange {
    /// Refuse to start the domain (the default).
    #[default]
    Refuse,
    /// Build a new, empty cache over the changed base.
    Rebuild,
}

/// Socket ownership and mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketAccess {
    /// User name or numeric uid (default: the hook's user, root).
    pub owner: Option<String>,
    /// Group name or numeric gid; the qemu user must be in it (or be `owner`).
    pub group: Option<String>,
    /// Octal, as a string: "0660".
    #[serde(default = "default_socket_mode")]
    pub mode: FileMode,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            owner: None,
            group: None,
            mode: default_socket_mode(),
        }
    }
}

impl SocketAccess {
    /// The uid and gid to give sockets (names looked up in /etc/passwd and /etc/group).
    pub fn ids(&self) -> Result<(Option<u32>, Option<u32>)> {
        let uid = self
            .owner
            .as_deref()
            .map(|o| lookup_id("/etc/passwd", o, "user"))
            .transpose()?;
        let gid = self
            .group
            .as_deref()
            .map(|g| lookup_id("/etc/group", g, "group"))
            .transpose()?;
        Ok((uid, gid))
    }
}

/// A numeric id, or the id of `name` in a passwd/group-format file.
fn lookup_id(file: &str, name: &str, what: &str) -> Result<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, "read", e))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?.parse::<u32>().ok()?;
            (n == name).then_some(id)
        })
        .next()
        .ok_or_else(|| {
            Error::refused(
                Subject::Other(format!(
                    "socket {}",
                    if what == "user" { "owner" } else { "group" }
                )),
                format!("no {what} '{name}' in {file}"),
            )
        })
}

fn default_cluster() -> ClusterSize {
    ClusterSize(64 << 10)
}
fn default_socket_mode() -> FileMode {
    FileMode(0o660)
}
fn default_start_timeout() -> Seconds {
    Seconds(10)
}
fn yes() -> bool {
    true
}

/// The settings in force for one image: its entry over the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cluster_size: u64,
    pub quota: u64,
    pub mode: Option<DiskMode>,
    pub ephemeral: bool,
    pub record: bool,
}

/// A base image as the configuration resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The cache's name: the entry's name, or `FILENAME-HASH` for a base named by path.
    pub name: String,
    pub base: PathBuf,
    pub settings: Settings,
}

impl Config {
    /// Read and validate the configuration at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(Subject::config(path), "read config", e))?;
        Config::parse(&text, path)
    }

    /// Parse and validate configuration text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut c: Config = serde_norway::from_str(text).map_err(|e| located(path, &e))?;
        c.path = path.to_path_buf();
        c.check_entries()?;
        Ok(c)
    }

    /// Checks that need the whole file (after every value parsed).
    fn check_entries(&self) -> Result<()> {
        for (k, e) in &self.images {
            let what = match (&k.0, &e.base) {
                (ImageKeyKind::Name(n), None) => {
                    format!("images: '{n}': an image named by a name needs `base: /path`")
                }
                (ImageKeyKind::Path(p), Some(_)) => format!(
                    "images: '{}': an image keyed by its path takes no `base:`",
                    p.display()
                ),
                _ => continue,
            };
            return Err(Error::refused(Subject::config(&self.path), what));
        }
        Ok(())
    }

    /// The settings of an entry over the defaults.
    fn settings(&self, e: Option<&ImageEntry>) -> Settings {
        let d = &self.defaults;
        let e = e.cloned().unwrap_or_default();
        Settings {
            cluster_size: e.cluster_size.unwrap_or(d.cluster_size).0,
            quota: e.quota.unwrap_or(d.quota).0,
            mode: e.mode.or(d.mode),
            ephemeral: e.ephemeral.unwrap_or(d.ephemeral),
            record: e.record.unwrap_or(d.record),
        }
    }

    /// Resolve the `base` a domain XML names: an image name from `images`, or an absolute path
    /// (inside `dirs.bases`, or listed in `images`).
    pub fn resolve_image(&self, base: &str) -> Result<ResolvedImage> {
        let refuse = |what: String| Error::refused(Subject::config(&self.path), what);
        if !base.starts_with('/') {
            let key = ImageKey(ImageKeyKind::Name(base.to_string()));
            let e = self.images.get(&key).ok_or_else(|| {
                refuse(format!(
                    "base '{base}' is neither an absolute path nor an image named in `images`"
                ))
            })?;
            return Ok(ResolvedImage {
                name: base.to_string(),
                base: e.base.clone().expect("checked at load").0,
                settings: self.settings(Some(e)),
            });
        }
        let p = PathBuf::from(base);
        if !lexically_clean(&p) {
            return Err(refuse(format!(
                "base '{base}' must be an absolute path without '.' or '..'"
            )));
        }
        // An entry keyed by this path, or a named entry whose base is this path.
        if let Some(e) = self.images.get(&ImageKey(ImageKeyKind::Path(p.clone()))) {
            return Ok(ResolvedImage {
                name: path_name(&p),
                base: p,
                settings: self.settings(Some(e)),
            });
        }
        if let Some((k, e)) = self
            .images
            .iter()
            .find(|(_, e)| e.base.as_ref().map(|b| &b.0) == Some(&p))
        {
            return Ok(ResolvedImage {
                name: k.to_string(),
                base: p,
                settings: self.settings(Some(e)),
            });
        }
        // Resolved through every symlink, the final component's included: a link in a bases
        // directory to a file elsewhere is refused like the file itself.
        let real = match std::fs::canonicalize(&p) {
            Ok(r) => r,
            // A base that is not there (a storage node down) is placed by its directory: a
            // sealed cache over it needs nothing of it. A dangling symlink is not let through.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && std::fs::symlink_metadata(&p).is_err() =>
            {
                let dir = p.parent().and_then(|d| std::fs::canonicalize(d).ok());
                match (dir, p.file_name()) {
                    (Some(d), Some(f)) => d.join(f),
                    _ => return Err(Error::io(&p, "base image", e)),
                }
            }
            Err(e) => return Err(Error::io(&p, "base image", e)),
        };
        let allowed = self.dirs.bases.iter().any(|d| {
            std::fs::canonicalize(&d.0)
                .map(|cd| real.starts_with(cd))
                .unwrap_or(false)
        });
        if !allowed {
            return Err(Error::refused(
                &p,
                "refused: base image is outside the configured dirs.bases and not listed in `images`",
            ));
        }
        Ok(ResolvedImage {
            name: path_name(&p),
            base: p,
            settings: self.settings(None),
        })
    }
}

/// `FILENAME-HASH8` for a base named by path (two bases with one file name get two caches).
fn path_name(p: &Path) -> String {
    let file = p
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "base".into());
    let file: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let h = blake3::hash(p.as_os_str().as_encoded_bytes());
    format!("{file}-{}", &h.to_hex()[..8])
}

/// Absolute, and no `.` or `..` component.
pub fn lexically_clean(p: &Path) -> bool {
    p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// A serde_norway error as `PATH:LINE:COLUMN: message`.
fn located(path: &Path, e: &serde_norway::Error) -> Error {
    let mut msg = e.to_string();
    let Some(loc) = e.location() else {
        return Error::refused(Subject::config(path), msg);
    };
    let mark = format!(" at line {} column {}", loc.line(), loc.column());
    if let Some(i) = msg.find(&mark) {
        msg.replace_range(i..i + mark.len(), "");
    }
    let at = Subject::Config {
        file: path.to_path_buf(),
        at: Some((loc.line(), loc.column())),
    };
    Error::refused(at, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
dirs:
  bases: [/srv/bases]
  caches: /var/lib/vmicache/caches
  instances: /var/lib/vmicache/instances
  traces: /var/lib/vmicache/traces
  sockets: /run/vmicache
  state: /var/lib/vmicache/state
defaults:
  cluster_size: 64K
  quota: 2G
on_base_change: rebuild
socket:
  group: kvm
  mode: \"0660\"
images:
  debian:
    base: /srv/bases/debian.raw
    quota: 1G
    mode: nbd
    ephemeral: true
  /srv/bases/alpine.qcow2:
    cluster_size: 128K
";

    fn parse(t: &str) -> Result<Config> {
        Config::parse(t, Path::new("c.yaml"))
    }

    #[test]
    fn nbd_limits() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.nbd, NbdLimits::default());
        assert_eq!(c.nbd.limits(), crate::nbd::Limits::default());
        assert!(c.nbd.serve_args().is_empty());
        let t = format!("{GOOD}nbd:\n  max_connections: 4\n  handshake_timeout: 3\n  max_queued_reply_bytes: 8M\n");
        let c = parse(&t).unwrap();
        let l = c.nbd.limits();
        assert_eq!(l.max_connections, 4);
        assert_eq!(l.handshake_timeout, std::time::Duration::from_secs(3));
        assert_eq!(l.max_queued_reply_bytes, 8 << 20);
        assert_eq!(
            l.max_connections_per_export,
            crate::nbd::Limits::default().max_connections_per_export
        );
        assert_eq!(
            c.nbd.serve_args(),
            [
                "--max-connections",
                "4",
                "--handshake-timeout",
                "3",
                "--max-queued-reply-bytes",
                "8388608"
            ]
        );
        assert!(parse(&format!("{GOOD}nbd:\n  max_conections: 4\n")).is_err());
        assert!(parse(&format!("{GOOD}nbd:\n  handshake_timeout: 0\n")).is_err());
    }

    #[test]
    fn good_config() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.defaults.quota, Size(2 << 30));
        assert_eq!(c.on_base_change, OnBaseChange::Rebuild);
        assert_eq!(c.socket.mode, FileMode(0o660));
        let d = c.resolve_image("debian").unwrap();
        assert_eq!(d.base, PathBuf::from("/srv/bases/debian.raw"));
        assert_eq!(d.settings.quota, 1 << 30);
        assert_eq!(d.settings.mode, Some(DiskMode::Nbd));
        assert!(d.settings.ephemeral);
        // The same base named by path finds the named entry.
        let d2 = c.resolve_image("/srv/bases/debian.raw").unwrap();
        assert_eq!(d2.name, "debian");
        let a = c.resolve_image("/srv/bases/alpine.qcow2").unwrap();
        assert_eq!(a.settings.cluster_size, 128 << 10);
        assert_eq!(a.settings.quota, 2 << 30);
        assert!(a.name.starts_with("alpine.qcow2-"));
        assert!(c.resolve_image("nosuch").is_err());
        assert!(c.resolve_image("/srv/bases/../etc/shadow").is_err());
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn errors_have_locations() {
        let e = err(&GOOD.replace("  quota: 2G", "  qouta: 2G"));
        assert!(
            e.starts_with("c.yaml:10:3: defaults: unknown field `qouta`"),
            "{e}"
        );
        let e = err(&GOOD.replace("caches: /var", "caches: var"));
        assert!(e.starts_with("c.yaml:3:11: dirs.caches: 'var/lib"), "{e}");
        assert!(e.contains("absolute"), "{e}");
        let e = err(&GOOD.replace("cluster_size: 128K", "cluster_size: 100K"));
        assert!(e.starts_with("c.yaml:22:19:"), "{e}");
        let e = err(&GOOD.replace("\"0660\"", "\"0666\""));
        assert!(e.contains("every user"), "{e}");
        let e = err(&GOOD.replace("quota: 1G", "quota: 1Q"));
        assert!(e.starts_with("c.yaml:18:12:"), "{e}");
        let e = err("dirs: [\n");
        assert!(e.starts_with("c.yaml:"), "{e}");
        let e = err(&GOOD.replace("    base: /srv/bases/debian.raw\n", ""));
        assert!(e.contains("needs `base"), "{e}");
    }
}
