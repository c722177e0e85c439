//! The operator's configuration file, `/etc/vmicache/config.yaml` (see `tools/libvirt/config.yaml`
//! for a documented example and `docs/libvirt.md` for how the libvirt hook uses it).
//!
//! Everything is validated while it is parsed, so that every error carries the line and column
//! of the offending value: unknown keys, relative directories, sizes, cluster sizes, modes and
//! image names. An error renders as one line, `PATH:LINE:COLUMN: message`.

use crate::{Error, Result};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

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
            Error::request(
                format!("socket {}", if what == "user" { "owner" } else { "group" }),
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
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "read config", e))?;
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
            return Err(Error::request(&self.path, what));
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
        let refuse = |what: String| Error::request(&self.path, what);
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
            return Err(Error::request(
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
        return Error::request(path, msg);
    };
    let mark = format!(" at line {} column {}", loc.line(), loc.column());
    if let Some(i) = msg.find(&mark) {
        msg.replace_range(i..i + mark.len(), "");
    }
    let at = PathBuf::from(format!(
        "{}:{}:{}",
        path.display(),
        loc.line(),
        loc.column()
    ));
    Error::request(at, msg)
}

// ---------------------------------------------------------------------------------------------
// Value types validated while parsing (so errors carry a location)
// ---------------------------------------------------------------------------------------------

/// A YAML scalar as our value types see it.
enum Scalar<'a> {
    Int(u64),
    Str(&'a str),
}

/// Validate a scalar inside the deserializer's visitor, so that an error carries the value's
/// own line and column.
struct ScalarVisitor<T>(fn(Scalar) -> std::result::Result<T, String>, &'static str);

impl<'de, T> de::Visitor<'de> for ScalarVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<T, E> {
        (self.0)(Scalar::Int(v)).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<T, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::custom(format!("{v}: expected {}", self.1))),
        }
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<T, E> {
        (self.0)(Scalar::Str(v)).map_err(E::custom)
    }
}

fn scalar<'de, D: Deserializer<'de>, T>(
    d: D,
    expecting: &'static str,
    f: fn(Scalar) -> std::result::Result<T, String>,
) -> std::result::Result<T, D::Error> {
    d.deserialize_any(ScalarVisitor(f, expecting))
}

/// An absolute path without `.`/`..` components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsDir(pub PathBuf);

impl<'de> Deserialize<'de> for AbsDir {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        scalar(d, "an absolute path", |v| match v {
            Scalar::Str(s) if lexically_clean(Path::new(s)) => Ok(AbsDir(PathBuf::from(s))),
            Scalar::Str(s) => Err(format!(
                "'{s}' must be an absolute path without '.' or '..'"
            )),
            Scalar::Int(i) => Err(format!("'{i}' must be an absolute path")),
        })
    }
}

impl AsRef<Path> for AbsDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

/// The `nbd:` section: limits of the hook's NBD servers, as the `vmicache serve` options
/// of the same names (`max_connections` is `--max-connections`, and so on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdLimits {
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub max_connections_per_export: Option<usize>,
    /// Seconds, 1 to 300.
    #[serde(default)]
    pub handshake_timeout: Option<Seconds>,
    #[serde(default)]
    pub max_queued_reply_bytes: Option<Size>,
    /// Seconds, 1 to 300.
    #[serde(default)]
    pub shutdown_grace: Option<Seconds>,
}

impl NbdLimits {
    /// The server's limits: these settings over [`crate::nbd::Limits::default`].
    pub fn limits(&self) -> crate::nbd::Limits {
        let d = crate::nbd::Limits::default();
        let secs = |s: Option<Seconds>, d| s.map_or(d, |s| std::time::Duration::from_secs(s.0));
        crate::nbd::Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_export: self
                .max_connections_per_export
                .unwrap_or(d.max_connections_per_export),
            handshake_timeout: secs(self.handshake_timeout, d.handshake_timeout),
            max_queued_reply_bytes: self
                .max_queued_reply_bytes
                .and_then(|s| usize::try_from(s.0).ok())
                .unwrap_or(d.max_queued_reply_bytes),
            shutdown_grace: secs(self.shutdown_grace, d.shutdown_grace),
        }
    }

    /// The `vmicache serve` options for the settings given (none for unset ones).
    pub fn serve_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        let mut push = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                a.push(flag.to_string());
                a.push(v);
            }
        };
        push(
            "--max-connections",
            self.max_connections.map(|n| n.to_string()),
        );
        push(
            "--max-connections-per-export",
            self.max_connections_per_export.map(|n| n.to_string()),
        );
        push(
            "--handshake-timeout",
            self.handshake_timeout.map(|s| s.0.to_string()),
        );
        push(
            "--max-queued-reply-bytes",
            self.max_queued_reply_bytes.map(|s| s.0.to_string()),
        );
        push(
            "--shutdown-grace",
            self.shutdown_grace.map(|s| s.0.to_string()),
        );
        a
    }
}

