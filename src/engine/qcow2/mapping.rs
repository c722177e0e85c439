//! Mapping at this layer: L1/L2 lookup and decoding, the layer mapping (reads and block
//! status alike), and walks over every mapped cluster.

use super::{Meta, Qcow2};
use crate::engine::layer::{MapMode, Mapped, Mapping, Run};
use crate::format::table::{L1Entry, L2Entry, L2Mapping};
use crate::format::types::GuestOffset;
use crate::Result;
use std::collections::HashMap;

/// An L2 entry looked up.
#[derive(Clone, Copy)]
enum Look {
    /// The entry, in the table at this host offset.
    Entry(u64, L2Entry),
    /// No L2 table: unallocated.
    NoTable,
    /// The table is not cached.
    Missing,
}

/// A mapping walk in progress.
struct Walk {
    out: Vec<Run>,
    pos: u64,
    end: u64,
    mode: MapMode,
    /// The table stamped last (each is stamped once per walk).
    stamped: Option<u64>,
    done: bool,
}

impl Walk {
    fn new(off: u64, len: u64, mode: MapMode) -> Walk {
        Walk {
            out: Vec::new(),
            pos: off,
            end: off + len,
            mode,
            stamped: None,
            done: false,
        }
    }
}

/// Guest bytes mapped at once by walks over whole ranges (bounds their run lists).
const MAP_STEP: u64 = 1 << 30;

/// Whether a piece mapped `map` continues the run `last` (contiguous host data; zeros; for
/// block status also contiguous preallocated zeros and compressed clusters).
fn continues(last: &Run, map: Mapping, mode: MapMode) -> bool {
    match (last.map, map) {
        (Mapping::Data { host: a }, Mapping::Data { host: b }) => a + last.len == b,
        (Mapping::Unallocated, Mapping::Unallocated) => true,
        (Mapping::Zero { host: a }, Mapping::Zero { host: b }) => match (mode.status, a, b) {
            (false, _, _) | (true, None, None) => true,
            (true, Some(a), Some(b)) => a + last.len == b,
            _ => false,
        },
        (Mapping::Compressed { .. }, Mapping::Compressed { .. }) => mode.status,
        _ => false,
    }
}

impl Qcow2 {
    /// The L2 entry for a guest cluster, loading its table if needed; None if no L2 table.
    pub(super) fn entry(&self, m: &mut Meta, g: GuestOffset) -> Result<L2Entry> {
        let l1i = self.geo.l1_index(g) as usize;
        let Some(l2off) = self.l2_offset(m, l1i)? else {
            return Ok(L2Entry::UNALLOCATED);
        };
        let t = self.load_l2(m, l2off)?;
        Ok(L2Entry(t.entries[self.geo.l2_index(g)]))
    }

    pub(super) fn l2_offset(&self, m: &Meta, l1i: usize) -> Result<Option<u64>> {
        let Some(&e) = m.l1.get(l1i) else {
            return Ok(None);
        };
        let off = L1Entry(e)
            .l2_offset(&self.geo)
            .map_err(|e| e.at(self.path()))?;
        if let Some(o) = off {
            if o.0 == 0 || o.0 >= self.file_bound(m) {
                return Err(self.corrupt(format!(
                    "L1 entry {l1i} points at {:#x}, outside the image",
                    o.0
                )));
            }
        }
        Ok(off.map(|o| o.0))
    }

    /// Host offsets at or past this are outside the image (allowing for our own unflushed
    /// allocations).
    fn file_bound(&self, m: &Meta) -> u64 {
        m.rc.high_water() << self.geo.cluster_bits
    }

    pub(super) fn decode(&self, m: &Meta, e: L2Entry) -> Result<L2Mapping> {
        let map = e
            .mapping(&self.geo, self.v3)
            .map_err(|e| e.at(self.path()))?;
        let bound = self.file_bound(m);
        match map {
            L2Mapping::Data { host, .. }
            | L2Mapping::Zero {
                prealloc: Some(host),
                ..
            } if host.0 >= bound => Err(self.corrupt(format!(
                "data cluster at {:#x} lies past the end of the image",
                host.0
            ))),
            L2Mapping::Compressed { host, .. } if host.0 >= bound => Err(self.corrupt(format!(
                "compressed cluster at {:#x} lies past the end of the image",
                host.0
            ))),
            _ => Ok(map),
        }
    }

