//! Serving VM instances over NBD: the chain INSTANCE → CACHE → BASE opened for I/O, with
//! copy-on-read into the cache while it is not sealed, one shared cache object for every
//! instance over it, QEMU-compatible locks, and the boot trace.

use super::build::{cache_meta, require_base};
use super::map::map_range;
use super::trace::Trace;
use crate::engine::cor::Cor;
use crate::engine::image::SparseRun;
use crate::engine::open::{place_backing, resolve_backing};
use crate::engine::storage::FileStorage;
use crate::engine::{Format, Image, OpenOptions};
use crate::format::ext::{CacheState, FillRecord};
use crate::nbd::Export;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A chain served as one NBD export.
pub struct ChainExport {
    pub image: Arc<Image>,
}

impl ChainExport {
    /// Copy-on-read fills a layer of the chain (asked per read: no allocation).
    fn filling(&self) -> bool {
        std::iter::successors(Some(&*self.image), |i| i.backing())
            .any(|l| l.read_filter().is_some())
    }
}

impl Export for ChainExport {
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image.read_at(buf, offset)
    }
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        self.image.write_at(buf, offset)?;
        if fua {
            self.image.flush(true)?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        self.image.flush(true)?;
        // Make the cache's copy-on-read fills durable too (a no-op when read-only).
        match self.image.backing() {
            Some(b) => b.flush(true),
            None => Ok(()),
        }
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<()> {
        // Discards are advisory; keeping the data is always correct.
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool) -> Result<()> {
        self.image.write_zeroes(offset, len)
    }
    /// Pieces, unless copy-on-read is filling the cache: then the one-buffer sparse read
    /// ([`Export::read_sparse`]) copies least.
    fn read_pieces(&self, offset: u64, len: u64) -> Result<Option<Vec<crate::engine::Piece<'_>>>> {
        if self.filling() {
            return Ok(None);
        }
        self.image.read_pieces(offset, len).map(Some)
    }
    fn read_pieces_local(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<crate::engine::Piece<'_>>>> {
        if self.filling() {
            return Ok(None);
        }
        self.image.read_pieces_local(offset, len)
    }
    /// One walk of the chain: zero clusters (and holes of the base while nothing fills the
    /// cache) are runs of zeroes; what copy-on-read fetches is data, so the cache stores it
    /// (as zero clusters where it is zero) and the trace records it.
    fn read_sparse(&self, buf: &mut [u8], offset: u64) -> Result<Vec<SparseRun>> {
        self.image.read_sparse(buf, offset)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        use crate::nbd::{STATE_HOLE as HOLE, STATE_ZERO as ZERO};
        let end = (offset + len).min(self.image.virtual_size());
        Ok(map_range(&self.image, offset, end)?
            .into_iter()
            .map(|e| {
                let flags = match (e.present, e.data) {
                    (false, _) => HOLE | ZERO,
                    (true, false) => ZERO,
                    (true, true) if e.zero => ZERO,
                    (true, true) => 0,
                };
                (e.length, flags)
            })
            .collect())
    }
}

/// What `serve` opened.
pub struct Served {
    /// The cache (or plain backing) every instance stands on.
    pub cache: Arc<Image>,
    /// Copy-on-read into the cache is on (an unsealed vmicache cache).
    pub filling: bool,
    /// Another server is filling the cache: these instances stand on its base directly.
    pub passing_through: bool,
    pub exports: Vec<(String, Arc<Image>)>,
}

/// The backing file an image's header names, resolved, and refused when it lies outside the
/// places allowed for that image ([`place_backing`]).
pub fn backing_path(image: &Path) -> Result<PathBuf> {
    let st = FileStorage::open(image, false)?;
    let h = crate::engine::header_io::read_header(&st)?;
    let name = h
        .backing_file
        .ok_or_else(|| Error::chain(image, "instance has no backing file (expected its cache)"))?;
    let p = resolve_backing(image, &name)?;
    place_backing(image, &p)?;
    Ok(p)
}

/// Open instances (export name, path) over their common cache, taking locks and turning on
/// copy-on-read when the cache is an unsealed vmicache cache.
pub fn open(instances: &[(String, PathBuf)], record: bool) -> Result<Served> {
    open_with(instances, record, false)
}

