//! `hoard add`: ingest a sealed cache, only the clusters it holds, deduplicated against
//! everything already hoarded.
//!
//! The cache's data is cut into 4 KiB chunks at guest offsets (file-system blocks). A chunk
//! of zeros is stored as a zero run; a chunk whose key is already in a pack (or earlier in
//! this add) is referred to; a new chunk goes into the current frame. Chunks are taken in
//! first-boot order (the cache's trace) and then in guest order, so a boot's reads meet
//! consecutive frames. Frames are compressed by worker threads while the main thread reads
//! and hashes; the main thread writes them to the pack in order.
//!
//! Crash safety: packs are written to temporary files, synced, renamed to their id; only
//! then is the index written (synced, renamed into place). A kill at any point leaves the
//! hoard as it was, plus at worst a pack no index refers to (gc removes it).

use super::format::{self as hf, Key, CHUNK, ZERO_DATA_PACK, ZERO_PACK};
use super::index::{push_run, CacheIndex, IndexRun};
use super::pipe::{with_pipe, Pipe, PACK_CHUNKS};
use super::store::{Hoard, PackReader};
use crate::engine::layer::{Format, MapMode, Mapping};
use crate::engine::open::resolve_backing;
use crate::engine::{Image, OpenOptions};
use crate::format::ext::{CacheState, KIND as EXT_KIND};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Most data chunks a cache may hold (1 TiB): the add keeps 8 bytes per chunk in memory.
const MAX_DATA_CHUNKS: u64 = (1 << 40) / CHUNK;
/// Largest trace kept with a cache (a boot's trace takes a few bytes per read: kilobytes).
pub const MAX_TRACE_BYTES: u64 = 64 << 20;
/// Bytes read from the cache at a time.
const READ_BATCH: u64 = 1 << 20;

/// What to add.
pub struct AddOptions<'a> {
    pub name: String,
    /// Replace a cache of the same name.
    pub replace: bool,
    /// The cache's trace file (empty: none): its reads order the packing (first-boot order
    /// first), and it is kept with the cache (checkout writes it back). It must have been
    /// recorded over the cache's base, and be at most [`MAX_TRACE_BYTES`].
    pub trace: Vec<u8>,
    /// Called with (bytes done, bytes in all) as data is read.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
}

/// What an add did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AddReport {
    pub name: String,
    /// Guest bytes of data the cache holds (its data clusters).
    pub data_bytes: u64,
    /// Of those, in chunks of zeros (stored as zero runs).
    pub zero_bytes: u64,
    /// Bytes of chunks already in the hoard (referred to, not stored again).
    pub dedup_bytes: u64,
    /// Unique new chunks stored, and the bytes they take in packs (compressed, with tables).
    pub new_chunks: u64,
    pub new_pack_bytes: u64,
    pub seconds: f64,
}

/// A chunk's place: (pack number in this add's list, chunk in the pack), or zeros.
type Ref = (u32, u32);
const ZERO: Ref = (ZERO_PACK, 0);
const ZERO_DATA: Ref = (ZERO_DATA_PACK, 0);

/// The data ranges of a cache: (first guest chunk, chunks, zero) in guest order.
fn content(img: &Image) -> Result<Vec<(u64, u64, bool)>> {
    let size = img.virtual_size();
    let mapped = img.layer().map(0, size, MapMode::READ)?;
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for r in &mapped.runs {
        let zero = match r.map {
            Mapping::Unallocated => continue,
            Mapping::Zero { .. } => true,
            _ => false,
        };
        // Clusters are at least 4 KiB (checked), so runs start on chunk boundaries; the
        // last one may end inside a chunk (a virtual size not a multiple of 4 KiB).
        let (a, b) = (r.off / CHUNK, r.end().div_ceil(CHUNK));
        match out.last_mut() {
            Some(l) if l.2 == zero && l.0 + l.1 == a => l.1 += b - a,
            _ => out.push((a, b - a, zero)),
        }
    }
    Ok(out)
}

