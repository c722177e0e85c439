//! Error kinds of the library, each with the context an operator needs (what it is about,
//! offset, what went wrong).
//!
//! Every error renders as one line: the CLI prints it as `vmicache: <line>` and exits 1.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

/// What an error is about: a file most of the time, else something that is not one. Renders
/// as the path (or the words) it holds, so an error reads `<subject>: <what>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A file, directory or socket, or a name standing for one (an NBD URI of a base).
    Path(PathBuf),
    /// The domain XML libvirt hands the hook on its standard input.
    DomainXml,
    /// The configuration file, at a line and column when known (`FILE:LINE:COLUMN`).
    Config {
        file: PathBuf,
        at: Option<(usize, usize)>,
    },
    /// Anything else, in words (`disk vda`, `domain 'x'`, `<memory>`).
    Other(String),
}

impl Subject {
    /// The configuration file `file`, no line known.
    pub fn config(file: impl Into<PathBuf>) -> Subject {
        Subject::Config {
            file: file.into(),
            at: None,
        }
    }

    /// The file this is about, if it is one (a configuration file too).
    pub fn path(&self) -> Option<&Path> {
        match self {
            Subject::Path(p) | Subject::Config { file: p, .. } => Some(p),
            Subject::DomainXml | Subject::Other(_) => None,
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Path(p) => write!(f, "{}", p.display()),
            Subject::DomainXml => f.write_str("domain XML"),
            Subject::Config { file, at: None } => write!(f, "{}", file.display()),
            Subject::Config {
                file,
                at: Some((line, column)),
            } => write!(f, "{}:{line}:{column}", file.display()),
            Subject::Other(s) => f.write_str(s),
        }
    }
}

/// Paths, and strings naming files, are [`Subject::Path`]: what every caller passed before
/// there were other subjects.
impl From<PathBuf> for Subject {
    fn from(p: PathBuf) -> Subject {
        Subject::Path(p)
    }
}

impl From<String> for Subject {
    fn from(s: String) -> Subject {
        Subject::Path(PathBuf::from(s))
    }
}

impl<T: ?Sized + AsRef<OsStr>> From<&T> for Subject {
    fn from(p: &T) -> Subject {
        Subject::Path(PathBuf::from(p))
    }
}

/// Whether the error is about the file at `other` (`if path == self.path()`).
impl PartialEq<Path> for Subject {
    fn eq(&self, other: &Path) -> bool {
        matches!(self, Subject::Path(p) if p == other)
    }
}

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One error, always naming what it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching a file.
    #[error("{path}: {op}: {source}")]
    Io {
        path: Subject,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The image is not what it claims (bad magic, values out of range, tables past EOF).
    #[error("{path}: invalid image: {what}")]
    Invalid { path: Subject, what: String },
    /// The image uses a feature this engine does not implement; names the feature.
    #[error("{path}: unsupported qcow2 feature: {feature}")]
    Unsupported { path: Subject, feature: String },
    /// Metadata found inconsistent while serving a request.
    #[error("{path}: corrupt image: {what}")]
    Corrupt { path: Subject, what: String },
    /// A backing chain problem (loop, missing file, too deep).
    #[error("{path}: backing chain: {what}")]
    Chain { path: Subject, what: String },
    /// A request beyond the image's (or export's) size.
    #[error("{path}: {what}")]
    OutOfRange { path: Subject, what: String },
    /// A write to something open read-only, or to a base that is never written.
    #[error("{path}: {what}")]
    ReadOnly { path: Subject, what: String },
    /// Any other refused or malformed request (bad arguments, a file that is not what the
    /// operation needs, a refused configuration).
    #[error("{path}: {what}")]
    Refused { path: Subject, what: String },
    /// Compressed cluster that does not decompress.
    #[error("{path}: compressed cluster at host offset {offset:#x}: {what}")]
    Decompress {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// The image is locked by another process.
    #[error("{path}: {what}")]
    Locked { path: Subject, what: String },
}

impl Error {
    /// A file or server that is not there or does not answer (as opposed to one that is
    /// there and wrong): what an outage looks like.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::Io { .. } => true,
            Error::Chain { what, .. } => what.starts_with("backing file not found"),
            _ => false,
        }
    }
    pub fn io(path: impl Into<Subject>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
    pub fn invalid(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            what: what.into(),
        }
    }
    pub fn unsupported(path: impl Into<Subject>, feature: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            feature: feature.into(),
        }
    }
    pub fn corrupt(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            what: what.into(),
        }
    }
    pub fn chain(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::Chain {
            path: path.into(),
            what: what.into(),
        }
    }
    /// A refused request: the same as [`Error::refused`] (kept for the code written before the
    /// request errors were split into [`Error::OutOfRange`], [`Error::ReadOnly`] and
    /// [`Error::Refused`]).
    pub fn request(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::refused(path, what)
    }
    /// A request beyond the size of what `path` names.
    pub fn out_of_range(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::OutOfRange {
            path: path.into(),
            what: what.into(),
        }
    }
    /// A write to what `path` names, which is read-only.
    pub fn read_only(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::ReadOnly {
            path: path.into(),
            what: what.into(),
        }
    }
    /// Any other refused or malformed request.
    pub fn refused(path: impl Into<Subject>, what: impl Into<String>) -> Self {
        Error::Refused {
            path: path.into(),
            what: what.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_render_as_before() {
        let e = Error::refused("/var/lib/x.qcow2", "refused: not a file");
        assert_eq!(e.to_string(), "/var/lib/x.qcow2: refused: not a file");
        assert!(matches!(&e, Error::Refused { path, .. } if path == Path::new("/var/lib/x.qcow2")));
        let e = Error::refused(Subject::DomainXml, "no <devices>");
        assert_eq!(e.to_string(), "domain XML: no <devices>");
        let at = Subject::Config {
            file: "/etc/vmicache.yaml".into(),
            at: Some((3, 7)),
        };
        assert_eq!(at.to_string(), "/etc/vmicache.yaml:3:7");
        assert_eq!(at.path(), Some(Path::new("/etc/vmicache.yaml")));
        assert_eq!(
            Subject::config("/etc/vmicache.yaml").to_string(),
            "/etc/vmicache.yaml"
        );
        let disk = Subject::Other("disk vda".into());
        assert_eq!(disk.path(), None);
        assert_eq!(
            Error::corrupt(disk, "x").to_string(),
            "disk vda: corrupt image: x"
        );
    }
}
