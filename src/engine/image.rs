//! The chain walker: an image is a layer over the chain of layers beneath it.
//!
//! Each layer driver ([`Layer`]: qcow2, raw, a lazily reached base) says what it holds at a
//! range; [`Image`] owns the layers and does everything that crosses them from those mappings,
//! with one walk per layer: reads that recurse into backing files for what a layer lacks,
//! sparse reads that note what metadata proves zero, block status, and writes that take the
//! content below for copy-on-write ([`BackingRead`]). A read filter (copy-on-read,
//! `crate::engine::cor`) may stand over a layer's unallocated runs.
//!
//! Opening a chain from paths (bounds, locks, formats, lazy bases) is `super::open`.

use super::layer::{BackingRead, Extent, Format, Layer, MapMode, Mapped, Mapping};
use super::qcow2::Qcow2;
use super::storage::{file_status, FileStatus, Storage};
use crate::Result;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A filter over the reads of one layer's unallocated runs (copy-on-read), installed from
/// above with [`Image::set_read_filter`]; the walker calls it and knows nothing else of it.
pub trait ReadFilter: Send + Sync {
    /// A read request reached this layer; `miss`: some of it is unallocated here.
    fn request(&self, miss: bool);
    /// Read `dst` at guest offset `pos`, a run unallocated in `img`'s layer when the read was
    /// mapped (no lock or guard of the layer held).
    fn read_unallocated(&self, img: &Image, dst: &mut [u8], pos: u64) -> Result<()>;
    /// For finding the filter's own type again.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Where a read notes the (offset, length) ranges that metadata proves zero, when asked to.
type ZeroNotes<'a> = Option<&'a mut Vec<(u64, u64)>>;

/// A run of guest bytes that reads as zeros or may hold data ([`Image::zero_runs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRun {
    pub off: u64,
    pub len: u64,
    /// Metadata alone proves it reads as zeros.
    pub zero: bool,
}

/// A run of a sparse read ([`Image::read_sparse`]): `len` bytes that read as zeros (left
/// untouched in the buffer) or hold what was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseRun {
    pub len: u64,
    pub zero: bool,
}

/// Appends a run to `runs`, merging it into the last one when both are alike; empty runs are
/// dropped.
pub fn push_run(runs: &mut Vec<SparseRun>, len: u64, zero: bool) {
    match runs.last_mut() {
        Some(last) if last.zero == zero => last.len += len,
        _ if len > 0 => runs.push(SparseRun { len, zero }),
        _ => {}
    }
}

/// One layer of a chain and the chain beneath it.
pub struct Image {
    layer: Box<dyn Layer>,
    backing: Option<Arc<Image>>,
    filter: OnceLock<Box<dyn ReadFilter>>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("layer", &self.layer)
            .field("backing", &self.backing)
            .finish()
    }
}

/// The chain below an image, as a layer's writes see it.
struct Below<'a>(Option<&'a Image>);

impl BackingRead for Below<'_> {
    fn read_below(&self, buf: &mut [u8], off: u64) -> Result<()> {
        read_from(self.0, buf, off, None)
    }
}

/// Read `dst` at `pos` from `img` (None: nothing there); past its end reads zeros (noted as
/// such with `zeros`).
fn read_from(img: Option<&Image>, dst: &mut [u8], pos: u64, mut zeros: ZeroNotes) -> Result<()> {
    let have = match img {
        None => 0,
        Some(b) => {
            let have = b.virtual_size().saturating_sub(pos).min(dst.len() as u64) as usize;
            if have > 0 {
                b.read_noting(&mut dst[..have], pos, zeros.as_deref_mut())?;
            }
            have
        }
    };
    match zeros {
        Some(z) if have < dst.len() => z.push((pos + have as u64, (dst.len() - have) as u64)),
        Some(_) => {}
        None => dst[have..].fill(0),
    }
    Ok(())
}