/// Add the sealed cache at `cache` to the hoard.
pub fn add(hoard: &Hoard, cache: &Path, o: &AddOptions) -> Result<AddReport> {
    let t0 = std::time::Instant::now();
    super::store::check_name(&o.name)?;
    let lock = hoard.lock()?;
    hoard.sync_view()?;
    let mut caches = hoard.head_caches()?;
    if !o.replace && caches.contains_key(&o.name) {
        return Err(Error::refused(
            cache,
            format!(
                "a cache named '{}' is already hoarded (`hoard rm {}` first, --replace, or another --name)",
                o.name, o.name
            ),
        ));
    }
    let opts = OpenOptions {
        backing: false,
        lock: true,
        ..OpenOptions::read_only()
    };
    let img = Image::open(cache, &opts)?;
    let q = match (img.format(), img.as_qcow2()) {
        (Format::Qcow2, Some(q)) => q,
        _ => {
            return Err(Error::refused(
                cache,
                "a cache to hoard must be a qcow2 vmicache cache",
            ))
        }
    };
    let meta = q.cache_meta()?.ok_or_else(|| {
        Error::refused(cache, "not a vmicache cache (no vmicache header extension)")
    })?;
    if meta.state != CacheState::Sealed {
        return Err(Error::refused(
            cache,
            format!(
                "cache is {}, not sealed: only sealed caches are hoarded (`vmicache seal {}`)",
                meta.state.name(),
                cache.display()
            ),
        ));
    }
    let order = match o.trace.is_empty() {
        true => Vec::new(),
        false => {
            let bad = |w: String| Error::refused(cache, format!("its trace: {w}"));
            if o.trace.len() as u64 > MAX_TRACE_BYTES {
                return Err(bad(format!("{} B, more than a trace takes", o.trace.len())));
            }
            let t = crate::format::trace::Trace::decode(&o.trace).map_err(bad)?;
            let base = meta.base.as_ref();
            if base.is_none_or(|b| {
                b.virtual_size != t.base_size || b.fingerprint != t.base_fingerprint
            }) {
                return Err(bad("recorded over another base than this cache's".into()));
            }
            t.reads
        }
    };
    let header = q.header();
    let geo = q.geometry();
    if geo.cluster_size() < CHUNK {
        return Err(Error::unsupported(
            cache,
            format!(
                "clusters of {} B in a hoard (4 KiB or larger)",
                geo.cluster_size()
            ),
        ));
    }
    let backing_file = match &header.backing_file {
        None => None,
        Some(n) => {
            let p = resolve_backing(cache, n)?;
            let abs = if crate::engine::open::is_opener_uri(n) {
                p
            } else {
                std::path::absolute(&p).map_err(|e| Error::io(&p, "resolve", e))?
            };
            Some(abs.to_string_lossy().into_owned())
        }
    };
    let extension = header
        .extensions
        .iter()
        .find(|e| e.kind == EXT_KIND)
        .map(|e| e.data.clone())
        .unwrap_or_default();

    // What is already stored: every pack's keys.
    let mut packs: Vec<[u8; 32]> = Vec::new();
    let mut known: HashMap<Key, Ref> = HashMap::new();
    for id in hoard.pack_ids()? {
        let pr = match PackReader::open(&hoard.pack_path(&id)) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("{e}: not deduplicated against (`hoard verify`)");
                continue;
            }
        };
        let keys = match pr.keys() {
            Ok(k) => k,
            Err(e) => {
                log::warn!("{e}: not deduplicated against (`hoard verify`)");
                continue;
            }
        };
        let n = packs.len() as u32;
        packs.push(id);
        known.reserve(keys.len());
        for (c, k) in keys.into_iter().enumerate() {
            known.entry(k).or_insert((n, c as u32));
        }
    }

    let ranges = content(&img)?;
    let size = img.virtual_size();
    // Data chunks are numbered by rank across the data ranges.
    let data: Vec<(u64, u64, u64)> = {
        let mut rank = 0;
        ranges
            .iter()
            .filter(|r| !r.2)
            .map(|&(a, n, _)| {
                rank += n;
                (a, n, rank - n)
            })
            .collect()
    };
    let total: u64 = data.iter().map(|d| d.1).sum();
    if total > MAX_DATA_CHUNKS {
        return Err(Error::refused(
            cache,
            format!(
                "holds {} B of data: a hoard takes caches of up to 1 TiB (boot working sets)",
                total * CHUNK
            ),
        ));
    }
    let mut refs: Vec<Ref> = vec![ZERO; total as usize];
    let mut emitted = vec![false; total as usize];
    let rank_of = |c: u64| -> Option<u64> {
        let i = data.partition_point(|d| d.0 + d.1 <= c);
        data.get(i).filter(|d| d.0 <= c).map(|d| d.2 + c - d.0)
    };

    // The order chunks are taken in: the trace's reads, then everything in guest order.
    let mut segments: Vec<(u64, u64)> = Vec::new(); // (first guest chunk, chunks)
                                                    // A trace that keeps naming the same chunks (or a hostile one) gets a bounded walk.
    let mut budget = total.saturating_mul(4).max(1 << 20);
    for &(off, len) in &order {
        if budget == 0 {
            break;
        }
        let (a, b) = (off / CHUNK, off.saturating_add(len).div_ceil(CHUNK));
        let mut c = a;
        while c < b {
            let Some(r) = rank_of(c) else {
                // Not data: skip to the next data range.
                let i = data.partition_point(|d| d.0 + d.1 <= c);
                c = data.get(i).map_or(b, |d| d.0.max(c + 1));
                continue;
            };
            budget = budget.saturating_sub(1);
            if budget == 0 {
                break;
            }
            if !emitted[r as usize] {
                emitted[r as usize] = true;
                match segments.last_mut() {
                    Some(s) if s.0 + s.1 == c => s.1 += 1,
                    _ => segments.push((c, 1)),
                }
            }
            c += 1;
        }
    }
    for &(a, n, r0) in &data {
        for i in 0..n {
            if !emitted[(r0 + i) as usize] {
                let c = a + i;
                match segments.last_mut() {
                    Some(s) if s.0 + s.1 == c => s.1 += 1,
                    _ => segments.push((c, 1)),
                }
            }
        }
    }
    drop(emitted);

    let frame_chunks = hoard.settings.frame_chunks as usize;
    let base_pack = packs.len() as u32;
    let mut report = AddReport {
        name: o.name.clone(),
        data_bytes: 0,
        zero_bytes: 0,
        dedup_bytes: 0,
        new_chunks: 0,
        new_pack_bytes: 0,
        seconds: 0.0,
    };
    let all = (total * CHUNK).min(size);
    let ((), written) = with_pipe(hoard, hoard.settings.level, |pipe| {
        let mut cx = Ingest {
            img: &img,
            rank_of: &rank_of,
            known: &mut known,
            refs: &mut refs,
            report: &mut report,
            o,
            all,
            frame_chunks,
            pack: base_pack,
            in_pack: 0,
        };
        cx.run(&segments, pipe)
    })?;
    // The pack list of the index: the packs its runs name, in the order first named.
    let mut local: HashMap<u32, u32> = HashMap::new();
    let mut ids: Vec<[u8; 32]> = Vec::new();
    let mut id_of = |p: u32| -> Result<u32> {
        if let Some(&l) = local.get(&p) {
            return Ok(l);
        }
        let id = if p < base_pack {
            packs[p as usize]
        } else {
            *written
                .ids
                .get(&p)
                .ok_or_else(|| Error::corrupt(cache, "lost a pack written"))?
        };
        local.insert(p, ids.len() as u32);
        ids.push(id);
        Ok(ids.len() as u32 - 1)
    };
    let mut runs: Vec<IndexRun> = Vec::new();
    for &(a, n, zero) in &ranges {
        if zero {
            // Zero clusters: whole runs (split by push_run at the count's limit).
            let mut c = a;
            while c < a + n {
                let k = (a + n - c).min(u64::from(u32::MAX)) as u32;
                push_run(&mut runs, c, k, ZERO_PACK, 0);
                c += u64::from(k);
            }
            continue;
        }
        for c in a..a + n {
            let (p, k) = refs[rank_of(c).unwrap() as usize];
            let pack = if p >= ZERO_DATA_PACK { p } else { id_of(p)? };
            push_run(&mut runs, c, 1, pack, k);
        }
    }
    let idx = CacheIndex {
        virtual_size: size,
        cluster_bits: geo.cluster_bits,
        backing_file,
        backing_format: header.backing_format.clone(),
        extension,
        trace: o.trace.clone(),
        packs: ids,
        runs,
    };
    caches.insert(o.name.clone(), hoard.put_index(&idx)?);
    hoard.commit(&lock, &format!("add {}", o.name), &caches)?;
    report.new_pack_bytes = written.bytes;
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Reading, hashing and deduplicating a cache's chunks, sending new ones off in frames.
struct Ingest<'a> {
    img: &'a Image,
    rank_of: &'a dyn Fn(u64) -> Option<u64>,
    known: &'a mut HashMap<Key, Ref>,
    refs: &'a mut [Ref],
    report: &'a mut AddReport,
    o: &'a AddOptions<'a>,
    all: u64,
    frame_chunks: usize,
    /// The pack new chunks go to, and chunks in it so far.
    pack: u32,
    in_pack: u32,
}

