//! Warming a cache without booting: replay a trace, or copy everything the base holds.
//!
//! Requests are coalesced to whole clusters, sorted and merged, cut into chunks, and handed to
//! several workers; each reads from the base only the clusters the cache does not hold yet and
//! stores them through the engine's copy-on-read fill (all-zero clusters become zero clusters,
//! never zeros stored as data). The cache's quota bounds the data stored.

use super::build::{cache_meta, require_base_matches};
use super::map::map;
use crate::engine::cor::{fill_from_backing, quota_budget};
use crate::engine::qcow2::FillStats;
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheState;
use crate::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone)]
pub struct WarmOptions {
    /// Workers with a base request in flight.
    pub jobs: usize,
    /// Largest single base request.
    pub chunk: u64,
}

impl Default for WarmOptions {
    fn default() -> Self {
        WarmOptions {
            jobs: 4,
            chunk: 4 << 20,
        }
    }
}

#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct WarmStats {
    /// Bytes of the requested ranges (after alignment to clusters and merging).
    pub requested_bytes: u64,
    /// Bytes read from the base (what the cache did not hold yet).
    pub base_bytes_read: u64,
    pub data_clusters: u64,
    pub zero_clusters: u64,
    /// Clusters left out because the quota was reached.
    pub over_quota_clusters: u64,
    pub seconds: f64,
}

/// Open a cache for warming: writable, a vmicache cache, not sealed, base unchanged. Marks it
/// `warming`.
pub fn open_cache_rw(path: &Path) -> Result<Image> {
    crate::nbd::register();
    let img = Image::open(path, &OpenOptions::locked_write())?;
    let meta = cache_meta(&img)?.ok_or_else(|| {
        Error::request(path, "not a vmicache cache (no vmicache header extension)")
    })?;
    if meta.state == CacheState::Sealed {
        return Err(Error::read_only(
            path,
            "cache is sealed: it is never written again",
        ));
    }
    require_base_matches(&img)?;
    super::build::mark_warming(&img, &meta)?;
    Ok(img)
}

/// Seal a cache: mark it complete; nothing writes it afterwards.
pub fn seal(path: &Path) -> Result<()> {
    let img = Image::open(path, &OpenOptions::locked_write())?;
    let q = img
        .as_qcow2()
        .ok_or_else(|| Error::request(path, "not a qcow2 image"))?;
    let mut m = q.cache_meta()?.ok_or_else(|| {
        Error::request(path, "not a vmicache cache (no vmicache header extension)")
    })?;
    m.state = CacheState::Sealed;
    m.sealed = crate::now();
    q.flush(true)?;
    q.set_cache_meta(Some(&m))
}

/// Align to clusters, sort, merge, and cut into chunks of at most `chunk` bytes.
pub fn coalesce(ranges: &[(u64, u64)], cluster: u64, size: u64, chunk: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.1 > 0 && r.0 < size)
        .map(|&(o, l)| {
            let s = o / cluster * cluster;
            let e = (o.saturating_add(l)).min(size).div_ceil(cluster) * cluster;
            (s, e.min(size.div_ceil(cluster) * cluster))
        })
        .collect();
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match merged.last_mut() {
            Some(l) if s <= l.1 => l.1 = l.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let chunk = (chunk / cluster).max(1) * cluster;
    let mut out = Vec::new();
    for (s, e) in merged {
        let mut p = s;
        while p < e {
            let n = chunk.min(e - p);
            out.push((p, n.min(size - p)));
            p += n;
        }
    }
    out
}

/// Guest byte ranges: (offset, length).
pub type Ranges = Vec<(u64, u64)>;

/// Everything the base holds, as ranges: (data ranges, zero ranges).
pub fn base_ranges(cache: &Image) -> Result<(Ranges, Ranges)> {
    let base = cache
        .backing()
        .ok_or_else(|| Error::chain(cache.path(), "cache has no base"))?;
    let (mut data, mut zero) = (Vec::new(), Vec::new());
    for e in map(base)? {
        if e.start >= cache.virtual_size() {
            continue;
        }
        let len = e.length.min(cache.virtual_size() - e.start);
        if e.data {
            data.push((e.start, len));
        } else {
            zero.push((e.start, len));
        }
    }
    Ok((data, zero))
}

