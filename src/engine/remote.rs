//! A base reached only when needed: the base layer of a sealed cache.
//!
//! (The base keeps the size the cache recorded; should the base now be smaller, what lies
//! past its end reads as zeros, as QEMU reads past the end of a backing file.)
//!
//! A sealed cache answers boots without its base, so the base must not be needed to open,
//! inspect or serve it. [`RemoteBase`] stands for the base as a raw layer of the size the cache
//! recorded: nothing is opened or connected until the first read or block status of a range
//! the cache lacks; a read that cannot reach the base fails (EIO over NBD) at once or within the NBD client's
//! timeouts, never hanging; after a failure the base is tried again no sooner than a backoff
//! (doubling from [`RemoteBase::FIRST_BACKOFF`] to [`RemoteBase::MAX_BACKOFF`]), so a base
//! that comes back (an NBD server restarted, a file restored) is used again, and a read error
//! through an open base drops it so that the next try reopens it.

use super::bounds::place_backing;
use super::image::Image;
use super::layer::{BackingRead, Extent, Format, Layer, MapMode, Mapped, Mapping, Piece, Run};
use super::storage::{opener_for, resident, FileStatus, Storage};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a [`RemoteBase`] stands for.
#[derive(Debug, Clone)]
pub struct Target {
    /// The base as the cache names it, resolved (a path, or an NBD URI).
    pub name: PathBuf,
    /// The image that names it (its place is checked against that image's bounds).
    pub overlay: PathBuf,
    /// Its format, as the header or the cache's record says (never probed when known).
    pub format: Option<Format>,
    /// Guest size it is read as.
    pub size: u64,
    /// The virtual size the cache recorded, which the base must still have (a sealed cache).
    pub expect_size: Option<u64>,
    /// Take a QEMU-compatible read lock on it when it is opened.
    pub lock: bool,
    /// How to open it (path or URI, format, lock): passed in by whoever opens chains.
    pub open: OpenBase,
}

/// Opens a base read-only: (what to open, its format, take a read lock).
pub type OpenBase = fn(&Path, Option<Format>, bool) -> Result<Image>;

/// The base of a sealed cache, opened on first use and reopened after failures.
#[derive(Debug)]
pub struct RemoteBase {
    t: Target,
    state: Mutex<State>,
    /// Held while the base is being opened, so that readers (and block status) wait for one
    /// open instead of starting their own; [`RemoteBase::opened`] never waits.
    opening: Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    open: Option<Arc<Image>>,
    /// The open base's file, when the base is one stable file (a raw or qcow2 base opened
    /// read-only): what pieces of it are sent from, kept open by them.
    file: Option<Arc<std::fs::File>>,
    /// The last failure: when, why, and how long to wait before trying again.
    failed: Option<(Instant, String, Duration)>,
}

impl RemoteBase {
    pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

