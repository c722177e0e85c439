//! Error kinds of the library, each with the context an operator needs (path, offset, what).
//!
//! Every error renders as one line: the CLI prints it as `vmicache: <line>` and exits 1.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One error, always naming what it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching a file.
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The image is not what it claims (bad magic, values out of range, tables past EOF).
    #[error("{path}: invalid image: {what}")]
    Invalid { path: PathBuf, what: String },
    /// The image uses a feature this engine does not implement; names the feature.
    #[error("{path}: unsupported qcow2 feature: {feature}")]
    Unsupported { path: PathBuf, feature: String },
    /// Metadata found inconsistent while serving a request.
    #[error("{path}: corrupt image: {what}")]
    Corrupt { path: PathBuf, what: String },
    /// A backing chain problem (loop, missing file, too deep).
    #[error("{path}: backing chain: {what}")]
    Chain { path: PathBuf, what: String },
    /// A request beyond the image's (or export's) size.
    #[error("{path}: {what}")]
    OutOfRange { path: PathBuf, what: String },
    /// A write to something open read-only, or to a base that is never written.
    #[error("{path}: {what}")]
    ReadOnly { path: PathBuf, what: String },
    /// Any other refused or malformed request (bad arguments, a file that is not what the
    /// operation needs, a refused configuration).
    #[error("{path}: {what}")]
    Refused { path: PathBuf, what: String },
    /// Compressed cluster that does not decompress.
    #[error("{path}: compressed cluster at host offset {offset:#x}: {what}")]
    Decompress {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// The image is locked by another process.
    #[error("{path}: {what}")]
    Locked { path: PathBuf, what: String },
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
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }
    pub fn invalid(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            what: what.into(),
        }
    }
    pub fn unsupported(path: impl Into<PathBuf>, feature: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            feature: feature.into(),
        }
    }
    pub fn corrupt(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            what: what.into(),
        }
    }
    pub fn chain(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Chain {
            path: path.into(),
            what: what.into(),
        }
    }
    /// A refused request: the same as [`Error::refused`] (kept for the code written before the
    /// request errors were split into [`Error::OutOfRange`], [`Error::ReadOnly`] and
    /// [`Error::Refused`]).
    pub fn request(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::refused(path, what)
    }
    /// A request beyond the size of what `path` names.
    pub fn out_of_range(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::OutOfRange {
            path: path.into(),
            what: what.into(),
        }
    }
    /// A write to what `path` names, which is read-only.
    pub fn read_only(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::ReadOnly {
            path: path.into(),
            what: what.into(),
        }
    }
    /// Any other refused or malformed request.
    pub fn refused(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Refused {
            path: path.into(),
            what: what.into(),
        }
    }
}