    /// The L2 entry for guest offset `g` from the cached tables only.
    fn look_cached(&self, m: &Meta, g: GuestOffset) -> Result<Look> {
        let l1i = self.geo.l1_index(g) as usize;
        let Some(l2off) = self.l2_offset(m, l1i)? else {
            return Ok(Look::NoTable);
        };
        match m.l2.get(&l2off) {
            Some(t) => Ok(Look::Entry(l2off, L2Entry(t.entries[self.geo.l2_index(g)]))),
            None => Ok(Look::Missing),
        }
    }

    /// The L2 entry for guest offset `g`, loading its table when it is not cached.
    fn look_loading(&self, m: &mut Meta, g: GuestOffset) -> Result<Look> {
        let l1i = self.geo.l1_index(g) as usize;
        let Some(l2off) = self.l2_offset(m, l1i)? else {
            return Ok(Look::NoTable);
        };
        let t = self.load_l2(m, l2off)?;
        Ok(Look::Entry(l2off, L2Entry(t.entries[self.geo.l2_index(g)])))
    }

    /// Take one lookup at `w.pos` into the walk: merge it into the last run, start a new
    /// one, or end the walk (`mode.max_runs` reached). Each table is stamped once for the LRU.
    fn step(&self, m: &Meta, w: &mut Walk, look: Look) -> Result<()> {
        let pos = w.pos;
        let inc = self.geo.in_cluster(pos);
        let (map, n) = match look {
            // No L2 table: the whole span it would map is unallocated.
            Look::NoTable | Look::Missing => {
                let span = self.geo.l2_span();
                (
                    Mapping::Unallocated,
                    ((pos / span + 1) * span).min(w.end) - pos,
                )
            }
            Look::Entry(l2off, e) => {
                if w.stamped != Some(l2off) {
                    w.stamped = Some(l2off);
                    self.stamp(m, l2off);
                }
                let n = (self.geo.cluster_size() - inc).min(w.end - pos);
                let map = match self.decode(m, e)? {
                    L2Mapping::Unallocated => Mapping::Unallocated,
                    L2Mapping::Zero { prealloc, .. } => Mapping::Zero {
                        host: prealloc.map(|h| h.0 + inc),
                    },
                    L2Mapping::Data { host, .. } => Mapping::Data { host: host.0 + inc },
                    L2Mapping::Compressed { host, len } => {
                        Mapping::Compressed { host: host.0, len }
                    }
                };
                (map, n)
            }
        };
        if let Some(last) = w.out.last_mut() {
            if continues(last, map, w.mode) {
                last.len += n;
                w.pos += n;
                return Ok(());
            }
            if w.out.len() >= w.mode.max_runs {
                w.done = true;
                return Ok(());
            }
        }
        w.out.push(Run {
            off: pos,
            len: n,
            map,
        });
        w.pos += n;
        Ok(())
    }

