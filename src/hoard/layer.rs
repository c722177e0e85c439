//! A hoarded cache as a layer of a chain, read in place from its packs.
//!
//! Its index (`caches/NAME.vmh`) is the file a chain names; its runs answer what is at a
//! range: zeros, data in packs ([`Mapping::Stored`]), or nothing (the base answers). It is
//! sealed: never written, no copy-on-read into it. Frames are decompressed and checked
//! against their BLAKE3 on first use and kept in a small cache of decompressed frames; a
//! damaged frame fails the read (EIO over NBD, and a log line), never returns wrong data.
//!
//! Packs are opened when the layer is, and kept open: a gc that repacks while a server reads
//! unlinks files this layer still holds, which stay readable.

use super::ahead::{Scan, Uses, MAX_USES};
use super::format::CHUNK;
use super::frames::FrameCache;
use super::index::CacheIndex;
use super::parts::{cut_at_frames, FrameEdges, FramePart};
use super::store::{read_index_from, PackReader};
use crate::engine::layer::{BackingRead, Format, Layer, MapMode, Mapped, Mapping, Run, SharedPart};
use crate::engine::open::{place_backing, resolve_backing};
use crate::engine::storage::{FileStorage, Storage};
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheMeta;
use crate::{Error, Result};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Decompressed frames kept per open hoarded cache. A frame holds chunks in first-boot order,
/// so a read in guest order meets most frames several times, far apart. With least recently
/// used eviction alone, a sequential read of the derived set's largest cache decoded ~1400
/// frames of 32 chunks with 32 kept, ~1380 with 64, for the 1231 it uses; ~800 of the
/// repacked 64-chunk frames with 16 kept, ~750 with 32, for 620.
const FRAME_CACHE_FRAMES: usize = 64;
/// The frame cache's bounds in bytes, whatever the frames' size: the upper one because every
/// open hoarded cache (one per served chain) keeps its own, as long as it is open.
const FRAME_CACHE_MIN: usize = 4 << 20;
const FRAME_CACHE_MAX: usize = 8 << 20;
/// While reads come in guest order, the frame cache may hold this many times as much, and
/// lets go first of the frame the scan needs furthest ahead ([`Uses`]). The sequential read
/// above then decodes 1231-1240 and 633-644 frames (several runs; 1296 and 695 with no more
/// room). Reads out of order bring it back to its bounds, two frames out for each one in.
const SCAN_FACTOR: usize = 2;

/// What a hoarded cache holds, counted in clusters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Clusters {
    pub data: u64,
    pub zero: u64,
    pub data_bytes: u64,
}

/// An open hoarded cache.
#[derive(Debug)]
pub struct HoardLayer {
    storage: Box<dyn Storage>,
    index: CacheIndex,
    packs: Vec<PackReader>,
    meta: Option<CacheMeta>,
    frames: FrameCache,
    scan: Scan,
    /// Built at the first read in guest order (`None`: its index could not be cut, or it uses
    /// its frames over `MAX_USES` times).
    uses: OnceLock<Option<Uses>>,
}

/// Where the packs of the index at `path` are: `HOARD/caches/x.vmh` → `HOARD/packs`.
fn packs_dir(path: &Path) -> PathBuf {
    let caches = path.parent().unwrap_or(Path::new("."));
    caches.parent().unwrap_or(Path::new(".")).join("packs")
}

impl HoardLayer {
    /// Open the index in `st` (the file at `path`) and the packs it names.
    pub fn open(path: &Path, st: Box<dyn Storage>) -> Result<HoardLayer> {
        Self::open_locked(path, st, false)
    }

