//! Copy-on-read, a filter over a cache layer's reads (as QEMU's block/copy-on-read.c): reads
//! of clusters the layer lacks fetch them from its backing file and store them in it, exactly
//! once per cluster however many readers race for it (claims), within a quota (the budget),
//! counting hits and misses and, when asked, recording the base reads (the trace).
//!
//! Neither the layer driver nor the chain walker knows this module: [`Cor::enable`] installs
//! the filter as the cache image's [`ReadFilter`], which the walker calls for the runs a read
//! finds unallocated in the cache layer; the filter then drives the qcow2 layer's mapping
//! (`unallocated_runs`) and `fill`, and reads below through the walker.

use super::image::{Image, ReadFilter};
use super::qcow2::{FillStats, Qcow2};
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

impl Cor {
    /// Turn copy-on-read on for `img` (a qcow2 cache over its base): reads of clusters
    /// missing there fill them from the backing file, storing at most `quota` bytes of data
    /// (0: no limit). `record` keeps the base reads.
    pub fn enable(img: &Image, quota: u64, record: bool) -> Result<()> {
        let q = cache_layer(img)?;
        q.require_writable()?;
        if img.backing().is_none() {
            return Err(Error::request(
                q.path(),
                "copy-on-read needs a backing file",
            ));
        }
        let budget = quota_budget(q, quota)?;
        let cor = Cor {
            budget: Mutex::new(budget),
            inflight: Mutex::new(Default::default()),
            cv: std::sync::Condvar::new(),
            record: record.then(|| Mutex::new(Vec::new())),
            stats: CorStats::default(),
        };
        img.set_read_filter(Box::new(cor))
            .map_err(|_| Error::request(q.path(), "copy-on-read already on"))
    }

    /// The copy-on-read state of `img`, when on.
    pub fn of(img: &Image) -> Option<&Cor> {
        img.read_filter()?.as_any().downcast_ref()
    }

    /// The base reads recorded so far (empty unless recording).
    pub fn take_record(&self) -> Vec<(u64, u64)> {
        self.record
            .as_ref()
            .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default()
    }
}