    /// `Layer::map`: under the shared lock while every table needed is cached; at the first
    /// table missing, the whole walk again under the exclusive lock, loading tables as it
    /// goes (one pass, however many tables it needs and the cache holds).
    pub(super) fn map_range(&self, off: u64, len: u64, mode: MapMode) -> Result<Mapped<'_>> {
        self.check_range(off, len)?;
        // Block status answers may be short: a walk loads no more than a bounded span of
        // tables under the exclusive lock (its callers ask again from where it stopped).
        let len = if mode.max_runs == usize::MAX {
            len
        } else {
            len.min(MAP_STEP)
        };
        {
            let m = self.lock_shared();
            let mut w = Walk::new(off, len, mode);
            let mut all_cached = true;
            while !w.done && w.pos < w.end {
                match self.look_cached(&m, GuestOffset(w.pos))? {
                    Look::Missing => {
                        all_cached = false;
                        break;
                    }
                    l => self.step(&m, &mut w, l)?,
                }
            }
            if all_cached {
                let guard = self.gate(&m);
                return Ok(Mapped {
                    runs: w.out,
                    guard: Some(guard),
                });
            }
        }
        let mut m = self.lock();
        let mut w = Walk::new(off, len, mode);
        while !w.done && w.pos < w.end {
            let l = self.look_loading(&mut m, GuestOffset(w.pos))?;
            self.step(&m, &mut w, l)?;
        }
        let guard = self.gate(&m);
        Ok(Mapped {
            runs: w.out,
            guard: Some(guard),
        })
    }

    /// Guest clusters in `[off, off+len)` that are unallocated at this layer, as
    /// cluster-aligned (offset, length) runs clipped to the virtual size.
    pub fn unallocated_runs(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let end = (off + len).min(self.size);
        let start = self.geo.align_down(off);
        if start >= end {
            return Ok(out);
        }
        // In bounded steps: a read mapping has a run per compressed cluster.
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(MAP_STEP);
            let mapped = self.map_range(pos, n, MapMode::READ)?;
            for r in mapped.runs.iter().filter(|r| r.map == Mapping::Unallocated) {
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == r.off => l.1 += r.len,
                    _ => out.push((r.off, r.len)),
                }
            }
            pos += n;
        }
        Ok(out)
    }

    /// Whether the image looks metadata-preallocated: far more clusters have a refcount than
    /// the file has blocks on disk. QEMU (`qcow2_detect_metadata_preallocation`) then asks the
    /// file system about data clusters in block-status queries, so `map` does too.
    pub fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.preallocated.get() {
            return Ok(v);
        }
        let cs = self.geo.cluster_size();
        let real_clusters = self.storage.allocated_bytes()? / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = self.storage.len()?.div_ceil(cs);
        let mut m = self.lock();
        let mut count = 0;
        let mut c = 0;
        while c < end && count < threshold {
            if m.rc.get(&*self.storage, c)? != 0 {
                count += 1;
            }
            c += 1;
        }
        let v = count >= threshold;
        let _ = self.preallocated.set(v);
        Ok(v)
    }

    /// Every guest cluster this layer maps (data, zero or compressed), in guest order, as
    /// `f(guest cluster index, mapping)`; unallocated clusters are skipped. The metadata lock is
    /// not held while `f` runs, so `f` may read the image.
    pub fn for_each_mapping(&self, mut f: impl FnMut(u64, L2Mapping) -> Result<()>) -> Result<()> {
        let guest_clusters = self.geo.clusters_for(self.size);
        let per = self.geo.l2_entries();
        let l1n = self.geo.l1_entries_for(self.size) as usize;
        for l1i in 0..l1n {
            let maps = {
                let mut m = self.lock();
                let Some(off) = self.l2_offset(&m, l1i)? else {
                    continue;
                };
                let entries = self.load_l2(&mut m, off)?.entries.clone();
                let n = (guest_clusters - l1i as u64 * per).min(per) as usize;
                let maps = entries[..n]
                    .iter()
                    .map(|&e| self.decode(&m, L2Entry(e)))
                    .collect::<Result<Vec<_>>>()?;
                maps
            };
            for (i, map) in maps.into_iter().enumerate() {
                if map != L2Mapping::Unallocated {
                    f(l1i as u64 * per + i as u64, map)?;
                }
            }
        }
        Ok(())
    }

    /// Guest clusters of this layer by kind, how many share their stored data, and the host
    /// bytes that data takes: walks L2.
    pub fn allocated_clusters(&self) -> Result<AllocStats> {
        let mut s = AllocStats::default();
        // Plain data host offsets and compressed descriptors -> references at this layer.
        let mut plain: HashMap<u64, (u64, bool)> = HashMap::new();
        let mut packed: HashMap<(u64, u64), u64> = HashMap::new();
        self.for_each_mapping(|_, map| {
            match map {
                L2Mapping::Unallocated => {}
                L2Mapping::Zero { .. } => s.zero += 1,
                L2Mapping::Data { host, copied } => {
                    s.data += 1;
                    let e = plain.entry(host.0).or_insert((0, false));
                    e.0 += 1;
                    e.1 |= !copied;
                }
                L2Mapping::Compressed { host, len } => {
                    s.compressed += 1;
                    *packed.entry((host.0, len)).or_insert(0) += 1;
                }
            }
            Ok(())
        })?;
        let cs = self.geo.cluster_size();
        for (n, uncopied) in plain.values() {
            if *n > 1 || *uncopied {
                s.shared += n;
            }
            s.stored_bytes += cs;
        }
        for ((_, len), n) in &packed {
            if *n > 1 {
                s.shared += n;
            }
            s.stored_bytes += len.min(&cs);
        }
        Ok(s)
    }
}

/// Guest clusters by kind at one layer.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct AllocStats {
    pub data: u64,
    pub zero: u64,
    pub compressed: u64,
    /// Data and compressed clusters whose stored bytes other guest clusters use too (an L2
    /// entry without COPIED, or a host cluster or descriptor referenced more than once).
    pub shared: u64,
    /// Host bytes the data takes: distinct data clusters, plus the distinct compressed
    /// descriptors' bytes (to the end of their last 512-byte sector).
    pub stored_bytes: u64,
}

impl AllocStats {
    /// Guest bytes of data (plain and compressed clusters) less the host bytes storing them.
    pub fn saved_bytes(&self, cluster_size: u64) -> u64 {
        ((self.data + self.compressed) * cluster_size).saturating_sub(self.stored_bytes)
    }
}