    pub fn new(t: Target) -> RemoteBase {
        RemoteBase {
            t,
            state: Mutex::new(State::default()),
            opening: Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The base if it is open, or the failure that still holds (backoff).
    fn current(&self) -> Option<Result<Arc<Image>>> {
        let s = self.state();
        if let Some(img) = &s.open {
            return Some(Ok(img.clone()));
        }
        match &s.failed {
            Some((at, why, wait)) if at.elapsed() < *wait => {
                Some(Err(unreachable(&self.t.name, why)))
            }
            _ => None,
        }
    }

    /// The base, opening it if it is not open and the backoff allows a try.
    fn get(&self) -> Result<Arc<Image>> {
        if let Some(r) = self.current() {
            return r;
        }
        let _one = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        // Another reader may have opened it (or failed) while we waited.
        if let Some(r) = self.current() {
            return r;
        }
        match self.open() {
            Ok(img) => {
                let img = Arc::new(img);
                let layer = img.layer();
                let file = (layer.stable() && img.read_filter().is_none())
                    .then(|| layer.storage().file())
                    .flatten()
                    .and_then(|f| f.try_clone().ok())
                    .map(Arc::new);
                let mut s = self.state();
                s.open = Some(img.clone());
                s.file = file;
                Ok(img)
            }
            Err(why) => {
                self.failed(None, why.clone());
                Err(unreachable(&self.t.name, &why))
            }
        }
    }

    /// Open the base as the cache named it: placed within bounds again (what the name leads
    /// to may have changed since the cache was opened), in its known format, locked as asked,
    /// and still of the size the cache recorded.
    fn open(&self) -> std::result::Result<Image, String> {
        let t = &self.t;
        let placed = place_backing(&t.overlay, &t.name).map_err(|e| e.to_string())?;
        // Open what was checked (the resolved path), not the name again: a symlink swapped
        // in between would otherwise be followed. An NBD base is reached by its URI.
        let target = if opener_for(&t.name.to_string_lossy()).is_some() {
            t.name.clone()
        } else {
            placed
        };
        let img = (t.open)(&target, t.format, t.lock).map_err(|e| match e {
            Error::Io { source, .. } => format!("{}: {source}", t.name.display()),
            e => e.to_string(),
        })?;
        match t.expect_size {
            Some(want) if img.virtual_size() != want => Err(format!(
                "base changed: its size is now {} bytes, the cache recorded {want}",
                img.virtual_size()
            )),
            _ => Ok(img),
        }
    }

    /// Record a failure (dropping the open base if it is still `was`, or whatever is open
    /// when `was` is None) and lengthen the backoff.
    fn failed(&self, was: Option<&Arc<Image>>, why: String) {
        let mut s = self.state();
        match (was, &s.open) {
            // Another connection was opened meanwhile, or another reader of the same failed
            // connection recorded the failure already (one outage, one backoff step).
            (Some(a), Some(b)) if !Arc::ptr_eq(a, b) => return,
            (Some(_), None) => return,
            _ => {}
        }
        let wait = match &s.failed {
            Some((_, _, w)) => (*w * 2).min(Self::MAX_BACKOFF),
            None => Self::FIRST_BACKOFF,
        };
        s.open = None;
        s.file = None;
        s.failed = Some((Instant::now(), why, wait));
    }

    /// Try to reach the base now (for `inspect`): Ok, or why it cannot be reached.
    pub fn probe(&self) -> std::result::Result<Arc<Image>, String> {
        self.get().map_err(|e| match e {
            Error::Io { source, .. } => source.to_string(),
            e => e.to_string(),
        })
    }

    /// The base if it is open now (nothing is tried).
    pub fn opened(&self) -> Option<Arc<Image>> {
        self.state().open.clone()
    }

    /// The base as the cache names it.
    pub fn name(&self) -> &Path {
        &self.t.name
    }

    /// The lazily reached base that `img`'s layer is, if it is one.
    pub fn of(img: &Image) -> Option<&RemoteBase> {
        img.layer().as_any().downcast_ref()
    }

    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        // A base whose own chain leads back to this cache would recurse through fresh opens.
        let _depth = Depth::enter(&self.t.name)?;
        let img = self.get()?;
        // Past the base's end reads as zeros, as past the end of a file.
        let end = self.t.size.min(img.virtual_size());
        let have = end.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[have..].fill(0);
        if have == 0 {
            return Ok(());
        }
        match img.read_at(&mut buf[..have], off) {
            Ok(()) => {
                // A read that worked ends any backoff.
                let mut s = self.state();
                if s.failed.is_some() {
                    s.failed = None;
                }
                Ok(())
            }
            // The connection or file failed: drop it so the next try reopens (reconnects).
            Err(e @ Error::Io { .. }) => {
                self.failed(Some(&img), e.to_string());
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// `[off, off+len)` as pieces for sending: ranges of the open base's file that are in the
    /// page cache (each piece keeps the file open), zeros, and the rest read into memory as
    /// [`Layer::read_run`] reads (so a failure drops the base to be reopened).
    fn send_pieces(&self, off: u64, len: u64) -> Result<Vec<Piece<'static>>> {
        let _depth = Depth::enter(&self.t.name)?;
        let img = self.get()?;
        // The file of this open base (not of one reopened meanwhile).
        let held = {
            let s = self.state();
            s.open
                .as_ref()
                .filter(|o| Arc::ptr_eq(o, &img))
                .and(s.file.clone())
        };
        let mut out = Vec::new();
        let read = |at: u64, n: u64| -> Result<Piece<'static>> {
            let mut b = vec![0u8; n as usize];
            self.read(&mut b, at)?;
            Ok(Piece::Bytes(b))
        };
        let Some(held) = held else {
            out.push(read(off, len)?);
            return Ok(out);
        };
        let end = self.t.size.min(img.virtual_size());
        let have = end.saturating_sub(off).min(len);
        if have > 0 {
            let inner = match img.read_pieces(off, have) {
                Ok(p) => p,
                Err(e @ Error::Io { .. }) => {
                    self.failed(Some(&img), e.to_string());
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let own = img.layer().storage().file();
            let mut at = off;
            for p in inner {
                let n = p.len();
                out.push(match p.into_owned() {
                    Ok(p) => p,
                    Err(Piece::File {
                        file,
                        off: o,
                        len: l,
                    }) if own.is_some_and(|f| std::ptr::eq(f, file)) && resident(file, o, l) => {
                        Piece::Held {
                            file: held.clone(),
                            off: o,
                            len: l,
                        }
                    }
                    // Another layer's file, or out of the page cache: read now.
                    Err(_) => read(at, n)?,
                });
                at += n;
            }
        }
        if len > have {
            out.push(Piece::Zero(len - have));
        }
        Ok(out)
    }

    fn never_written(&self) -> Error {
        Error::read_only(&self.t.name, "a base is never written")
    }
}

impl Layer for RemoteBase {
    fn path(&self) -> &Path {
        &self.t.name
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.t.size
    }
    fn storage(&self) -> &dyn Storage {
        self
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    /// All data (what the base holds is unknown until it is open; an open base's own chain
    /// answers block status through [`Layer::status_within`]).
    fn map(&self, off: u64, len: u64, _mode: MapMode) -> Result<Mapped<'_>> {
        if off.checked_add(len).is_none_or(|e| e > self.t.size) {
            return Err(Error::out_of_range(
                &self.t.name,
                format!(
                    "request {off:#x}+{len:#x} beyond the size {:#x}",
                    self.t.size
                ),
            ));
        }
        Ok(Mapped {
            runs: vec![Run {
                off,
                len,
                map: Mapping::Data { host: off },
            }],
            guard: None,
        })
    }
    fn read_run(&self, dst: &mut [u8], run: &Run) -> Result<()> {
        self.read(dst, run.off)
    }
    fn write_at(&self, _buf: &[u8], _off: u64, _below: &dyn BackingRead) -> Result<()> {
        Err(self.never_written())
    }
    fn write_zeroes(&self, _off: u64, _len: u64, _below: &dyn BackingRead) -> Result<()> {
        Err(self.never_written())
    }
    fn flush(&self, _durable: bool) -> Result<()> {
        Ok(())
    }
    fn pieces(&self, off: u64, len: u64) -> Option<Result<Vec<Piece<'static>>>> {
        Some(self.send_pieces(off, len))
    }
    /// The open base's own chain answers, one level deeper. A base not yet open is opened
    /// for it when it can be (whoever asks what lies in a range the cache lacks reads it
    /// next, and "all data" would have a sequential copy read the base's holes as data);
    /// one that cannot be reached, or is still in its backoff, is unknown: data.
    fn status_within(&self, off: u64, len: u64) -> Option<Result<Extent>> {
        // A base whose own chain leads back to this cache would recurse through fresh opens.
        let _depth = Depth::enter(&self.t.name).ok()?;
        let real = self.get().ok()?;
        if off >= real.virtual_size() {
            return None;
        }
        // Its layers count from this one: the base's own top is at this layer's depth.
        Some(real.chain_status(off, len.min(real.virtual_size() - off)))
    }
}

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many remote bases this thread is reading through at once.
struct Depth;

impl Depth {
    fn enter(name: &Path) -> Result<Depth> {
        let d = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        let g = Depth;
        if d > 8 {
            return Err(Error::chain(
                name,
                "backing loop: the base's chain leads back through a sealed cache",
            ));
        }
        Ok(g)
    }
}

impl Drop for Depth {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

fn unreachable(name: &Path, why: &str) -> Error {
    Error::io(
        name,
        "base unreachable",
        std::io::Error::other(why.to_string()),
    )
}

/// The base as storage of its recorded size (what `inspect` and the walker's helpers ask
/// of a layer's storage); reads reach the base.
impl Storage for RemoteBase {
    fn path(&self) -> &Path {
        &self.t.name
    }
    fn len(&self) -> Result<u64> {
        Ok(self.t.size)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read(buf, off)
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        Err(self.never_written())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(self.never_written())
    }
    fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        Ok((off < self.t.size).then_some(off))
    }
    fn seek_hole(&self, _off: u64) -> Result<u64> {
        Ok(self.t.size)
    }
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)> {
        if off >= self.t.size {
            return Ok((FileStatus::Eof, len));
        }
        Ok((FileStatus::Data, len.min(self.t.size - off)))
    }
}
