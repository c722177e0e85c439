//! Value types of the configuration, validated while parsing (so errors carry a location):
//! directories, sizes, cluster sizes, seconds, file modes, image keys, the NBD limits.

use super::*;

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

/// The `registry:` section: where `vmicache hoard push|pull|sync` find the hoard's
/// generations, and the credentials (secrets in files of their own, not here). The
/// environment overrides it: `VMICACHE_REGISTRY`, `VMICACHE_REGISTRY_USER`,
/// `VMICACHE_REGISTRY_PASSWORD`, `VMICACHE_REGISTRY_TOKEN`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `HOST[:PORT]/REPOSITORY` (a tag after `:` is what `pull` fetches; default `latest`).
    #[serde(rename = "ref")]
    pub reference: String,
    /// User for basic authentication (or a token service that takes it).
    pub username: Option<String>,
    /// A file whose first line is the password of `username`.
    pub password_file: Option<AbsDir>,
    /// A file whose first line is a bearer token.
    pub token_file: Option<AbsDir>,
    /// Plain HTTP to a registry that is not on a loopback address (loopback always may).
    #[serde(default)]
    pub insecure: bool,
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