impl ReadFilter for Cor {
    fn request(&self, miss: bool) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let counter = if miss {
            &self.stats.misses
        } else {
            &self.stats.hits
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn read_unallocated(&self, img: &Image, dst: &mut [u8], pos: u64) -> Result<()> {
        cor_read(img, self, dst, pos)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The qcow2 layer of a cache image.
fn cache_layer(img: &Image) -> Result<&Qcow2> {
    img.as_qcow2()
        .ok_or_else(|| Error::request(img.path(), "copy-on-read needs a qcow2 cache"))
}

/// Data clusters the quota (bytes; 0 = none) still allows `q` to store.
pub fn quota_budget(q: &Qcow2, quota: u64) -> Result<u64> {
    if quota == 0 {
        return Ok(u64::MAX);
    }
    let have = q.allocated_clusters()?;
    Ok((quota / q.geometry().cluster_size()).saturating_sub(have.data + have.compressed))
}

/// Fill the clusters of `[off, off+len)` still unallocated in `img`'s qcow2 layer from its
/// backing file:
/// read what the backing file's metadata does not prove zero, store it (taking data
/// clusters from `budget`), and hand each run's content to `sink(offset, bytes)`. The
/// caller keeps others off these clusters (a copy-on-read claim, or the image's write
/// lock held by one warming process).
pub fn fill_from_backing(
    img: &Image,
    off: u64,
    len: u64,
    budget: &Mutex<u64>,
    mut sink: impl FnMut(u64, &[u8]),
) -> Result<FillFromBacking> {
    let q = cache_layer(img)?;
    let mut out = FillFromBacking::default();
    for (s, n) in q.unallocated_runs(off, len)? {
        let mut buf = vec![0u8; n as usize];
        fill_run(img, q, s, &mut buf, budget, &mut out)?;
        sink(s, &buf);
    }
    Ok(out)
}

/// Fill the unallocated run at `s` (`buf.len()` bytes, whole clusters) from the backing
/// file, its content left in `buf` (zeros where the backing file's metadata proves them).
fn fill_run(
    img: &Image,
    q: &Qcow2,
    s: u64,
    buf: &mut [u8],
    budget: &Mutex<u64>,
    out: &mut FillFromBacking,
) -> Result<()> {
    let cs = q.geometry().cluster_size();
    let n = buf.len() as u64;
    let backing = img
        .backing()
        .ok_or_else(|| Error::request(q.path(), "filling needs a backing file"))?;
    let mut nonzero = 0;
    for z in backing.zero_runs(s, n)? {
        let at = (z.off - s) as usize;
        let part = &mut buf[at..at + z.len as usize];
        if z.zero {
            part.fill(0);
        } else {
            img.read_below(part, z.off)?;
            out.base_bytes += z.len;
            nonzero += z.len;
        }
    }
    let want = if nonzero == 0 { 0 } else { n.div_ceil(cs) };
    let granted = {
        let mut b = budget.lock().unwrap_or_else(|p| p.into_inner());
        let g = want.min(*b);
        *b -= g;
        g
    };
    let f = q.fill(s, buf, granted);
    let used = f.as_ref().map_or(0, |f| f.data_clusters.min(granted));
    *budget.lock().unwrap_or_else(|p| p.into_inner()) += granted - used;
    match f {
        Ok(f) => {
            out.stats.data_clusters += f.data_clusters;
            out.stats.zero_clusters += f.zero_clusters;
            out.stats.over_quota += f.over_quota;
        }
        // What was read is still good: a reader gets it although it was not stored.
        Err(e) => {
            out.store_error.get_or_insert(e);
        }
    }
    Ok(())
}

/// Read `dst` at `pos` (a run unallocated in `img`'s layer when mapped) with copy-on-read.
fn cor_read(img: &Image, cor: &Cor, dst: &mut [u8], pos: u64) -> Result<()> {
    let q = cache_layer(img)?;
    let geo = q.geometry();
    let cs = geo.cluster_size();
    let end = pos + dst.len() as u64;
    let a = geo.align_down(pos);
    let b = geo.align_up(end).min(q.virtual_size());
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
    let record = |s: u64, n: u64| {
        if let Some(r) = &cor.record {
            r.lock().unwrap_or_else(|p| p.into_inner()).push((s, n));
        }
    };
    let f = if a == pos && b == end {
        // Whole clusters: filled straight from and into the reader's buffer.
        let mut f = FillFromBacking::default();
        for (s, n) in q.unallocated_runs(a, b - a)? {
            let at = (s - pos) as usize;
            fill_run(
                img,
                q,
                s,
                &mut dst[at..at + n as usize],
                &cor.budget,
                &mut f,
            )?;
            record(s, n);
            covered.push((s, s + n));
        }
        f
    } else {
        fill_from_backing(img, a, b - a, &cor.budget, |s, buf| {
            record(s, buf.len() as u64);
            let (x, y) = (s.max(pos), (s + buf.len() as u64).min(end));
            if x < y {
                dst[(x - pos) as usize..(y - pos) as usize]
                    .copy_from_slice(&buf[(x - s) as usize..(y - s) as usize]);
                covered.push((x, y));
            }
        })?
    };
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
            img.read_unfiltered(&mut dst[(p - pos) as usize..(x - pos) as usize], p)?;
        }
        p = p.max(y);
    }
    Ok(())
}
/// What [`fill_from_backing`] did.
#[derive(Debug, Default)]
pub struct FillFromBacking {
    pub stats: FillStats,
    /// Bytes read from the backing file (holes its metadata proves zero are not read).
    pub base_bytes: u64,
    /// Storing failed (the first error): the content was still handed to the sink. A reader
    /// is served from the base; a warm run reports it.
    pub store_error: Option<Error>,
}
