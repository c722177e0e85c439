//! Filling unallocated clusters with content read from below (copy-on-read and warming).

use super::{is_zero, Meta, Qcow2};
use crate::format::table::{L2Entry, L2Mapping};
use crate::format::types::{GuestOffset, HostOffset};
use crate::{Error, Result};

impl Qcow2 {
    /// Copy-on-read fill: `data` is guest content read from the backing file for the
    /// cluster-aligned range at `off` (whole clusters, the last one may end at the virtual
    /// size). Every cluster still unallocated here takes its content: all-zero clusters become
    /// zero clusters (nothing stored), others are written as data, at most `max_data` of them.
    pub fn fill(&self, off: u64, data: &[u8], max_data: u64) -> Result<FillStats> {
        self.signal(self.fill_inner(off, data, max_data))
    }

    fn fill_inner(&self, off: u64, data: &[u8], max_data: u64) -> Result<FillStats> {
        self.require_writable()?;
        let cs = self.geo.cluster_size();
        if !self.geo.is_aligned(off) {
            return Err(Error::request(
                self.path(),
                format!("fill at unaligned {off:#x}"),
            ));
        }
        self.check_range(off, data.len() as u64)?;
        let n = (data.len() as u64).div_ceil(cs) as usize;
        let chunk = |i: usize| &data[i * cs as usize..((i + 1) * cs as usize).min(data.len())];
        let zero: Vec<bool> = (0..n).map(|i| self.v3 && is_zero(chunk(i))).collect();
        let max_run = (64 << 20) / cs;
        let max_run = max_run.min(self.geo.refblock_entries() - 1).max(1) as usize;
        let mut st = FillStats::default();
        // Decide under the lock, write data without it, then link it under the lock: the
        // clusters are counted (refcount) before the data lands and linked (L2) after.
        let mut runs: Vec<(usize, usize, u64)> = Vec::new();
        {
            let mut guard = self.lock();
            let m: &mut Meta = &mut guard;
            // A cluster an allocating write has claimed counts as taken: that write gives it
            // its new content.
            let unalloc = |q: &Self, m: &mut Meta, i: usize| -> Result<bool> {
                let g = off + i as u64 * cs;
                let e = q.entry(m, GuestOffset(g))?;
                Ok(q.decode(m, e)? == L2Mapping::Unallocated && !q.is_claimed(g))
            };
            let mut i = 0;
            while i < n {
                if !unalloc(self, m, i)? {
                    i += 1;
                    continue;
                }
                if zero[i] {
                    self.set_entry(m, GuestOffset(off + i as u64 * cs), L2Entry::zero())?;
                    st.zero_clusters += 1;
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < n
                    && j - i < max_run
                    && st.data_clusters + ((j - i) as u64) < max_data
                    && !zero[j]
                    && unalloc(self, m, j)?
                {
                    j += 1;
                }
                if st.data_clusters >= max_data {
                    st.over_quota += 1;
                    i += 1;
                    continue;
                }
                let k = (j - i) as u64;
                for x in i..j {
                    self.ensure_l2(m, GuestOffset(off + x as u64 * cs))?;
                }
                let hc = m.rc.alloc(&*self.storage, &mut m.header, k)?;
                let host = hc << self.geo.cluster_bits;
                m.rc.check_write(&*self.storage, host, k * cs, None)?;
                runs.push((i, j, host));
                st.data_clusters += k;
                i = j;
            }
        }
        for &(i, j, host) in &runs {
            let start = i * cs as usize;
            let end = (j * cs as usize).min(data.len());
            if end - start == (j - i) * cs as usize {
                self.storage.write_at(&data[start..end], host)?;
            } else {
                let mut buf = vec![0u8; (j - i) * cs as usize];
                buf[..end - start].copy_from_slice(&data[start..end]);
                self.storage.write_at(&buf, host)?;
            }
        }
        let mut guard = self.lock();
        let m: &mut Meta = &mut guard;
        for &(i, j, host) in &runs {
            for x in i..j {
                let g = GuestOffset(off + x as u64 * cs);
                let h = HostOffset(host + (x - i) as u64 * cs);
                // Callers claim the clusters they fill; should two fills still meet, the
                // first link wins and the other's cluster is given back.
                let e = self.entry(m, g)?;
                if self.decode(m, e)? != L2Mapping::Unallocated || self.is_claimed(g.0) {
                    m.pending_free.push(h.0 >> self.geo.cluster_bits);
                    st.data_clusters -= 1;
                    continue;
                }
                self.set_entry(m, g, L2Entry::data(h))?;
            }
        }
        self.maybe_flush(m)?;
        Ok(st)
    }
}

/// What a copy-on-read fill stored.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct FillStats {
    pub data_clusters: u64,
    pub zero_clusters: u64,
    /// Clusters left unfilled because the quota was reached.
    pub over_quota: u64,
}