/// Warm `cache` (opened with [`open_cache_rw`]) with the guest ranges `reads`; `zero_ranges`
/// are known to read as zeros in the base and are recorded without reading it.
pub fn warm(
    cache: &Image,
    reads: &[(u64, u64)],
    zero_ranges: &[(u64, u64)],
    o: &WarmOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<WarmStats> {
    let t0 = std::time::Instant::now();
    let q = cache
        .as_qcow2()
        .ok_or_else(|| Error::request(cache.path(), "a cache must be qcow2"))?;
    let cs = q.geometry().cluster_size();
    let size = q.virtual_size();
    let quota = cache_meta(cache)?.map(|m| m.quota).unwrap_or(0);
    let budget = Mutex::new(quota_budget(q, quota)?);
    let mut chunks: Vec<(u64, u64, bool)> = coalesce(reads, cs, size, o.chunk)
        .into_iter()
        .map(|(a, b)| (a, b, false))
        .collect();
    // Zero ranges: whole clusters only (partial ones are read like data).
    let zero_whole: Vec<(u64, u64)> = zero_ranges
        .iter()
        .filter_map(|&(s, l)| {
            let a = s.div_ceil(cs) * cs;
            // The disk's last cluster may be partial: up to the end counts as whole.
            let e = if s + l >= size {
                size
            } else {
                (s + l) / cs * cs
            };
            (e > a).then(|| (a, e - a))
        })
        .collect();
    chunks.extend(
        coalesce(&zero_whole, cs, size, o.chunk)
            .into_iter()
            .map(|(a, b)| (a, b, true)),
    );
    let stats = Mutex::new(WarmStats {
        requested_bytes: chunks.iter().map(|c| c.1).sum(),
        ..Default::default()
    });
    let next = AtomicUsize::new(0);
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..o.jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(off, len, zero)) = chunks.get(i) else {
                    break;
                };
                if first_err.lock().unwrap().is_some() {
                    break;
                }
                match warm_chunk(cache, off, len, zero, &budget) {
                    Ok((f, read)) => {
                        let mut st = stats.lock().unwrap();
                        st.base_bytes_read += read;
                        st.data_clusters += f.data_clusters;
                        st.zero_clusters += f.zero_clusters;
                        st.over_quota_clusters += f.over_quota;
                        drop(st);
                        progress(len);
                    }
                    Err(e) => {
                        first_err.lock().unwrap().get_or_insert(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap() {
        return Err(e);
    }
    q.flush(true)?;
    let mut st = stats.into_inner().unwrap();
    st.seconds = t0.elapsed().as_secs_f64();
    Ok(st)
}

fn warm_chunk(
    img: &Image,
    off: u64,
    len: u64,
    zero: bool,
    budget: &Mutex<u64>,
) -> Result<(FillStats, u64)> {
    let q = img.as_qcow2().expect("checked by warm");
    if !zero {
        let mut f = fill_from_backing(img, off, len, budget, |_, _| {})?;
        if let Some(e) = f.store_error.take() {
            return Err(e);
        }
        return Ok((f.stats, f.base_bytes));
    }
    // Known zeros (the base's holes): recorded as zero clusters without reading.
    let mut total = FillStats::default();
    for (s, n) in q.unallocated_runs(off, len)? {
        let f = q.fill(s, &vec![0u8; n as usize], 0)?;
        total.zero_clusters += f.zero_clusters;
    }
    Ok((total, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn coalescing() {
        let c = coalesce(
            &[(100, 10), (0, 1), (65536 * 3, 1), (70000, 70000)],
            65536,
            1 << 20,
            4 << 20,
        );
        assert_eq!(c, vec![(0, 65536 * 4)]);
        let c = coalesce(&[(0, 10 << 20)], 65536, 9 << 20, 4 << 20);
        assert_eq!(
            c,
            vec![(0, 4 << 20), (4 << 20, 4 << 20), (8 << 20, 1 << 20)]
        );
    }
}