    /// [`HoardLayer::open`]; `lock`: an index opened again (replaced by a gc meanwhile) takes
    /// a QEMU-compatible read lock as the first one did.
    pub fn open_locked(path: &Path, st: Box<dyn Storage>, lock: bool) -> Result<HoardLayer> {
        let mut st = st;
        // A gc may replace the index (and remove the packs it named) between our reading it
        // and opening its packs: read it again then; it must be the same cache repacked
        // (same geometry, base and extension), not another one put under the name.
        let mut first: Option<CacheIndex> = None;
        for attempt in 0.. {
            let index = {
                let f = st
                    .file()
                    .ok_or_else(|| Error::unsupported(path, "a hoarded cache not in a file"))?;
                read_index_from(f, path)?
            };
            if let Some(f) = &first {
                let same = f.virtual_size == index.virtual_size
                    && f.cluster_bits == index.cluster_bits
                    && f.backing_file == index.backing_file
                    && f.extension == index.extension;
                if !same {
                    return Err(Error::refused(
                        path,
                        "was replaced by another cache while it was being opened",
                    ));
                }
            } else {
                first = Some(index.clone());
            }
            match Self::open_packs(path, &index) {
                Ok(packs) => return Self::with(st, index, packs),
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && attempt < 3 =>
                {
                    let fs = FileStorage::open(path, false)?;
                    if lock {
                        use crate::engine::lock::{lock, LockMode};
                        lock(fs.file(), path, LockMode::Read)?;
                    }
                    st = Box::new(fs);
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    fn open_packs(path: &Path, index: &CacheIndex) -> Result<Vec<PackReader>> {
        let dir = packs_dir(path);
        index
            .packs
            .iter()
            .map(|id| PackReader::open(&dir.join(format!("{}.pack", super::format::hex(id)))))
            .collect()
    }

    fn with(st: Box<dyn Storage>, index: CacheIndex, packs: Vec<PackReader>) -> Result<HoardLayer> {
        let path = st.path().to_path_buf();
        for (i, r) in index.runs.iter().enumerate() {
            if !r.in_pack() {
                continue;
            }
            let have = packs[r.pack as usize].chunks();
            if r.first.checked_add(r.count).is_none_or(|e| e > have) {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "run {i} names chunks {}+{} of a pack of {have}",
                        r.first, r.count
                    ),
                ));
            }
        }
        let meta = if index.extension.is_empty() {
            None
        } else {
            Some(CacheMeta::decode(&index.extension).map_err(|e| e.at(&path))?)
        };
        let largest = (packs.iter())
            .flat_map(|p| p.frames.iter().map(|f| usize::from(f.chunks)))
            .max()
            .unwrap_or(0);
        let limit =
            (FRAME_CACHE_FRAMES * largest * CHUNK as usize).clamp(FRAME_CACHE_MIN, FRAME_CACHE_MAX);
        Ok(HoardLayer {
            storage: st,
            index,
            packs,
            meta,
            frames: FrameCache::new(limit, limit * SCAN_FACTOR),
            scan: Scan::default(),
            uses: OnceLock::new(),
        })
    }

    pub fn index(&self) -> &CacheIndex {
        &self.index
    }

    /// Clusters (of the cache's cluster size) holding data, and wholly zero; guest bytes of
    /// data chunks.
    pub fn clusters(&self) -> Clusters {
        let shift = self.index.cluster_bits - CHUNK.trailing_zeros();
        let mut out = Clusters::default();
        // Runs are in order, so a cluster's runs come together: (cluster, has data).
        let mut cur: Option<(u64, bool)> = None;
        let close = |c: Option<(u64, bool)>, out: &mut Clusters| match c {
            Some((_, true)) => out.data += 1,
            Some((_, false)) => out.zero += 1,
            None => {}
        };
        for r in &self.index.runs {
            if !r.is_zero() {
                out.data_bytes += (r.end() * CHUNK).min(self.index.virtual_size) - r.start * CHUNK;
            }
            let (a, b) = (r.start >> shift, (r.end() - 1) >> shift);
            for k in [a, b] {
                match &mut cur {
                    Some((c, d)) if *c == k => *d |= !r.is_zero(),
                    _ => {
                        close(cur.take(), &mut out);
                        cur = Some((k, !r.is_zero()));
                    }
                }
            }
            // Clusters strictly inside the run.
            if b > a + 1 {
                let inner = b - a - 1;
                if r.is_zero() {
                    out.zero += inner;
                } else {
                    out.data += inner;
                }
            }
        }
        close(cur, &mut out);
        out
    }

    /// The layer of `img`, if it is a hoarded cache.
    pub fn of(img: &Image) -> Option<&HoardLayer> {
        img.layer().as_any().downcast_ref::<HoardLayer>()
    }

    /// Every stored run cut at frame edges, in pack and frame order (a checkout decodes each
    /// frame once, then writes what the cache takes of it). Runs of zero chunks stored as
    /// data are left out: not in any pack.
    pub(super) fn frame_parts(&self) -> Result<Vec<FramePart>> {
        let mut out = Vec::new();
        cut_at_frames(&self.index, self.path(), &self.edges(), |p| {
            out.push(p);
            ControlFlow::Continue(())
        })?;
        out.sort_unstable_by_key(|p| (p.pack, p.frame, p.at));
        Ok(out)
    }

    /// Frame `frame` of pack `pack` decompressed and checked into `buf` (not cached).
    pub(super) fn decode_frame(&self, pack: u32, frame: u32, buf: Vec<u8>) -> Result<Vec<u8>> {
        self.packs[pack as usize].read_frame_into(frame as usize, buf)
    }

    /// Frame `f` of pack `p`, decompressed and checked (cached); `scan`: the chunk a read in
    /// guest order is at.
    fn frame(&self, p: u32, f: u32, scan: Option<u64>) -> Result<Arc<Vec<u8>>> {
        self.frames.get(
            (p, f),
            |buf| self.packs[p as usize].read_frame_into(f as usize, buf),
            scan.and_then(|pos| {
                let uses = self.uses.get_or_init(|| self.uses_table());
                uses.as_ref().map(|u| move |id| u.distance(id, pos))
            }),
        )
    }

    /// Where each frame is used, for reads in guest order (`None`: the index could not be
    /// cut, or it is too large to be worth it).
    fn uses_table(&self) -> Option<Uses> {
        let why = match Uses::of(&self.index, self.path(), &self.edges()) {
            Ok(Some(uses)) => return Some(uses),
            Ok(None) => format!(
                "{}: uses its frames over {MAX_USES} times",
                self.path().display()
            ),
            Err(e) => e.to_string(),
        };
        log::debug!("{why}: reads in guest order evict the least recently used frame");
        None
    }

    /// Where the frames of its packs start.
    fn edges(&self) -> Vec<FrameEdges<'_>> {
        self.packs.iter().map(FrameEdges::of).collect()
    }