/// As [`open`]; with `pass_through_if_busy`, a cache another server is filling is left alone:
/// the instances stand directly on the cache's base (same content), so their reads pass
/// through and nothing waits or fights over the fill.
pub fn open_with(
    instances: &[(String, PathBuf)],
    record: bool,
    pass_through_if_busy: bool,
) -> Result<Served> {
    crate::nbd::register();
    let (_, first) = instances
        .first()
        .ok_or_else(|| Error::refused(crate::Subject::Other("serve".into()), "nothing to serve"))?;
    let cache_path = backing_path(first)?;
    let probe = Image::open(&cache_path, &OpenOptions::read_only())?;
    let meta = cache_meta(&probe)?;
    let fill = matches!(&meta, Some(m) if m.state != CacheState::Sealed);
    let opened = Image::open(
        &cache_path,
        &OpenOptions {
            write: fill,
            lock: true,
            ..OpenOptions::read_only()
        },
    );
    let cache = match opened {
        Err(Error::Locked { .. }) if pass_through_if_busy && fill => {
            drop(probe);
            return pass_through(instances, &cache_path);
        }
        r => r?,
    };
    drop(probe);
    // Decide again from the locked handle: a `warm --boot` may have sealed the cache between
    // the probe and the lock.
    let meta = cache_meta(&cache)?;
    let fill = fill && matches!(&meta, Some(m) if m.state != CacheState::Sealed);
    if let Some(m) = &meta {
        // A sealed cache must boot without reading its base: compare its shape only. A cache
        // being filled reads from the base anyway: check its content fingerprint too.
        require_base(&cache, fill)?;
        if fill {
            super::build::mark_warming(&cache, m)?;
            Cor::enable(&cache, m.quota, record)?;
        }
    }
    let cache = Arc::new(cache);
    let mut exports = Vec::new();
    for (name, path) in instances {
        let img = Image::open_over(path, &OpenOptions::locked_write(), cache.clone())?;
        exports.push((name.clone(), Arc::new(img)));
    }
    Ok(Served {
        cache,
        filling: fill,
        passing_through: false,
        exports,
    })
}

/// Serve instances over their cache's base, leaving the (busy) cache alone.
fn pass_through(instances: &[(String, PathBuf)], cache_path: &Path) -> Result<Served> {
    let base_path = backing_path(cache_path)?;
    let header = crate::engine::header_io::read_header(&FileStorage::open(cache_path, false)?)?;
    let fmt = header.backing_format.as_deref().and_then(Format::parse);
    let base = Arc::new(Image::open(
        &base_path,
        &OpenOptions {
            lock: true,
            format: fmt,
            ..OpenOptions::read_only()
        },
    )?);
    let mut exports = Vec::new();
    for (name, path) in instances {
        let img = Image::open_over_any(path, &OpenOptions::locked_write(), base.clone())?;
        exports.push((name.clone(), Arc::new(img)));
    }
    Ok(Served {
        cache: base,
        filling: false,
        passing_through: true,
        exports,
    })
}

/// Summary of a serve session's copy-on-read.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ServeSummary {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub base_bytes: u64,
    pub data_clusters: u64,
    pub zero_clusters: u64,
    pub trace_reads: usize,
}

/// Flush everything, record the session's statistics in the cache and save the trace.
pub fn finish(s: &Served, trace: Option<&Path>) -> Result<ServeSummary> {
    for (_, img) in &s.exports {
        img.flush(true)?;
    }
    let mut sum = ServeSummary::default();
    let Some(q) = s.cache.as_qcow2() else {
        return Ok(sum);
    };
    if let Some(c) = Cor::of(&s.cache) {
        let st = &c.stats;
        sum.requests = st.requests.load(Ordering::Relaxed);
        sum.hits = st.hits.load(Ordering::Relaxed);
        sum.misses = st.misses.load(Ordering::Relaxed);
        sum.base_bytes = st.base_bytes.load(Ordering::Relaxed);
        sum.data_clusters = st.data_clusters.load(Ordering::Relaxed);
        sum.zero_clusters = st.zero_clusters.load(Ordering::Relaxed);
    }
    if s.filling {
        q.flush(true)?;
        if let Some(mut m) = q.cache_meta()? {
            m.last_fill = Some(FillRecord {
                requests: sum.requests,
                hits: sum.hits,
                misses: sum.misses,
                base_bytes: sum.base_bytes,
                ended: crate::now(),
            });
            q.set_cache_meta(Some(&m))?;
            if let (Some(path), Some(id)) = (trace, m.base) {
                let reads = Cor::of(&s.cache).map(Cor::take_record).unwrap_or_default();
                sum.trace_reads = reads.len();
                Trace {
                    base_size: id.virtual_size,
                    base_fingerprint: id.fingerprint,
                    reads,
                }
                .save(path)?;
            }
        }
    }
    Ok(sum)
}
