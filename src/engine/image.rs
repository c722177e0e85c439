//! An opened image of either format, with its backing chain.

use super::lock::{lock, LockMode};
use super::qcow2::{Qcow2, Qcow2Open};
use super::raw::Raw;
use super::remote::RemoteBase;
use super::storage::{FileStorage, Storage};
use crate::format::header::MAGIC;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bounds::confine_backing;
pub use super::bounds::{allow_backing_in, place_backing};

/// The vmicache extension of a header, if it has a valid one.
fn cache_meta_of(h: &crate::format::header::Header) -> Option<crate::format::ext::CacheMeta> {
    use crate::format::ext;
    let e = h.extensions.iter().find(|e| e.kind == ext::KIND)?;
    ext::CacheMeta::decode(&e.data).ok()
}

/// A sealed vmicache cache that records its base: its base is not opened eagerly.
fn is_sealed(h: &crate::format::header::Header) -> bool {
    cache_meta_of(h)
        .is_some_and(|m| m.state == crate::format::ext::CacheState::Sealed && m.base.is_some())
}

/// Deepest backing chain we open (QEMU has no fixed limit; this bounds hostile chains).
pub const MAX_CHAIN_DEPTH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open the top image for writing (backing files are always read-only).
    pub write: bool,
    /// Open the backing chain (false: the top image alone, reads of unallocated data fail
    /// over to zeros).
    pub backing: bool,
    /// Format of the top image; None probes the magic.
    pub format: Option<Format>,
    /// Take QEMU-compatible locks: write lock on the top image when writable, read locks
    /// (that refuse writers) on the backing files. Off for inspection, like `qemu-img -U`.
    pub lock: bool,
    /// A backing file that cannot be reached now (missing, its NBD server down) does not fail
    /// the open: it is left to be reached when a read needs it ([`RemoteBase`]), as the base
    /// of a sealed cache always is. For looking at a chain whose base may be down (`inspect`).
    pub lazy_backing: bool,
}

impl OpenOptions {
    pub fn read_only() -> Self {
        OpenOptions {
            write: false,
            backing: true,
            format: None,
            lock: false,
            lazy_backing: false,
        }
    }
    /// Writable, with QEMU-compatible locks (refused while another process writes it).
    pub fn locked_write() -> Self {
        OpenOptions {
            lock: true,
            ..Self::read_write()
        }
    }
    pub fn read_write() -> Self {
        OpenOptions {
            write: true,
            ..Self::read_only()
        }
    }
}

/// Where a read notes the (offset, length) ranges that metadata proves zero, when asked to.
pub(crate) type ZeroNotes<'a> = Option<&'a mut Vec<(u64, u64)>>;

/// Appends a run `(length, reads_as_zero)` to `runs`, merging it into the last one when both
/// are alike; empty runs are dropped.
pub fn push_run(runs: &mut Vec<(u64, bool)>, len: u64, zero: bool) {
    match runs.last_mut() {
        Some(last) if last.1 == zero => last.0 += len,
        _ if len > 0 => runs.push((len, zero)),
        _ => {}
    }
}

/// A run of guest bytes and where it lives in a chain ([`Image::chain_status`]); the fields
/// mean what they mean in `qemu-img map --output=json`.
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

#[derive(Debug)]
pub enum Image {
    Raw(Raw),
    Qcow2(Box<Qcow2>),
}

/// Probe an image's format by its magic.
pub fn probe(st: &dyn Storage) -> Result<Format> {
    let mut m = [0u8; 4];
    st.read_at(&mut m, 0)?;
    Ok(if u32::from_be_bytes(m) == MAGIC && st.len()? >= 4 {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// A base served over NBD (`nbd+unix:///EXPORT?socket=PATH`).
pub fn is_nbd_uri(name: &str) -> bool {
    name.starts_with("nbd+unix://")
}

/// Resolve a backing file name as QEMU does: relative names are relative to the directory of
/// the overlay's path as given.
pub fn resolve_backing(overlay: &Path, name: &str) -> Result<PathBuf> {
    if is_nbd_uri(name) {
        return Ok(PathBuf::from(name));
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::unsupported(
            overlay,
            format!("backing file protocol in '{name}' (only local files)"),
        ));
    }
    let p = Path::new(name);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new("")).join(p)
    })
}

