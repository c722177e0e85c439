//! Opening an image and its backing chain from paths: formats, bounds, locks, lazily reached
//! bases, and storage named by URIs (through the openers registered with
//! [`super::storage::register_opener`]).

use super::bounds::confine_backing;
pub use super::bounds::{allow_backing_in, place_backing};
use super::header_io::read_header;
use super::image::Image;
use super::layer::Format;
use super::lock::{lock, LockMode};
use super::qcow2::{Qcow2, Qcow2Open};
use super::raw::Raw;
use super::remote::RemoteBase;
use super::storage::{is_uri, opener_for, FileStorage, Storage};
use crate::format::header::MAGIC;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// A layer format that a layer above the engine implements (the hoard's cached images):
/// recognised by the first 8 bytes of its file, and opened, with the base beneath it, by
/// `open` (the storage, already opened and locked as asked; the options).
#[derive(Clone, Copy)]
pub struct ForeignFormat {
    pub format: Format,
    pub magic: [u8; 8],
    pub open: fn(&Path, Box<dyn Storage>, &OpenOptions) -> Result<Image>,
}

static FOREIGN: std::sync::RwLock<Vec<ForeignFormat>> = std::sync::RwLock::new(Vec::new());

/// Register the driver of a layer format implemented above the engine (once per format; a
/// second registration of a format replaces the first).
pub fn register_format(f: ForeignFormat) {
    let mut g = FOREIGN.write().unwrap_or_else(|p| p.into_inner());
    g.retain(|x| x.format != f.format);
    g.push(f);
}

fn foreign(format: Format) -> Option<ForeignFormat> {
    let g = FOREIGN.read().unwrap_or_else(|p| p.into_inner());
    g.iter().find(|f| f.format == format).copied()
}

/// Probe an image's format by its magic (raw when no magic is known).
pub fn probe(st: &dyn Storage) -> Result<Format> {
    let len = st.len()?;
    let mut m = [0u8; 8];
    let n = len.min(8) as usize;
    st.read_at(&mut m[..n], 0)?;
    if n >= 4 && u32::from_be_bytes([m[0], m[1], m[2], m[3]]) == MAGIC {
        return Ok(Format::Qcow2);
    }
    let g = FOREIGN.read().unwrap_or_else(|p| p.into_inner());
    Ok(match g.iter().find(|f| n == 8 && f.magic == m) {
        Some(f) => f.format,
        None => Format::Raw,
    })
}

/// Open a layer of a format registered with [`register_format`].
fn open_foreign(path: &Path, st: Box<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
    match foreign(Format::Hoard) {
        Some(f) => (f.open)(path, st, opts),
        None => Err(Error::unsupported(
            path,
            "format vmicache-hoard here (the hoard driver is not registered: vmicache::hoard::register())",
        )),
    }
}

/// A backing name that a registered opener reaches (a base served over NBD,
/// `nbd+unix:///EXPORT?socket=PATH`), not a path.
pub fn is_opener_uri(name: &str) -> bool {
    opener_for(name).is_some()
}

/// Resolve a backing file name as QEMU does: relative names are relative to the directory of
/// the overlay's path as given.
pub fn resolve_backing(overlay: &Path, name: &str) -> Result<PathBuf> {
    if is_opener_uri(name) {
        return Ok(PathBuf::from(name));
    }
    if name.starts_with("json:") || is_uri(name) {
        return Err(Error::unsupported(
            overlay,
            format!(
                "backing file protocol in '{name}' (only local files, and URIs a registered opener takes: vmicache::nbd::register() adds nbd+unix://)"
            ),
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
        if let Some((uri, opener)) = path.to_str().and_then(|s| Some((s, opener_for(s)?))) {
            if opts.write && seen.is_empty() {
                return Err(Error::read_only(
                    path,
                    "an NBD image is opened read-only here",
                ));
            }
            if let Some(overlay) = named_by {
                place_backing(overlay, path)?;
            }
            let st: Box<dyn Storage> = opener.open(uri)?;
            let format = match format {
                Some(f) => f,
                None => probe(&*st)?,
            };
            return match format {
                Format::Raw => Ok(Image::new(Box::new(Raw::open(st, false)?), None)),
                Format::Qcow2 => Err(Error::unsupported(
                    path,
                    "qcow2 over NBD as a backing file (serve it as raw)",
                )),
                Format::Hoard => Err(Error::unsupported(
                    path,
                    "a hoarded cache over NBD (open it from its hoard's directory)",
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
            Format::Raw => Ok(Image::new(Box::new(Raw::open(st, write)?), None)),
            Format::Hoard => open_foreign(
                path,
                st,
                &OpenOptions {
                    write,
                    ..opts.clone()
                },
            ),
            Format::Qcow2 => {
                let header = read_header(&*st)?;
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
                let q = Qcow2::open(st, header, Qcow2Open { write })?;
                Ok(Image::new(Box::new(q), backing))
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
        Ok(Self::lazy_base(overlay, bpath, format, size, expect, opts))
    }

    /// The base `bpath` (resolved) of the cache `overlay`, as a raw layer of `size` bytes
    /// that opens the base only when a read needs it ([`RemoteBase`]), in `format` when known;
    /// `expect_size`: the size the base must still have (the cache recorded it). Whoever
    /// calls checks its place first ([`place_backing`]); it is checked again at every open.
    pub fn lazy_base(
        overlay: &Path,
        bpath: PathBuf,
        format: Option<Format>,
        size: u64,
        expect_size: Option<u64>,
        opts: &OpenOptions,
    ) -> Image {
        let base = RemoteBase::new(super::remote::Target {
            name: bpath,
            overlay: overlay.to_path_buf(),
            format,
            size,
            expect_size,
            lock: opts.lock,
            open: open_base,
        });
        Image::new(Box::new(base), None)
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
        let header = read_header(&fs)?;
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
        let q = Qcow2::open(Box::new(fs), header, Qcow2Open { write: opts.write })?;
        Ok(Image::new(Box::new(q), Some(backing)))
    }

    /// Open a single image (no backing chain) over any storage, e.g. [`MemStorage`]
    /// (`super::storage::MemStorage`) in tests and fuzzing. The format is probed.
    pub fn from_storage(st: Box<dyn Storage>, write: bool) -> Result<Image> {
        match probe(&*st)? {
            Format::Raw => Ok(Image::new(Box::new(Raw::open(st, write)?), None)),
            Format::Hoard => {
                let path = st.path().to_path_buf();
                let opts = OpenOptions {
                    write,
                    backing: false,
                    ..OpenOptions::read_only()
                };
                open_foreign(&path, st, &opts)
            }
            Format::Qcow2 => {
                let header = read_header(&*st)?;
                let q = Qcow2::open(st, header, Qcow2Open { write })?;
                Ok(Image::new(Box::new(q), None))
            }
        }
    }
}

/// How a [`RemoteBase`] opens its base: read-only, in its known format, locked as asked.
fn open_base(path: &Path, format: Option<Format>, lock: bool) -> Result<Image> {
    let opts = OpenOptions {
        format,
        lock,
        ..OpenOptions::read_only()
    };
    Image::open(path, &opts)
}