/// A size in bytes: an integer, or a string with a K/M/G/T suffix (powers of 1024).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Size(pub u64);

/// A qcow2 cluster size: a power of two from 512 B to 2 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSize(pub u64);

/// Whole seconds, 1 to 300.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub u64);

/// File permission bits, written as an octal string ("0660").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

/// Parse "4096", "64K", "1.5G", "2GiB".
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (try 4096, 64K, 10G)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        u => return Err(format!("unknown size unit '{u}' in '{s}' (use K, M, G, T)")),
    };
    let v = n * mult as f64;
    if v.fract() != 0.0 || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("'{s}' is not a whole number of bytes"));
    }
    Ok(v as u64)
}

fn size_of(v: Scalar) -> std::result::Result<u64, String> {
    match v {
        Scalar::Int(i) => Ok(i),
        Scalar::Str(s) => parse_size(s),
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        scalar(d, "a size such as 4096, 64K or 2G", |v| {
            size_of(v).map(Size)
        })
    }
}

impl<'de> Deserialize<'de> for ClusterSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        scalar(d, "a cluster size such as 64K", |v| {
            let v = size_of(v)?;
            if !v.is_power_of_two() || !(512..=2 << 20).contains(&v) {
                return Err(format!(
                    "cluster size {v}: must be a power of two from 512 to 2M"
                ));
            }
            Ok(ClusterSize(v))
        })
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        scalar(d, "whole seconds, 1 to 300", |v| match v {
            Scalar::Int(i) if (1..=300).contains(&i) => Ok(Seconds(i)),
            Scalar::Int(i) => Err(format!("{i} seconds: must be 1 to 300")),
            Scalar::Str(s) => Err(format!("'{s}': expected whole seconds, 1 to 300")),
        })
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        scalar(d, "an octal mode in quotes, such as \"0660\"", |v| {
            let Scalar::Str(s) = v else {
                return Err("a mode is an octal string in quotes, such as \"0660\"".into());
            };
            let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| format!("'{s}' is not an octal mode such as \"0660\""))?;
            if m & !0o777 != 0 {
                return Err(format!("mode '{s}': only permission bits (0000 to 0777)"));
            }
            if m & 0o007 != 0 {
                return Err(format!(
                    "mode '{s}' gives access to every user; use owner/group bits only (e.g. \"0660\")"
                ));
            }
            Ok(FileMode(m))
        })
    }
}

/// A key of `images`: a name (letters, digits, `._-+`, not starting with `.`) or an absolute
/// path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageKey(pub ImageKeyKind);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImageKeyKind {
    Name(String),
    Path(PathBuf),
}

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.0 {
            ImageKeyKind::Name(n) => f.write_str(n),
            ImageKeyKind::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Is `s` usable as a file name we make (cache names, guest names, target devs)?
pub fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
}

impl<'de> Deserialize<'de> for ImageKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        scalar(d, "an image name or an absolute path", |v| {
            let s = match v {
                Scalar::Str(s) => s.to_string(),
                Scalar::Int(i) => i.to_string(),
            };
            if s.starts_with('/') {
                let p = PathBuf::from(&s);
                if !lexically_clean(&p) {
                    return Err(format!(
                        "image '{s}': a path key must be absolute without '.' or '..'"
                    ));
                }
                return Ok(ImageKey(ImageKeyKind::Path(p)));
            }
            if !safe_name(&s) {
                return Err(format!(
                    "image name '{s}': use letters, digits and ._-+ (not starting with '.'), or an absolute path"
                ));
            }
            Ok(ImageKey(ImageKeyKind::Name(s)))
        })
    }
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