impl Image {
    /// `layer` over `backing`.
    pub fn new(layer: Box<dyn Layer>, backing: Option<Arc<Image>>) -> Image {
        Image {
            layer,
            backing,
            filter: OnceLock::new(),
        }
    }

    pub fn layer(&self) -> &dyn Layer {
        &*self.layer
    }
    pub fn path(&self) -> &Path {
        self.layer.path()
    }
    pub fn format(&self) -> Format {
        self.layer.format()
    }
    pub fn virtual_size(&self) -> u64 {
        self.layer.virtual_size()
    }
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }
    pub fn as_qcow2(&self) -> Option<&Qcow2> {
        self.layer.as_any().downcast_ref()
    }
    pub fn storage(&self) -> &dyn Storage {
        self.layer.storage()
    }
    /// The layers from this image down to the bottom of the chain.
    pub fn layers(&self) -> Vec<&Image> {
        let mut v = vec![self];
        while let Some(b) = v.last().unwrap().backing() {
            v.push(b);
        }
        v
    }

    /// Install the read filter; it stays for the life of the image. Gives it back when one
    /// is installed already.
    pub fn set_read_filter(
        &self,
        f: Box<dyn ReadFilter>,
    ) -> std::result::Result<(), Box<dyn ReadFilter>> {
        self.filter.set(f)
    }

    /// The read filter, when one is installed.
    pub fn read_filter(&self) -> Option<&dyn ReadFilter> {
        self.filter.get().map(|f| &**f)
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_noting(buf, off, None)
    }

    /// [`Self::read_at`], also saying which parts metadata proves zero: consecutive runs
    /// covering `buf`; `buf` is left as it was in the zero runs. One walk of the chain; what
    /// copy-on-read fetches counts as data.
    pub fn read_sparse(&self, buf: &mut [u8], off: u64) -> Result<Vec<SparseRun>> {
        let mut zeros = Vec::new();
        self.read_noting(buf, off, Some(&mut zeros))?;
        zeros.sort_unstable();
        let end = off + buf.len() as u64;
        let mut runs = Vec::new();
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

    /// The one read walk: map this layer once, read what it holds (under its guard), then
    /// what it lacks from below (through the filter when one is installed). With `zeros`,
    /// what reads as zeros is noted there instead of written.
    fn read_noting(&self, buf: &mut [u8], off: u64, mut zeros: ZeroNotes) -> Result<()> {
        let mode = if zeros.is_some() {
            MapMode::SPARSE
        } else {
            MapMode::READ
        };
        let mapped = self.layer.map(off, buf.len() as u64, mode)?;
        let filter = self.filter.get();
        if let Some(f) = filter {
            f.request(mapped.misses());
        }
        for run in &mapped.runs {
            let skip = match run.map {
                Mapping::Unallocated => true,
                Mapping::Zero { .. } => zeros.is_some(),
                _ => false,
            };
            if !skip {
                let at = (run.off - off) as usize;
                self.layer
                    .read_run(&mut buf[at..at + run.len as usize], run)?;
            }
        }
        // What comes from below is read with this layer's guard let go.
        let Mapped { runs, guard } = mapped;
        drop(guard);
        for run in runs {
            let at = (run.off - off) as usize;
            let dst = &mut buf[at..at + run.len as usize];
            match (run.map, filter) {
                (Mapping::Unallocated, Some(f)) => f.read_unallocated(self, dst, run.off)?,
                (Mapping::Unallocated, None) => {
                    read_from(self.backing(), dst, run.off, zeros.as_deref_mut())?
                }
                (Mapping::Zero { .. }, _) => {
                    if let Some(z) = zeros.as_deref_mut() {
                        z.push((run.off, run.len));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Read `dst` at `pos` as it is now: this layer's clusters, what is unallocated here from
    /// below, never through the read filter (the filter's own reads).
    pub fn read_unfiltered(&self, dst: &mut [u8], pos: u64) -> Result<()> {
        let mapped = self.layer.map(pos, dst.len() as u64, MapMode::READ)?;
        for run in mapped.runs.iter().filter(|r| r.map != Mapping::Unallocated) {
            let at = (run.off - pos) as usize;
            self.layer
                .read_run(&mut dst[at..at + run.len as usize], run)?;
        }
        let Mapped { runs, guard } = mapped;
        drop(guard);
        for run in runs.iter().filter(|r| r.map == Mapping::Unallocated) {
            let at = (run.off - pos) as usize;
            read_from(
                self.backing(),
                &mut dst[at..at + run.len as usize],
                run.off,
                None,
            )?;
        }
        Ok(())
    }

    /// Read from the chain below this layer; past its end (or without one) reads zeros.
    pub fn read_below(&self, dst: &mut [u8], pos: u64) -> Result<()> {
        read_from(self.backing(), dst, pos, None)
    }

    /// Split `[off, off+len)` into runs that metadata alone proves read as zeros and runs
    /// that may hold data, without reading data. Used to skip reading holes.
    pub fn zero_runs(&self, off: u64, len: u64) -> Result<Vec<ZeroRun>> {
        let mut out: Vec<ZeroRun> = Vec::new();
        let mut push = |off: u64, len: u64, zero: bool| match out.last_mut() {
            Some(l) if l.zero == zero && l.off + l.len == off => l.len += len,
            _ => out.push(ZeroRun { off, len, zero }),
        };
        let end = (off + len).min(self.virtual_size());
        let mut pos = off;
        while pos < end {
            let st = self.chain_status(pos, end - pos)?;
            push(pos, st.length, st.zero);
            pos += st.length;
        }
        if end < off + len {
            // Past the virtual size reads as zeros.
            let from = end.max(off);
            push(from, off + len - from, true);
        }
        Ok(out)
    }

    /// Status of the run at `off` (at most `len` bytes, within the virtual size) walking down
    /// the chain from this image, as QEMU's block status reports it (`qemu-img map`): the
    /// layer that holds it and what it holds there. Reads only metadata.
    pub fn chain_status(&self, off: u64, len: u64) -> Result<Extent> {
        if len == 0 {
            return Ok(Extent {
                start: off,
                length: 0,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        let mut img = self;
        let mut depth = 0;
        let mut len = len;
        loop {
            if let Some(e) = img.layer.status_within(off, len) {
                let mut e = e?;
                e.depth += depth;
                return Ok(e);
            }
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
            let mut mapped = img.layer.map(off, len, MapMode::STATUS)?;
            drop(mapped.guard.take());
            let run = mapped.runs[0];
            let n = run.len;
            return Ok(match run.map {
                // In a metadata-preallocated image QEMU asks the file system whether the
                // host range holds data; a hole reads as zeros.
                Mapping::Data { host } if img.layer.data_may_be_holes()? => {
                    match file_status(img.storage(), host, n)? {
                        (FileStatus::Data, m) => st(true, false, true, false, Some(host), m),
                        (FileStatus::Hole, m) => st(true, true, true, false, Some(host), m),
                        (FileStatus::Eof, _) => st(true, true, true, false, Some(host), n),
                    }
                }
                Mapping::Data { host } => st(true, false, true, false, Some(host), n),
                Mapping::Zero { host } => st(true, true, false, false, host, n),
                Mapping::Compressed { .. } => st(true, false, true, true, None, n),
                Mapping::Stored => st(true, false, true, false, None, n),
                Mapping::Unallocated => match img.backing() {
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

    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.layer.write_at(buf, off, &Below(self.backing()))
    }

    /// Make a range read as zeros (qcow2: zero clusters where whole; raw: written zeros).
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.layer.write_zeroes(off, len, &Below(self.backing()))
    }

    /// Write cached metadata in safe order; `durable` syncs to stable storage.
    pub fn flush(&self, durable: bool) -> Result<()> {
        self.layer.flush(durable)
    }
}