impl Image {
    /// Open `path` and, unless told otherwise, its whole backing chain.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let mut seen = Vec::new();
        Self::open_inner(path, None, opts, opts.format, &mut seen)
    }

    /// `named_by`: the image whose header named `path` as its backing file (None for the
    /// image opened first).
    fn open_inner(
        path: &Path,
        named_by: Option<&Path>,
        opts: &OpenOptions,
        format: Option<Format>,
        seen: &mut Vec<PathBuf>,
    ) -> Result<Image> {
        if let Some(uri) = path.to_str().filter(|s| is_nbd_uri(s)) {
            if opts.write && seen.is_empty() {
                return Err(Error::request(
                    path,
                    "an NBD image is opened read-only here",
                ));
            }
            if let Some(overlay) = named_by {
                place_backing(overlay, path)?;
            }
            let st: Box<dyn Storage> = Box::new(crate::nbd::client::NbdStorage::connect(uri)?);
            let format = match format {
                Some(f) => f,
                None => probe(&*st)?,
            };
            return match format {
                Format::Raw => Ok(Image::Raw(Raw::open(st, false)?)),
                Format::Qcow2 => Err(Error::unsupported(
                    path,
                    "qcow2 over NBD as a backing file (serve it as raw)",
                )),
            };
        }
        let canon = std::fs::canonicalize(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && !seen.is_empty() {
                Error::chain(
                    path,
                    format!(
                        "backing file not found (named by {})",
                        seen.last().unwrap().display()
                    ),
                )
            } else {
                Error::io(path, "open", e)
            }
        })?;
        if let Some(i) = seen.iter().position(|p| *p == canon) {
            let names: Vec<String> = seen[i..]
                .iter()
                .chain(std::iter::once(&canon))
                .map(|p| p.display().to_string())
                .collect();
            return Err(Error::chain(
                path,
                format!("backing loop: {}", names.join(" -> ")),
            ));
        }
        if seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::chain(
                path,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH} layers"),
            ));
        }
        if let Some(overlay) = named_by {
            confine_backing(overlay, &canon, "backing file")?;
        }
        seen.push(canon);
        let write = opts.write && seen.len() == 1;
        let fs = FileStorage::open(path, write)?;
        if opts.lock {
            let mode = if write {
                LockMode::Write
            } else {
                LockMode::Read
            };
            lock(fs.file(), path, mode)?;
        }
        let st: Box<dyn Storage> = Box::new(fs);
        let format = match format {
            Some(f) => f,
            None => probe(&*st)?,
        };
        match format {
            Format::Raw => Ok(Image::Raw(Raw::open(st, write)?)),
            Format::Qcow2 => {
                let header = crate::engine::header_io::read_header(&*st)?;
                let backing = match (&header.backing_file, opts.backing) {
                    (Some(name), true) if is_sealed(&header) => {
                        // A sealed cache is opened without its base: reached on first need.
                        let bpath = resolve_backing(path, name)?;
                        Some(Arc::new(Self::remote_base(
                            path, bpath, &header, opts, true,
                        )?))
                    }
                    (Some(name), true) => {
                        let bpath = resolve_backing(path, name)?;
                        let bfmt = match &header.backing_format {
                            None => None,
                            Some(f) => Some(Format::parse(f).ok_or_else(|| {
                                Error::unsupported(path, format!("backing format '{f}'"))
                            })?),
                        };
                        match Self::open_inner(&bpath, Some(path), opts, bfmt, seen) {
                            Ok(b) => Some(Arc::new(b)),
                            // Shown as unreachable by whoever looks (inspect).
                            Err(e) if opts.lazy_backing && e.is_unreachable() => Some(Arc::new(
                                Self::remote_base(path, bpath, &header, opts, false)?,
                            )),
                            Err(e) => return Err(e),
                        }
                    }
                    _ => None,
                };
                Ok(Image::Qcow2(Box::new(Qcow2::open(
                    st,
                    header,
                    backing,
                    Qcow2Open { write },
                )?)))
            }
        }
    }

    /// The base of the cache `overlay` (header `h`), named `bpath`, as a raw layer that opens
    /// the base only when a read needs it ([`RemoteBase`]). `recorded`: the base must still
    /// have the format and size the cache recorded (a sealed cache); otherwise (a base that
    /// could not be opened, for inspection) it keeps the size the header implies.
    fn remote_base(
        overlay: &Path,
        bpath: PathBuf,
        h: &crate::format::header::Header,
        opts: &OpenOptions,
        recorded: bool,
    ) -> Result<Image> {
        // Checked now, as far as can be seen, and again whenever the base is opened.
        place_backing(overlay, &bpath)?;
        let meta = cache_meta_of(h).and_then(|m| m.base);
        let format = match (&h.backing_format, &meta) {
            (Some(f), _) => Some(
                Format::parse(f)
                    .ok_or_else(|| Error::unsupported(overlay, format!("backing format '{f}'")))?,
            ),
            (None, Some(b)) => Format::parse(&b.format),
            (None, None) => None,
        };
        let expect = match (&meta, recorded) {
            (Some(b), true) => Some(b.virtual_size),
            _ => None,
        };
        let size = meta.map_or(h.size, |b| b.virtual_size);
        let base = RemoteBase::new(super::remote::Target {
            name: bpath,
            overlay: overlay.to_path_buf(),
            format,
            size,
            expect_size: expect,
            lock: opts.lock,
        });
        Ok(Image::Raw(Raw::open(Box::new(base), false)?))
    }

    /// The lazily reached base under a sealed cache, when this image is that layer.
    pub fn as_remote_base(&self) -> Option<&RemoteBase> {
        match self {
            Image::Raw(r) => r.storage().as_remote_base(),
            Image::Qcow2(_) => None,
        }
    }

    /// Open the qcow2 image at `path` over an already opened backing image (several instances
    /// sharing one cache object). The image's recorded backing file must be that image.
    pub fn open_over(path: &Path, opts: &OpenOptions, backing: Arc<Image>) -> Result<Image> {
        Self::open_over_checked(path, opts, backing, true)
    }

    /// As [`Image::open_over`] without checking that `backing` is the file the header names:
    /// for standing an instance directly on its cache's base, which has the same content.
    pub fn open_over_any(path: &Path, opts: &OpenOptions, backing: Arc<Image>) -> Result<Image> {
        Self::open_over_checked(path, opts, backing, false)
    }

    fn open_over_checked(
        path: &Path,
        opts: &OpenOptions,
        backing: Arc<Image>,
        check: bool,
    ) -> Result<Image> {
        let fs = FileStorage::open(path, opts.write)?;
        if opts.lock {
            let mode = if opts.write {
                LockMode::Write
            } else {
                LockMode::Read
            };
            lock(fs.file(), path, mode)?;
        }
        let header = crate::engine::header_io::read_header(&fs)?;
        let name = header
            .backing_file
            .as_deref()
            .ok_or_else(|| Error::chain(path, "image has no backing file"))?;
        if check {
            let want = std::fs::canonicalize(resolve_backing(path, name)?)
                .map_err(|e| Error::io(path, "resolve backing file", e))?;
            let have = std::fs::canonicalize(backing.path())
                .map_err(|e| Error::io(backing.path(), "resolve", e))?;
            if want != have {
                return Err(Error::chain(
                    path,
                    format!("backing file is {}, not {}", want.display(), have.display()),
                ));
            }
        }
        Ok(Image::Qcow2(Box::new(Qcow2::open(
            Box::new(fs),
            header,
            Some(backing),
            Qcow2Open { write: opts.write },
        )?)))
    }

    /// Open a single image (no backing chain) over any storage, e.g. [`MemStorage`]
    /// (`super::storage::MemStorage`) in tests and fuzzing. The format is probed.
    pub fn from_storage(st: Box<dyn Storage>, write: bool) -> Result<Image> {
        match probe(&*st)? {
            Format::Raw => Ok(Image::Raw(Raw::open(st, write)?)),
            Format::Qcow2 => {
                let header = crate::engine::header_io::read_header(&*st)?;
                Ok(Image::Qcow2(Box::new(Qcow2::open(
                    st,
                    header,
                    None,
                    Qcow2Open { write },
                )?)))
            }
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Image::Raw(r) => r.path(),
            Image::Qcow2(q) => q.path(),
        }
    }
    pub fn format(&self) -> Format {
        match self {
            Image::Raw(_) => Format::Raw,
            Image::Qcow2(_) => Format::Qcow2,
        }
    }
    pub fn virtual_size(&self) -> u64 {
        match self {
            Image::Raw(r) => r.virtual_size(),
            Image::Qcow2(q) => q.virtual_size(),
        }
    }
    pub fn backing(&self) -> Option<&Image> {
        match self {
            Image::Raw(_) => None,
            Image::Qcow2(q) => q.backing(),
        }
    }
    pub fn as_qcow2(&self) -> Option<&Qcow2> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) => None,
        }
    }
    pub fn storage(&self) -> &dyn Storage {
        match self {
            Image::Raw(r) => r.storage(),
            Image::Qcow2(q) => q.storage(),
        }
    }
    /// The layers from this image down to the bottom of the chain.
    pub fn layers(&self) -> Vec<&Image> {
        let mut v = vec![self];
        while let Some(b) = v.last().unwrap().backing() {
            v.push(b);
        }
        v
    }
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Image::Raw(r) => r.read_at(buf, off),
            Image::Qcow2(q) => q.read_at(buf, off),
        }
    }
    /// [`Self::read_at`], also saying which parts metadata proves zero: consecutive runs
    /// (length, reads_as_zero) covering `buf`; `buf` is left as it was in the zero runs. One
    /// walk of the chain; what copy-on-read fetches counts as data.
    pub fn read_sparse(&self, buf: &mut [u8], off: u64) -> Result<Vec<(u64, bool)>> {
        let mut zeros = Vec::new();
        self.read_noting_zeros(buf, off, Some(&mut zeros))?;
        zeros.sort_unstable();
        let end = off + buf.len() as u64;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = off;
        for (z, n) in zeros {
            // The ranges are disjoint and within buf; clip anyway rather than trust that.
            let start = z.clamp(pos, end);
            let stop = (z + n).clamp(start, end);
            push_run(&mut runs, start - pos, false);
            push_run(&mut runs, stop - start, true);
            pos = stop;
        }
        push_run(&mut runs, end - pos, false);
        Ok(runs)
    }

    pub(crate) fn read_noting_zeros(
        &self,
        buf: &mut [u8],
        off: u64,
        zeros: ZeroNotes,
    ) -> Result<()> {
        match self {
            Image::Raw(r) => r.read_noting_zeros(buf, off, zeros),
            Image::Qcow2(q) => q.read_noting_zeros(buf, off, zeros),
        }
    }

    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        match self {
            Image::Raw(r) => r.write_at(buf, off),
            Image::Qcow2(q) => q.write_at(buf, off),
        }
    }
    /// Split `[off, off+len)` into runs that metadata alone proves read as zeros (true) and
    /// runs that may hold data (false), without reading data. Used to skip reading holes.
    pub fn zero_runs(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = (off + len).min(self.virtual_size());
        let mut pos = off;
        while pos < end {
            let st = self.chain_status(pos, end - pos)?;
            match out.last_mut() {
                Some(l) if l.2 == st.zero && l.0 + l.1 == pos => l.1 += st.length,
                _ => out.push((pos, st.length, st.zero)),
            }
            pos += st.length;
        }
        if end < off + len {
            // Past the virtual size reads as zeros.
            match out.last_mut() {
                Some(l) if l.2 => l.1 += off + len - end,
                _ => out.push((end.max(off), off + len - end.max(off), true)),
            }
        }
        Ok(out)
    }

    /// Status of the run at `off` (at most `len` bytes, within the virtual size) walking down
    /// the chain from this image, as QEMU's block status reports it (`qemu-img map`): the
    /// layer that holds it and what it holds there. Reads only metadata.
    pub fn chain_status(&self, off: u64, len: u64) -> Result<Extent> {
        use super::qcow2::LayerStatus;
        use super::storage::{file_status, FileStatus};
        let mut img = self;
        let mut depth = 0;
        let mut len = len;
        loop {
            let st = |present, zero, data, compressed, offset, length| Extent {
                start: off,
                length,
                depth,
                present,
                zero,
                data,
                compressed,
                offset,
            };
            let q = match img {
                Image::Raw(r) => {
                    // The base of a sealed cache, when it is open already (never opened for
                    // a status): its own chain answers, one level deeper.
                    if let Some(real) = r.storage().as_remote_base().and_then(|b| b.opened()) {
                        if off < real.virtual_size() {
                            let mut e =
                                real.chain_status(off, len.min(real.virtual_size() - off))?;
                            e.depth += depth;
                            return Ok(e);
                        }
                    }
                    let (data, n) = r.block_status(off, len)?;
                    return Ok(st(true, !data, data, false, Some(off), n));
                }
                Image::Qcow2(q) => q,
            };
            let (ls, n) = q.block_status(off, len)?;
            return Ok(match ls {
                // In a metadata-preallocated image QEMU asks the file system whether the
                // host range holds data; a hole reads as zeros.
                LayerStatus::Data { offset } if q.metadata_preallocated()? => {
                    match file_status(q.storage(), offset, n)? {
                        (FileStatus::Data, m) => st(true, false, true, false, Some(offset), m),
                        (FileStatus::Hole, m) => st(true, true, true, false, Some(offset), m),
                        (FileStatus::Eof, _) => st(true, true, true, false, Some(offset), n),
                    }
                }
                LayerStatus::Data { offset } => st(true, false, true, false, Some(offset), n),
                LayerStatus::Zero { offset } => st(true, true, false, false, offset, n),
                LayerStatus::Compressed => st(true, false, true, true, None, n),
                LayerStatus::Unallocated => match q.backing() {
                    Some(b) if off < b.virtual_size() => {
                        len = n.min(b.virtual_size() - off);
                        img = b;
                        depth += 1;
                        continue;
                    }
                    _ => st(false, true, false, false, None, n),
                },
            });
        }
    }

    /// Make a range read as zeros (qcow2: zero clusters where whole; raw: written zeros).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        match self {
            Image::Raw(r) => super::qcow2::write_zero_bytes(off, len, |b, p| r.write_at(b, p)),
            Image::Qcow2(q) => q.write_zeroes(off, len),
        }
    }

    /// Write cached metadata in safe order; `durable` syncs to stable storage.
    pub fn flush(&self, durable: bool) -> Result<()> {
        match self {
            Image::Raw(r) => r.flush(durable),
            Image::Qcow2(q) => q.flush(durable),
        }
    }
}