    /// Whether the read of `len` bytes at `off` continues a scan in guest order.
    fn scanning(&self, off: u64, len: u64) -> bool {
        let end = off.saturating_add(len).div_ceil(CHUNK);
        self.scan
            .read(off / CHUNK, end, |a, b| self.stored_between(a, b))
    }

    /// Chunks stored in packs from guest chunk `a` to `b`, counted over at most 256 runs (more
    /// runs count as `u64::MAX`).
    fn stored_between(&self, a: u64, b: u64) -> u64 {
        let (Ok(i) | Err(i)) = self.index.find(a);
        let mut n = 0u64;
        for r in self.index.runs[i..].iter().take(256) {
            if r.start >= b {
                return n;
            }
            if r.in_pack() {
                n += r.end().min(b) - r.start.max(a);
            }
        }
        if self.index.runs.len() - i <= 256 {
            n
        } else {
            u64::MAX
        }
    }

    /// A stored run as slices of decompressed frames (and zeros), for sending without a copy.
    fn shared(&self, run: &Run) -> Result<Vec<SharedPart>> {
        self.check(run.off, run.len)?;
        let scan = self.scanning(run.off, run.len);
        let mut out: Vec<SharedPart> = Vec::new();
        let mut done = 0u64;
        while done < run.len {
            let pos = run.off + done;
            let c = pos / CHUNK;
            let i = self.index.find(c).map_err(|_| {
                Error::request(self.path(), format!("read of {pos:#x}: not in this cache"))
            })?;
            let r = self.index.runs[i];
            let in_run = r.end() * CHUNK - pos;
            if !r.in_pack() {
                let n = in_run.min(run.len - done);
                match out.last_mut() {
                    Some(SharedPart::Zero(z)) => *z += n,
                    _ => out.push(SharedPart::Zero(n)),
                }
                done += n;
                continue;
            }
            let pack = &self.packs[r.pack as usize];
            let chunk = r.first + (c - r.start) as u32;
            let fi = pack.frame_of(chunk);
            let fdata = self.frame(r.pack, fi as u32, scan.then_some(c))?;
            let at = (chunk - pack.first[fi]) as usize * CHUNK as usize + (pos % CHUNK) as usize;
            let n = ((fdata.len() - at) as u64).min(in_run).min(run.len - done) as usize;
            match out.last_mut() {
                // The next bytes of the same frame: one slice.
                Some(SharedPart::Bytes(b, o, l)) if Arc::ptr_eq(b, &fdata) && *o + *l == at => {
                    *l += n
                }
                // A small part of a frame is copied: a reply must not keep frames alive many
                // times its own size (chunks deduplicated into scattered frames).
                Some(SharedPart::Copied(v)) if n * 4 < fdata.len() => {
                    v.extend_from_slice(&fdata[at..at + n])
                }
                _ if n * 4 < fdata.len() => {
                    out.push(SharedPart::Copied(fdata[at..at + n].to_vec()))
                }
                _ => out.push(SharedPart::Bytes(fdata, at, n)),
            }
            done += n as u64;
        }
        Ok(out)
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        if off
            .checked_add(len)
            .is_none_or(|e| e > self.index.virtual_size)
        {
            return Err(Error::out_of_range(
                self.path(),
                format!(
                    "request {off:#x}+{len:#x} beyond the size {:#x}",
                    self.index.virtual_size
                ),
            ));
        }
        Ok(())
    }

    fn never_written(&self) -> Error {
        Error::read_only(self.path(), "a hoarded cache is sealed: never written")
    }
}

