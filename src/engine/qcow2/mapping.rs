//! Mapping at this layer: L1/L2 lookup and decoding, request plans, block status, and
//! walks over every mapped cluster.

use super::cache::L2_CACHE_BYTES;
use super::{L2Table, LayerStatus, Meta, Qcow2, Source};
use crate::format::table::{self, L1Entry, L2Entry, L2Mapping};
use crate::format::types::{GuestOffset, HostOffset};
use crate::{Error, Result};
use std::collections::HashMap;

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

    pub(super) fn load_l2<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut L2Table> {
        use std::collections::hash_map::Entry;
        match m.l2.entry(off) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let mut b = vec![0u8; self.geo.cluster_size() as usize];
                self.storage.read_at(&mut b, off)?;
                Ok(v.insert(L2Table {
                    entries: table::decode_table(&b),
                    dirty: false,
                }))
            }
        }
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

    /// Split `[off, off+len)` into runs with one source each (contiguous host data merged).
    pub(super) fn plan(&self, m: &mut Meta, off: u64, len: u64) -> Result<Vec<(u64, u64, Source)>> {
        let mut out: Vec<(u64, u64, Source)> = Vec::new();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let inc = self.geo.in_cluster(pos);
            let n = (self.geo.cluster_size() - inc).min(end - pos);
            let e = self.entry(m, GuestOffset(pos))?;
            let src = match self.decode(m, e)? {
                L2Mapping::Unallocated => Source::Backing,
                L2Mapping::Zero { .. } => Source::Zero,
                L2Mapping::Data { host, .. } => Source::Data(HostOffset(host.0 + inc)),
                L2Mapping::Compressed { host, len } => Source::Compressed { host, len },
            };
            if let Some(last) = out.last_mut() {
                let merged = match (last.2, src) {
                    (Source::Data(a), Source::Data(b)) => a.0 + last.1 == b.0,
                    (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                    _ => false,
                };
                if merged {
                    last.1 += n;
                    pos += n;
                    continue;
                }
            }
            out.push((pos, n, src));
            pos += n;
        }
        Ok(out)
    }

    /// Status of the run starting at `off` (at most `len` bytes) at this layer only.
    pub fn block_status(&self, off: u64, len: u64) -> Result<(LayerStatus, u64)> {
        self.check_range(off, len)?;
        let mut m = self.lock();
        self.maybe_shrink(&mut m)?;
        let end = off + len;
        let mut pos = off;
        let mut first: Option<LayerStatus> = None;
        while pos < end {
            // No L2 table: the whole span it would map is unallocated.
            let l1i = self.geo.l1_index(GuestOffset(pos)) as usize;
            if self.l2_offset(&m, l1i)?.is_none() {
                if first.is_some_and(|f| f != LayerStatus::Unallocated) {
                    break;
                }
                first = Some(LayerStatus::Unallocated);
                let span = self.geo.l2_span();
                pos = ((pos / span + 1) * span).min(end);
                continue;
            }
            let inc = self.geo.in_cluster(pos);
            let n = (self.geo.cluster_size() - inc).min(end - pos);
            let e = self.entry(&mut m, GuestOffset(pos))?;
            let st = match self.decode(&m, e)? {
                L2Mapping::Unallocated => LayerStatus::Unallocated,
                L2Mapping::Zero { prealloc, .. } => LayerStatus::Zero {
                    offset: prealloc.map(|h| h.0 + inc),
                },
                L2Mapping::Data { host, .. } => LayerStatus::Data {
                    offset: host.0 + inc,
                },
                L2Mapping::Compressed { .. } => LayerStatus::Compressed,
            };
            match first {
                None => first = Some(st),
                Some(f) => {
                    let cont = match (f, st) {
                        (LayerStatus::Data { offset: a }, LayerStatus::Data { offset: b }) => {
                            a + (pos - off) == b
                        }
                        (
                            LayerStatus::Zero { offset: Some(a) },
                            LayerStatus::Zero { offset: Some(b) },
                        ) => a + (pos - off) == b,
                        (a, b) => a == b,
                    };
                    if !cont {
                        break;
                    }
                }
            }
            pos += n;
        }
        Ok((first.unwrap_or(LayerStatus::Unallocated), pos - off))
    }

    /// Guest clusters in `[off, off+len)` that are unallocated at this layer, as
    /// cluster-aligned (offset, length) runs clipped to the virtual size.
    pub fn unallocated_runs(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let end = (off + len).min(self.size);
        let mut pos = self.geo.align_down(off);
        while pos < end {
            let (st, n) = self.block_status(pos, end - pos)?;
            if st == LayerStatus::Unallocated {
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == pos => l.1 += n,
                    _ => out.push((pos, n)),
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
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(self.path()).map_err(|e| Error::io(self.path(), "stat", e))?;
        let cs = self.geo.cluster_size();
        let real_clusters = md.blocks() * 512 / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = md.len().div_ceil(cs);
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
                if m.l2.len() * self.geo.cluster_size() as usize > L2_CACHE_BYTES {
                    self.maybe_shrink(&mut m)?;
                }
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
