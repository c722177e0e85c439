//! The layer API: what one image file holds at a guest range, apart from the chain.
//!
//! A layer driver (qcow2, raw, the lazily reached base of a sealed cache, and later others)
//! answers "what is at this range in this layer" with a [`Mapping`] per run, and does I/O only
//! on its own storage. It knows nothing of the layers below it: the chain walker
//! ([`super::image::Image`]) owns the layers, recurses into backing files, notes zeros and
//! answers block status, all from the same mappings. Where a layer needs the content below it
//! (copy-on-write of a partial cluster), the walker hands it a [`BackingRead`].

use super::storage::Storage;
use crate::Result;
use std::path::Path;
use std::sync::RwLockReadGuard;

/// Image formats a layer can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
    /// A cache kept in a hoard (`crate::hoard`): read in place from its packs. The engine
    /// opens it through the driver the hoard registers ([`super::open::register_format`]).
    #[serde(rename = "vmicache-hoard")]
    Hoard,
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Hoard => "vmicache-hoard",
        }
    }
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            "vmicache-hoard" => Some(Format::Hoard),
            _ => None,
        }
    }
}

/// What one layer holds at a run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data at this host offset of the layer's storage (for the run's first byte).
    Data { host: u64 },
    /// Reads as zeros, decided at this layer; `host`: the preallocated host offset (of the
    /// run's first byte), if any.
    Zero { host: Option<u64> },
    /// A compressed cluster: its descriptor (host offset, stored bytes). The run lies within
    /// that one guest cluster.
    Compressed { host: u64, len: u64 },
    /// Data the layer decodes itself from its own storage ([`Layer::read_run`]), with no
    /// host range that could be sent as it is (a hoarded cache's compressed frames).
    Stored,
    /// Not here: the layer below answers.
    Unallocated,
}

/// Part of a stored run as a layer hands it out without copying ([`Layer::read_shared`]).
#[derive(Debug, Clone)]
pub enum SharedPart {
    /// This many bytes of zeros.
    Zero(u64),
    /// `len` bytes at `off` of a buffer the layer keeps (a decompressed frame).
    Bytes(std::sync::Arc<Vec<u8>>, usize, usize),
    /// Bytes copied out (a small part of a large buffer is not worth keeping it alive for).
    Copied(Vec<u8>),
}

/// A piece of a read, in guest order.
#[derive(Debug)]
pub enum Piece<'a> {
    /// This many bytes read as zeros.
    Zero(u64),
    /// Bytes read into memory.
    Bytes(Vec<u8>),
    /// `len` bytes at `off` of `file`, which does not change while it is open.
    File {
        file: &'a std::fs::File,
        off: u64,
        len: u64,
    },
    /// `len` bytes at `off` of a buffer a layer keeps (a hoarded cache's decompressed frame).
    Shared {
        buf: std::sync::Arc<Vec<u8>>,
        off: usize,
        len: usize,
    },
    /// `len` bytes at `off` of a file the piece keeps open (a lazily opened base, which a
    /// failure may close while the piece waits to be sent), in the page cache when made.
    Held {
        file: std::sync::Arc<std::fs::File>,
        off: u64,
        len: u64,
    },
}

impl Piece<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Piece::Zero(n) => *n,
            Piece::Bytes(b) => b.len() as u64,
            Piece::File { len, .. } => *len,
            Piece::Shared { len, .. } => *len as u64,
            Piece::Held { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The piece with no borrow left in it; a range of a borrowed file has none (`Err`).
    pub fn into_owned(self) -> std::result::Result<Piece<'static>, Self> {
        match self {
            Piece::Zero(n) => Ok(Piece::Zero(n)),
            Piece::Bytes(b) => Ok(Piece::Bytes(b)),
            Piece::Shared { buf, off, len } => Ok(Piece::Shared { buf, off, len }),
            Piece::Held { file, off, len } => Ok(Piece::Held { file, off, len }),
            p @ Piece::File { .. } => Err(p),
        }
    }
}

/// A run of guest bytes `[off, off+len)` with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub off: u64,
    pub len: u64,
    pub map: Mapping,
}

impl Run {
    pub fn end(&self) -> u64 {
        self.off + self.len
    }
}

/// How a layer should map a range.
#[derive(Debug, Clone, Copy)]
pub struct MapMode {
    /// Stop after this many runs (block status wants one).
    pub max_runs: usize,
    /// Runs as block status reports them: consecutive compressed clusters as one run (a read
    /// wants each descriptor), preallocated zeros split where their host offsets are not
    /// contiguous.
    pub status: bool,
    /// File-system holes of a raw layer as zeros (no lseek on the plain read path).
    pub holes: bool,
}

impl MapMode {
    /// For reading: every run, each compressed cluster its own.
    pub const READ: MapMode = MapMode {
        max_runs: usize::MAX,
        status: false,
        holes: false,
    };
    /// For reading while noting what reads as zeros (holes of raw files too).
    pub const SPARSE: MapMode = MapMode {
        max_runs: usize::MAX,
        status: false,
        holes: true,
    };
    /// For block status: the first run.
    pub const STATUS: MapMode = MapMode {
        max_runs: 1,
        status: true,
        holes: true,
    };
}

