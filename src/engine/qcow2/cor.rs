//! Copy-on-read: claims, the quota budget, trace recording and hit/miss counting.

use super::{FillStats, Qcow2, Source};
use crate::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Copy-on-read counters of a cache layer.
#[derive(Debug, Default)]
pub struct CorStats {
    /// Read requests that reached this layer.
    pub requests: AtomicU64,
    /// Requests served without the base.
    pub hits: AtomicU64,
    /// Requests that needed the base.
    pub misses: AtomicU64,
    /// Bytes read from the base (holes its metadata proves zero are not read).
    pub base_bytes: AtomicU64,
    pub data_clusters: AtomicU64,
    pub zero_clusters: AtomicU64,
}

/// Copy-on-read state: reads of clusters this layer lacks fetch them from the backing file
/// and store them here, exactly once per cluster however many readers race for it.
#[derive(Debug)]
pub struct Cor {
    /// Data clusters still allowed by the quota.
    budget: Mutex<u64>,
    /// Guest clusters being filled right now.
    inflight: Mutex<std::collections::HashSet<u64>>,
    cv: std::sync::Condvar,
    /// Base reads in order, when recording.
    record: Option<Mutex<Vec<(u64, u64)>>>,
    pub stats: CorStats,
}

/// Releases claimed clusters when a fill ends, even by error.
struct Claim<'a> {
    cor: &'a Cor,
    clusters: std::ops::Range<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut g = self.cor.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for c in self.clusters.clone() {
            g.remove(&c);
        }
        drop(g);
        self.cor.cv.notify_all();
    }
}

impl Qcow2 {
    /// Turn copy-on-read on: reads of clusters missing here fill them from the backing file,
    /// storing at most `quota` bytes of data (0: no limit). `record` keeps the base reads.
    pub fn enable_cor(&self, quota: u64, record: bool) -> Result<()> {
        self.require_writable()?;
        if self.backing.is_none() {
            return Err(Error::request(
                self.path(),
                "copy-on-read needs a backing file",
            ));
        }
        let budget = self.quota_budget(quota)?;
        let cor = Cor {
            budget: Mutex::new(budget),
            inflight: Mutex::new(Default::default()),
            cv: std::sync::Condvar::new(),
            record: record.then(|| Mutex::new(Vec::new())),
            stats: CorStats::default(),
        };
        self.cor
            .set(cor)
            .map_err(|_| Error::request(self.path(), "copy-on-read already on"))
    }

    /// Copy-on-read state, when on.
    pub fn cor(&self) -> Option<&Cor> {
        self.cor.get()
    }

    /// The base reads recorded so far (empty unless recording).
    pub fn take_record(&self) -> Vec<(u64, u64)> {
        self.cor
            .get()
            .and_then(|c| c.record.as_ref())
            .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default()
    }

    /// Data clusters the quota (bytes; 0 = none) still allows this layer to store.
    pub fn quota_budget(&self, quota: u64) -> Result<u64> {
        if quota == 0 {
            return Ok(u64::MAX);
        }
        let have = self.allocated_clusters()?;
        Ok((quota / self.geo.cluster_size()).saturating_sub(have.data + have.compressed))
    }

    /// Fill the clusters of `[off, off+len)` still unallocated here from the backing file:
    /// read what the backing file's metadata does not prove zero, store it (taking data
    /// clusters from `budget`), and hand each run's content to `sink(offset, bytes)`. The
    /// caller keeps others off these clusters (a copy-on-read claim, or the image's write
    /// lock held by one warming process).
    pub fn fill_from_backing(
        &self,
        off: u64,
        len: u64,
        budget: &Mutex<u64>,
        mut sink: impl FnMut(u64, &[u8]),
    ) -> Result<FillFromBacking> {
        let cs = self.geo.cluster_size();
        let backing = self
            .backing
            .as_deref()
            .ok_or_else(|| Error::request(self.path(), "filling needs a backing file"))?;
        let mut out = FillFromBacking::default();
        for (s, n) in self.unallocated_runs(off, len)? {
            let mut buf = vec![0u8; n as usize];
            let mut nonzero = 0;
            for (zs, zn, zero) in backing.zero_runs(s, n)? {
                if !zero {
                    let at = (zs - s) as usize;
                    self.read_backing(&mut buf[at..at + zn as usize], zs)?;
                    out.base_bytes += zn;
                    nonzero += zn;
                }
            }
            let want = if nonzero == 0 { 0 } else { n.div_ceil(cs) };
            let granted = {
                let mut b = budget.lock().unwrap_or_else(|p| p.into_inner());
                let g = want.min(*b);
                *b -= g;
                g
            };
            let f = self.fill(s, &buf, granted);
            let used = f.as_ref().map_or(0, |f| f.data_clusters.min(granted));
            *budget.lock().unwrap_or_else(|p| p.into_inner()) += granted - used;
            let f = f?;
            out.stats.data_clusters += f.data_clusters;
            out.stats.zero_clusters += f.zero_clusters;
            out.stats.over_quota += f.over_quota;
            sink(s, &buf);
        }
        Ok(out)
    }

    /// Read `dst` at `pos` (a run unallocated here when planned) with copy-on-read.
    pub(super) fn cor_read(&self, cor: &Cor, dst: &mut [u8], pos: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = pos + dst.len() as u64;
        let a = self.geo.align_down(pos);
        let b = self.geo.align_up(end).min(self.size);
        let clusters = a / cs..b.div_ceil(cs);
        {
            let mut g = cor.inflight.lock().unwrap_or_else(|p| p.into_inner());
            while clusters.clone().any(|c| g.contains(&c)) {
                g = cor.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.extend(clusters.clone());
        }
        let _claim = Claim { cor, clusters };
        // Under the claim nobody else changes these clusters: what is unallocated now is ours.
        let mut covered = Vec::new();
        let f = self.fill_from_backing(a, b - a, &cor.budget, |s, buf| {
            if let Some(r) = &cor.record {
                r.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((s, buf.len() as u64));
            }
            let (x, y) = (s.max(pos), (s + buf.len() as u64).min(end));
            if x < y {
                dst[(x - pos) as usize..(y - pos) as usize]
                    .copy_from_slice(&buf[(x - s) as usize..(y - s) as usize]);
                covered.push((x, y));
            }
        })?;
        cor.stats
            .base_bytes
            .fetch_add(f.base_bytes, Ordering::Relaxed);
        cor.stats
            .data_clusters
            .fetch_add(f.stats.data_clusters, Ordering::Relaxed);
        cor.stats
            .zero_clusters
            .fetch_add(f.stats.zero_clusters, Ordering::Relaxed);
        // The rest was filled by others before we claimed it: read it from here.
        let mut p = pos;
        for (x, y) in covered.into_iter().chain(std::iter::once((end, end))) {
            if p < x {
                let (plan, gate) = {
                    let mut m = self.lock();
                    let plan = self.plan(&mut m, p, x - p)?;
                    (plan, self.gate(&mut m))
                };
                let d = &mut dst[(p - pos) as usize..(x - pos) as usize];
                self.read_local(d, p, &plan, true)?;
                drop(gate);
                for (q, n, src) in plan {
                    if src == Source::Backing {
                        let d = &mut dst[(q - pos) as usize..(q - pos + n) as usize];
                        self.read_backing(d, q)?;
                    }
                }
            }
            p = p.max(y);
        }
        Ok(())
    }
}

/// What [`Qcow2::fill_from_backing`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct FillFromBacking {
    pub stats: FillStats,
    /// Bytes read from the backing file (holes its metadata proves zero are not read).
    pub base_bytes: u64,
}