impl Layer for HoardLayer {
    fn path(&self) -> &Path {
        self.storage.path()
    }
    fn format(&self) -> Format {
        Format::Hoard
    }
    fn virtual_size(&self) -> u64 {
        self.index.virtual_size
    }
    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn map(&self, off: u64, len: u64, mode: MapMode) -> Result<Mapped<'_>> {
        self.check(off, len)?;
        let end = off + len;
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = off;
        while pos < end {
            let c = pos / CHUNK;
            let (next, map) = match self.index.find(c) {
                Ok(i) => {
                    let r = &self.index.runs[i];
                    let m = if r.is_zero() {
                        Mapping::Zero { host: None }
                    } else {
                        Mapping::Stored
                    };
                    (r.end().saturating_mul(CHUNK), m)
                }
                Err(i) => (
                    self.index
                        .runs
                        .get(i)
                        .map_or(u64::MAX, |r| r.start.saturating_mul(CHUNK)),
                    Mapping::Unallocated,
                ),
            };
            let next = next.min(end);
            let n = runs.len();
            match runs.last_mut() {
                Some(l) if l.map == map && l.end() == pos => l.len += next - pos,
                _ if n == mode.max_runs => break,
                _ => runs.push(Run {
                    off: pos,
                    len: next - pos,
                    map,
                }),
            }
            pos = next;
        }
        Ok(Mapped { runs, guard: None })
    }
    fn read_run(&self, dst: &mut [u8], run: &Run) -> Result<()> {
        match run.map {
            Mapping::Zero { .. } => {
                dst.fill(0);
                return Ok(());
            }
            Mapping::Stored => {}
            _ => {
                return Err(Error::request(
                    self.path(),
                    format!("read of {:#x}+{:#x}: not in this cache", run.off, run.len),
                ))
            }
        }
        self.check(run.off, dst.len() as u64)?;
        let scan = self.scanning(run.off, dst.len() as u64);
        let mut done = 0usize;
        while done < dst.len() {
            let pos = run.off + done as u64;
            let c = pos / CHUNK;
            let i = self.index.find(c).map_err(|_| {
                Error::request(self.path(), format!("read of {pos:#x}: not in this cache"))
            })?;
            let r = self.index.runs[i];
            // What this index run still covers.
            let in_run = (r.end() * CHUNK - pos) as usize;
            if !r.in_pack() {
                let n = in_run.min(dst.len() - done);
                dst[done..done + n].fill(0);
                done += n;
                continue;
            }
            let pack = &self.packs[r.pack as usize];
            let chunk = r.first + (c - r.start) as u32;
            let fi = pack.frame_of(chunk);
            let f0 = pack.first[fi];
            let fdata = self.frame(r.pack, fi as u32, scan.then_some(c))?;
            let at = (chunk - f0) as usize * CHUNK as usize + (pos % CHUNK) as usize;
            let n = (fdata.len() - at).min(in_run).min(dst.len() - done);
            dst[done..done + n].copy_from_slice(&fdata[at..at + n]);
            done += n;
        }
        Ok(())
    }
    fn read_shared(&self, run: &Run) -> Option<Result<Vec<SharedPart>>> {
        if run.map != Mapping::Stored {
            return None;
        }
        Some(self.shared(run))
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
    fn cache_meta(&self) -> Result<Option<CacheMeta>> {
        Ok(self.meta.clone())
    }
}

impl Drop for HoardLayer {
    fn drop(&mut self) {
        let n = self.frames.decoded();
        if n > 0 {
            log::debug!(
                "{}: closed; reads decoded {n} frames",
                self.path().display()
            );
        }
    }
}

/// The engine's driver for `vmicache-hoard` layers: the index at `path` (opened and locked
/// in `st`), over its base, which is reached only when a read needs it (a sealed cache).
pub fn open(path: &Path, st: Box<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
    if opts.write {
        return Err(Error::read_only(
            path,
            "a hoarded cache is sealed: never opened for writing",
        ));
    }
    let layer = HoardLayer::open_locked(path, st, opts.lock)?;
    let backing = match (&layer.index.backing_file, opts.backing) {
        (Some(name), true) => {
            let bpath = resolve_backing(path, name)?;
            place_backing(path, &bpath)?;
            // The header's backing format, else the one the cache recorded of its base.
            let recorded_format = (layer.meta.as_ref())
                .and_then(|m| m.base.as_ref())
                .map(|b| b.format.clone());
            let named = layer
                .index
                .backing_format
                .as_ref()
                .or(recorded_format.as_ref());
            let format = match named {
                None => None,
                Some(f) => Some(
                    Format::parse(f)
                        .ok_or_else(|| Error::unsupported(path, format!("backing format '{f}'")))?,
                ),
            };
            let recorded = layer
                .meta
                .as_ref()
                .and_then(|m| m.base.as_ref())
                .map(|b| b.virtual_size);
            let size = recorded.unwrap_or(layer.index.virtual_size);
            Some(Arc::new(Image::lazy_base(
                path, bpath, format, size, recorded, opts,
            )))
        }
        _ => None,
    };
    Ok(Image::new(Box::new(layer), backing))
}