/// The mapping of a range at one layer, and what keeps it valid: while a `Mapped` lives, no
/// host cluster it names is given to another guest offset (a qcow2 layer's I/O gate).
pub struct Mapped<'a> {
    pub runs: Vec<Run>,
    pub guard: Option<RwLockReadGuard<'a, ()>>,
}

impl Mapped<'_> {
    /// Whether any run is unallocated here.
    pub fn misses(&self) -> bool {
        self.runs.iter().any(|r| r.map == Mapping::Unallocated)
    }
}

/// The content below a layer, as the chain walker reads it (cloud-hypervisor's
/// `BackingRead`): what a layer needs for copy-on-write, without knowing what is below.
pub trait BackingRead: Sync {
    /// Read guest bytes at `off` from below this layer; past the end of what is below (or
    /// with nothing below) reads zeros.
    fn read_below(&self, buf: &mut [u8], off: u64) -> Result<()>;
}

/// A run of guest bytes and where it lives in a chain ([`super::Image::chain_status`]); the
/// fields mean what they mean in `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// 0 is this image, 1 its backing file, ...
    pub depth: usize,
    /// Allocated at `depth` (false: nothing in the chain holds it; reads as zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the file at `depth`, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// One image file of a chain, seen on its own.
pub trait Layer: Send + Sync + std::fmt::Debug {
    fn path(&self) -> &Path;
    fn format(&self) -> Format;
    fn virtual_size(&self) -> u64;
    fn storage(&self) -> &dyn Storage;
    /// For finding the driver's own type again ([`super::Image::as_qcow2`]).
    fn as_any(&self) -> &dyn std::any::Any;
    /// The runs of `[off, off+len)` (within the virtual size) at this layer, in order; they
    /// cover the range unless `mode.max_runs` stopped them early.
    fn map(&self, off: u64, len: u64, mode: MapMode) -> Result<Mapped<'_>>;
    /// Read the bytes of `run` (mapped here, not unallocated) into `dst` (`run.len` bytes).
    fn read_run(&self, dst: &mut [u8], run: &Run) -> Result<()>;
    /// Write guest bytes; `below` supplies old content for partial clusters.
    fn write_at(&self, buf: &[u8], off: u64, below: &dyn BackingRead) -> Result<()>;
    /// Make a range read as zeros.
    fn write_zeroes(&self, off: u64, len: u64, below: &dyn BackingRead) -> Result<()>;
    /// Write cached metadata in safe order; `durable` syncs to stable storage.
    fn flush(&self, durable: bool) -> Result<()>;
    /// Whether what a data run maps stays what it is while the layer is open, so its bytes
    /// may be sent from the file after the mapping's guard is let go: the layer is open
    /// read-only, so this process frees or rewrites no cluster. (Another process writing the
    /// file is kept off by the QEMU-compatible read lock a server takes; `seal --compact`
    /// renames a new file over the cache and leaves the open one as it was.)
    fn stable(&self) -> bool {
        false
    }
    /// Whether data runs must be checked against the file system's holes for block status
    /// (a metadata-preallocated qcow2 image, as QEMU does).
    fn data_may_be_holes(&self) -> Result<bool> {
        Ok(false)
    }
    /// A layer that stands for a chain of its own (the lazily reached base of a sealed
    /// cache): block status from that chain, opened for it when it can be (its top at this
    /// layer's depth); None: unknown.
    fn status_within(&self, _off: u64, _len: u64) -> Option<Result<Extent>> {
        None
    }
    /// A layer that stands for a chain of its own (the lazily reached base of a sealed
    /// cache): `[off, off+len)` as pieces for sending that keep open what they refer to;
    /// None: the layer's own mappings answer.
    fn pieces(&self, _off: u64, _len: u64) -> Option<Result<Vec<Piece<'static>>>> {
        None
    }
    /// The bytes of a [`Mapping::Stored`] run as slices of buffers the layer keeps, for
    /// sending without a copy; None: the layer has no such buffers (read with `read_run`).
    fn read_shared(&self, _run: &Run) -> Option<Result<Vec<SharedPart>>> {
        None
    }
    /// The vmicache extension of a cache layer (base identity, state, ...); None for a
    /// layer that is not a vmicache cache.
    fn cache_meta(&self) -> Result<Option<crate::format::ext::CacheMeta>> {
        Ok(None)
    }
}

/// Write `len` zero bytes at `off` through `write`, in bounded pieces.
pub fn write_zero_bytes(
    off: u64,
    len: u64,
    write: impl Fn(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let zeros = vec![0u8; len.min(4 << 20) as usize];
    let mut p = off;
    while p < off + len {
        let n = (off + len - p).min(zeros.len() as u64) as usize;
        write(&zeros[..n], p)?;
        p += n as u64;
    }
    Ok(())
}