impl Ingest<'_> {
    fn run(&mut self, segments: &[(u64, u64)], pipe: &mut Pipe) -> Result<()> {
        let size = self.img.virtual_size();
        let fc = self.frame_chunks;
        let mut raw: Vec<u8> = Vec::with_capacity(fc * CHUNK as usize);
        let mut keys: Vec<Key> = Vec::with_capacity(fc);
        let mut buf = vec![0u8; READ_BATCH as usize];
        for &(first, n) in segments {
            let mut c = first;
            while c < first + n {
                let k = (first + n - c).min(READ_BATCH / CHUNK);
                let off = c * CHUNK;
                let len = (k * CHUNK).min(size - off);
                let b = &mut buf[..(k * CHUNK) as usize];
                b[len as usize..].fill(0);
                self.img.read_at(&mut b[..len as usize], off)?;
                for (i, chunk) in b.chunks_exact(CHUNK as usize).enumerate() {
                    let g = c + i as u64;
                    let rank = (self.rank_of)(g).expect("segments are data") as usize;
                    let bytes = CHUNK.min(size - g * CHUNK);
                    self.report.data_bytes += bytes;
                    if crate::engine::qcow2::is_zero(chunk) {
                        self.refs[rank] = ZERO_DATA;
                        self.report.zero_bytes += bytes;
                        continue;
                    }
                    let key = hf::key_of(chunk);
                    if let Some(&r) = self.known.get(&key) {
                        self.refs[rank] = r;
                        self.report.dedup_bytes += bytes;
                        continue;
                    }
                    if self.in_pack == PACK_CHUNKS {
                        if !keys.is_empty() {
                            pipe.push(
                                self.pack,
                                std::mem::take(&mut raw),
                                std::mem::take(&mut keys),
                            )?;
                        }
                        self.pack += 1;
                        self.in_pack = 0;
                    }
                    let r = (self.pack, self.in_pack);
                    self.in_pack += 1;
                    self.known.insert(key, r);
                    self.refs[rank] = r;
                    self.report.new_chunks += 1;
                    raw.extend_from_slice(chunk);
                    keys.push(key);
                    if keys.len() == fc {
                        pipe.push(
                            self.pack,
                            std::mem::take(&mut raw),
                            std::mem::take(&mut keys),
                        )?;
                        raw.reserve(fc * CHUNK as usize);
                    }
                }
                c += k;
                if let Some(p) = self.o.progress {
                    p(self.report.data_bytes, self.all);
                }
            }
        }
        if !keys.is_empty() {
            pipe.push(self.pack, raw, keys)?;
        }
        Ok(())
    }
}
