//! `hoard checkout`: a hoarded cache as an ordinary qcow2 cache again (for QEMU's native
//! chain), equal in content, geometry, base and vmicache extension, and its trace beside it.

use super::format::CHUNK;
use super::layer::HoardLayer;
use super::store::Hoard;
use crate::engine::create::{create, CreateOptions};
use crate::engine::layer::{Layer, MapMode, Mapping};
use crate::engine::storage::FileStorage;
use crate::engine::{Image, OpenOptions};
use crate::format::ext::KIND as EXT_KIND;
use crate::format::header::Extension;
use crate::{Error, Result};
use std::path::Path;

/// Zeros written at a time (chunks stored as zeros, which are data clusters of the cache).
const ZERO_BATCH: u64 = 1 << 20;
/// Bytes written between two starts of writeback (so the closing sync waits for little: it
/// was about a quarter of a checkout's time).
const WRITEBACK_EVERY: u64 = 16 << 20;

/// What a checkout wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckoutReport {
    pub name: String,
    pub output: String,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub seconds: f64,
    /// Frames decompressed (each frame the cache uses, once).
    pub frames_decoded: u64,
}

/// Write hoarded cache `name` to `out` (which must not exist), and `out.trace` when the
/// cache had a trace. `progress`: (bytes done, bytes in all).
pub fn checkout(
    h: &Hoard,
    name: &str,
    out: &Path,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<CheckoutReport> {
    checkout_with(h, name, out, progress, true)
}

/// [`checkout`]; `wait`: false refuses at once while a writer holds the hoard's lock.
pub fn checkout_with(
    h: &Hoard,
    name: &str,
    out: &Path,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    wait: bool,
) -> Result<CheckoutReport> {
    let t0 = std::time::Instant::now();
    super::store::check_name(name)?;
    // Shared: no gc or pull deletes what is being read meanwhile.
    let _lock = h.read_lock_with(wait)?;
    let path = h.stored_index_path(&h.index_id(name)?);
    let layer = HoardLayer::open(&path, Box::new(FileStorage::open(&path, false)?))?;
    let idx = layer.index().clone();
    // The cache and its trace are new files: a trace left beside OUT would be taken as the
    // new cache's (`hoard add` reads OUT.trace).
    for p in [out.to_path_buf(), trace_path(out)] {
        if p.symlink_metadata().is_ok() {
            return Err(Error::refused(
                &p,
                "exists already (checkout writes new files)",
            ));
        }
    }
    let mut c = CreateOptions::new(idx.virtual_size);
    c.cluster_size = 1 << idx.cluster_bits;
    c.backing_file = idx.backing_file.clone();
    c.backing_format = idx.backing_format.clone();
    if !idx.extension.is_empty() {
        c.extensions.push(Extension {
            kind: EXT_KIND,
            data: idx.extension.clone(),
        });
    }
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map_or("cache".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let decoded = std::sync::atomic::AtomicU64::new(0);
    let r = (|| {
        create(&tmp, &c)?;
        let img = Image::open(
            &tmp,
            &OpenOptions {
                backing: false,
                ..OpenOptions::read_write()
            },
        )?;
        let data = write_all(&layer, &img, progress, &decoded)?;
        img.flush(true)?;
        drop(img);
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, "rename into place", e))?;
        super::store::sync_dir(out.parent().unwrap_or(Path::new(".")))?;
        if !idx.trace.is_empty() {
            super::store::write_atomic(&trace_path(out), &idx.trace)?;
        }
        Ok(data)
    })();
    let data = match r {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    Ok(CheckoutReport {
        name: name.to_string(),
        output: out.display().to_string(),
        data_bytes: data,
        file_bytes: std::fs::metadata(out).map_or(0, |m| m.len()),
        seconds: t0.elapsed().as_secs_f64(),
        frames_decoded: decoded.into_inner(),
    })
}

/// Where a cache's trace lies: `CACHE.trace`.
pub fn trace_path(cache: &Path) -> std::path::PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".trace");
    s.into()
}

/// Copy what the layer holds into `img` (opened without its base, so a partial cluster is
/// completed with zeros, as the cache had it): zero runs as zeros (zero clusters where whole),
/// chunks stored as zeros as zero data, then the packs' frames in pack order, each decoded
/// once by one of a thread per core (up to 4) into a buffer it reuses, and what the cache takes
/// of it written (the engine serializes two writes that meet in one new cluster). The new
/// file's clusters thus lie in the packs' order, the cache's first-boot order, as a warm
/// boot reads them. `decoded` counts the frames.
fn write_all(
    layer: &HoardLayer,
    img: &Image,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
    decoded: &std::sync::atomic::AtomicU64,
) -> Result<u64> {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let size = layer.virtual_size();
    let chunk_range = |guest: u64, chunks: u64| {
        let off = guest * CHUNK;
        (
            off,
            ((guest + chunks) * CHUNK).min(size).saturating_sub(off),
        )
    };
    for r in layer.map(0, size, MapMode::READ)?.runs {
        if let Mapping::Zero { .. } = r.map {
            img.write_zeroes(r.off, r.len)?;
        }
    }
    let mut done = 0u64;
    let zeros = vec![0u8; ZERO_BATCH as usize];
    let index = layer.index();
    for r in index.runs.iter().filter(|r| !r.in_pack() && !r.is_zero()) {
        let (off, len) = chunk_range(r.start, u64::from(r.count));
        let mut at = 0;
        while at < len {
            let n = (len - at).min(ZERO_BATCH);
            img.write_at(&zeros[..n as usize], off + at)?;
            at += n;
        }
        done += len;
    }
    let parts = layer.frame_parts()?;
    let all = done
        + parts
            .iter()
            .map(|p| chunk_range(p.guest, u64::from(p.chunks)).1)
            .sum::<u64>();
    // One job per frame: the parts that share it.
    let mut jobs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        match jobs.last_mut() {
            Some(j) if (parts[j.start].pack, parts[j.start].frame) == (p.pack, p.frame) => {
                j.end = i + 1
            }
            _ => jobs.push(i..i + 1),
        }
    }
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(done);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = Vec::new();
                    let r = (|| {
                        while let Some(j) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                            let first = parts[j.start];
                            let frame = layer.decode_frame(first.pack, first.frame, buf)?;
                            decoded.fetch_add(1, Ordering::Relaxed);
                            let mut wrote = 0;
                            for p in &parts[j.clone()] {
                                let (off, len) = chunk_range(p.guest, u64::from(p.chunks));
                                let at = p.at as usize * CHUNK as usize;
                                let src = frame.get(at..at + len as usize).ok_or_else(|| {
                                    Error::corrupt(
                                        layer.path(),
                                        format!("frame {} is shorter than its chunks", p.frame),
                                    )
                                })?;
                                img.write_at(src, off)?;
                                wrote += len;
                            }
                            buf = frame;
                            let d = done.fetch_add(wrote, Ordering::Relaxed) + wrote;
                            if d / WRITEBACK_EVERY != (d - wrote) / WRITEBACK_EVERY {
                                // A hint: the closing sync reports any real write error.
                                if let Err(e) = img.storage().start_writeback() {
                                    log::debug!("{e}");
                                }
                            }
                            if let Some(p) = progress {
                                p(d, all);
                            }
                        }
                        Ok(())
                    })();
                    if r.is_err() {
                        // The others stop at their next frame.
                        next.store(jobs.len(), Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let mut first_err = None;
        for w in workers {
            let r = w.join().unwrap_or_else(|_| {
                Err(Error::refused(layer.path(), "a checkout thread panicked"))
            });
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })?;
    Ok(done.load(Ordering::Relaxed))
}
