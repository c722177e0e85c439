//! Compacting a sealed cache (`vmicache seal --compact`): VMAR's block translation in plain
//! qcow2.
//!
//! The cache is rewritten into a new file: identical guest clusters share one host cluster
//! (refcount > 1, L2 entries without COPIED), clusters that compress well are stored as qcow2
//! compressed clusters packed at byte granularity (identical ones share their compressed
//! bytes: dedup by BLAKE3 of the content comes before compression), all-zero clusters become
//! zero clusters. Header, extensions (the vmicache one, unknown ones) and the backing file
//! name and format are kept.
//!
//! Layout of the new file: header cluster, L1 table, L2 tables, data and compressed clusters in
//! guest order, then the refcount table and blocks. It is written to a temporary file in the
//! cache's directory (created exclusively), synced, checked, renamed over the cache and the
//! directory synced: a crash at any point leaves the old cache or the new one. The base is
//! never read.

use crate::engine::check::{self, Repair};
use crate::engine::lock::{self, LockMode};
use crate::engine::qcow2::is_zero;
use crate::engine::storage::{FileStorage, Storage};
use crate::engine::{Format, Image, OpenOptions};
use crate::format::compress;
use crate::format::ext::CacheState;
use crate::format::header::{self, CompressionType, MAX_REFTABLE_BYTES};
use crate::format::refcount;
use crate::format::table::{self, L1Entry, L2Entry, L2Mapping, COPIED, OFFSET_MASK};
use crate::format::types::Geometry;
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod layout;
use layout::{Layout, Stored};

/// A cluster is stored compressed only when that saves at least this fraction (1/8) of it:
/// below, the decompression on every read costs more than the bytes saved.
const MIN_SAVING_SHIFT: u32 = 3;

/// What `compact` did.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompactStats {
    pub path: String,
    /// zstd, zlib or none.
    pub compression: &'static str,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    /// Host clusters of the file before and after (file length in clusters).
    pub clusters_before: u64,
    pub clusters_after: u64,
    /// Guest clusters holding data (plain or compressed) before.
    pub data_clusters_before: u64,
    /// Guest clusters holding data after (data clusters found all-zero became zero clusters).
    pub data_clusters_after: u64,
    /// Distinct contents stored (each once, or again where a refcount would overflow).
    pub stored_contents: u64,
    /// Guest clusters whose stored bytes another guest cluster uses too.
    pub shared_clusters: u64,
    /// Guest clusters stored compressed, and the host clusters their bytes take.
    pub compressed_clusters: u64,
    pub compressed_host_clusters: u64,
    /// Host clusters of plain (uncompressed) data.
    pub plain_host_clusters: u64,
    pub zero_clusters: u64,
    /// Data clusters that held only zeros, now zero clusters.
    pub zeroed_clusters: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub seconds: f64,
}

/// Rewrite the sealed cache at `path` compacted, compressing with `compression` (None: no
/// compression, but identical clusters still shared).
pub fn compact(path: &Path, compression: Option<CompressionType>) -> Result<CompactStats> {
    let t0 = std::time::Instant::now();
    let shown = path;
    // A symlinked cache keeps its link: the file it names is replaced.
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(path, "open", e))?;
    let path = real.as_path();
    // The engine's write lock on the cache: refused while anyone has it open (a server, a QEMU
    // reading it as a backing file, another compaction).
    let lock_file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    lock::lock(&lock_file, path, LockMode::Write)?;
    let src_md = lock_file
        .metadata()
        .map_err(|e| Error::io(path, "stat", e))?;
    let img = Image::open(
        path,
        &OpenOptions {
            write: false,
            backing: false,
            format: Some(Format::Qcow2),
            lock: false,
            lazy_backing: false,
        },
    )?;
    let q = img.as_qcow2().expect("opened as qcow2");
    let h = q.header();
    let meta = q.cache_meta()?.ok_or_else(|| {
        Error::request(path, "not a vmicache cache (no vmicache header extension)")
    })?;
    if meta.state != CacheState::Sealed {
        return Err(Error::request(
            path,
            format!(
                "cache is {}, not sealed: only a sealed cache is compacted (`vmicache seal` it first)",
                meta.state.name()
            ),
        ));
    }
    refuse_features(path, &h)?;
    let geo = h.geometry;
    let cs = geo.cluster_size();

    // Which guest clusters are mapped, and so which L2 tables the new file needs.
    let mut mapped: Vec<(u64, L2Mapping)> = Vec::new();
    q.for_each_mapping(|i, m| {
        mapped.push((i, m));
        Ok(())
    })?;
    let per = geo.l2_entries();
    let l1_size = u64::from(h.l1_size);
    let l1_clusters = geo.clusters_for(l1_size * 8).max(1);
    let mut l2_index: Vec<Option<usize>> = vec![None; l1_size as usize];
    let mut l2_count = 0;
    for (i, _) in &mapped {
        let slot = &mut l2_index[(i / per) as usize];
        if slot.is_none() {
            *slot = Some(l2_count);
            l2_count += 1;
        }
    }
    let mut l2: Vec<Vec<u64>> = vec![vec![0u64; per as usize]; l2_count];
    // Header, L1 and L2 tables first; data follows.
    let meta_clusters = 1 + l1_clusters + l2_count as u64;
    let mut lay = Layout {
        cs,
        rc: vec![1; meta_clusters as usize],
        cpos: 0,
        cend: 0,
        limit: geo.max_refcount().max(u64::from(u16::MAX)),
    };

    let tmp = temp_path(path)?;
    remove_stale_temps(path);
    // Private until it is given the cache's own mode and renamed over it.
    let st = FileStorage::create_with_mode(&tmp, 0o600)?;
    let out = (|| -> Result<CompactStats> {
        let mut stats = CompactStats {
            path: shown.display().to_string(),
            compression: compression.map_or("none", |c| c.name()),
            cluster_size: cs,
            refcount_bits: 0,
            clusters_before: geo.clusters_for(src_md.len()),
            clusters_after: 0,
            data_clusters_before: 0,
            data_clusters_after: 0,
            stored_contents: 0,
            shared_clusters: 0,
            compressed_clusters: 0,
            compressed_host_clusters: 0,
            plain_host_clusters: 0,
            zero_clusters: 0,
            zeroed_clusters: 0,
            bytes_before: src_md.len(),
            bytes_after: 0,
            seconds: 0.0,
        };
        let mut seen: HashMap<[u8; 32], Stored> = HashMap::new();
        let mut refs: Vec<Stored> = Vec::new();
        let mut buf = vec![0u8; cs as usize];
        let mut any_compressed = false;
        for &(i, m) in &mapped {
            let slot = &mut l2[l2_index[(i / per) as usize].unwrap_or(0)][(i % per) as usize];
            if let L2Mapping::Zero { .. } = m {
                *slot = L2Entry::zero().0;
                stats.zero_clusters += 1;
                continue;
            }
            stats.data_clusters_before += 1;
            let off = i * cs;
            let n = cs.min(q.virtual_size() - off) as usize;
            buf[n..].fill(0);
            img.read_at(&mut buf[..n], off)?;
            if is_zero(&buf) {
                *slot = L2Entry::zero().0;
                stats.zero_clusters += 1;
                stats.zeroed_clusters += 1;
                continue;
            }
            stats.data_clusters_after += 1;
            let key = *blake3::hash(&buf).as_bytes();
            let s = match seen.get(&key) {
                Some(s) if lay.can_share(s) => *s,
                _ => {
                    let s = store(&st, &mut lay, &buf, compression, &mut any_compressed)?;
                    seen.insert(key, s);
                    stats.stored_contents += 1;
                    s
                }
            };
            lay.reference(&s);
            refs.push(s);
            *slot = s.entry;
        }
        // COPIED exactly where the refcount is 1 (never on compressed clusters).
        for t in l2.iter_mut() {
            for e in t.iter_mut() {
                let plain = *e & (table::COMPRESSED | table::ZERO) == 0 && *e != 0;
                if plain && lay.rc[(*e & OFFSET_MASK) as usize / cs as usize] == 1 {
                    *e |= COPIED;
                }
            }
        }
        let mut uses: HashMap<u64, u64> = HashMap::new();
        for s in &refs {
            *uses.entry(s.entry).or_insert(0) += 1;
        }
        for s in &refs {
            if uses[&s.entry] > 1 {
                stats.shared_clusters += 1;
            }
            if s.entry & table::COMPRESSED != 0 {
                stats.compressed_clusters += 1;
            }
        }
        let plain = seen
            .values()
            .filter(|s| s.entry & table::COMPRESSED == 0)
            .count() as u64;
        let mut touched = std::collections::BTreeSet::new();
        for s in refs.iter().filter(|s| s.entry & table::COMPRESSED != 0) {
            touched.extend(s.first..=s.last);
        }
        let packed = touched.len() as u64;
        stats.plain_host_clusters = plain;
        stats.compressed_host_clusters = packed;

        // Refcount width: the source's when every count fits, else 16 bits.
        let max_rc = lay.rc.iter().copied().max().unwrap_or(1);
        let order = if max_rc <= geo.max_refcount() {
            geo.refcount_order
        } else {
            geo.refcount_order.max(4)
        };
        let out_geo = Geometry {
            cluster_bits: geo.cluster_bits,
            refcount_order: order,
        };
        stats.refcount_bits = out_geo.refcount_bits();
        let (rt_off, rt, rb) = refcount_layout(path, &out_geo, lay.rc.len() as u64)?;
        let total = lay.rc.len() as u64 + rt + rb;
        lay.rc.resize(total as usize, 1);

        // Tables: L2, L1, refcount blocks and table, then the header.
        let l1_off = cs;
        let mut l1 = vec![0u64; l1_size as usize];
        for (l1i, slot) in l2_index.iter().enumerate() {
            if let Some(k) = slot {
                let off = (1 + l1_clusters + *k as u64) * cs;
                st.write_at(&table::encode_table(&l2[*k]), off)?;
                l1[l1i] = L1Entry::new(crate::format::types::HostOffset(off)).0;
            }
        }
        st.write_at(&table::encode_table(&l1), l1_off)?;
        let rb_off = rt_off + rt * cs;
        let mut rtable = vec![0u64; (rt * cs / 8) as usize];
        let per_block = out_geo.refblock_entries();
        let mut block = vec![0u8; cs as usize];
        for b in 0..rb {
            rtable[b as usize] = rb_off + b * cs;
            block.fill(0);
            let first = b * per_block;
            for (j, &n) in lay.rc[(first as usize).min(lay.rc.len())..]
                .iter()
                .take(per_block as usize)
                .enumerate()
            {
                refcount::set(&mut block, order, j, n);
            }
            st.write_at(&block, rb_off + b * cs)?;
        }
        st.write_at(&table::encode_table(&rtable), rt_off)?;

        let mut nh = h.clone();
        // A writer clears the auto-clear bits it does not maintain (the spec): whatever
        // their data pointed at has moved.
        nh.autoclear = 0;
        nh.geometry = out_geo;
        nh.l1_table_offset = l1_off;
        nh.refcount_table_offset = rt_off;
        nh.refcount_table_clusters = rt as u32;
        nh.incompatible &= !(header::incompat::DIRTY | header::incompat::COMPRESSION);
        nh.compression = CompressionType::Deflate;
        if any_compressed && compression == Some(CompressionType::Zstd) {
            nh.compression = CompressionType::Zstd;
            nh.incompatible |= header::incompat::COMPRESSION;
        }
        let hb = nh.encode().map_err(|e| e.at(&tmp))?;
        st.set_len(total * cs)?;
        st.sync()?;
        st.write_at(&hb, 0)?;
        st.sync()?;

        // Our own check of what we wrote, before it replaces anything.
        let r = check::check(&tmp, Repair::None)?;
        if r.exit_code() != 0 {
            return Err(Error::corrupt(
                &tmp,
                format!(
                    "compacted image fails its check ({} corruptions, {} leaks): {}",
                    r.corruptions,
                    r.leaks,
                    r.messages.first().map_or("", String::as_str)
                ),
            ));
        }
        stats.clusters_after = total;
        stats.bytes_after = total * cs;
        Ok(stats)
    })();
    let mut stats = match out {
        Ok(s) => s,
        Err(e) => {
            drop(st);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // The new file gets the old one's permissions (and owner, where we may).
    use std::os::unix::fs::MetadataExt;
    let _ = std::os::unix::fs::fchown(st.file(), Some(src_md.uid()), Some(src_md.gid()));
    st.file()
        .set_permissions(src_md.permissions())
        .and_then(|()| st.file().sync_all())
        .map_err(|e| Error::io(&tmp, "chmod", e))?;
    drop(st);
    drop(img);
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, "rename", e));
    }
    let dir = dir_of(path);
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(&dir, "sync directory", e))?;
    drop(lock_file);
    stats.seconds = t0.elapsed().as_secs_f64();
    Ok(stats)
}

/// Store one (non-zero) cluster: compressed when that saves enough, else plain.
fn store(
    st: &FileStorage,
    lay: &mut Layout,
    buf: &[u8],
    compression: Option<CompressionType>,
    any_compressed: &mut bool,
) -> Result<Stored> {
    let cs = lay.cs;
    let max_len = cs - (cs >> MIN_SAVING_SHIFT);
    if let Some(c) = compression.and_then(|k| compress::compress(k, buf)) {
        if (c.len() as u64) <= max_len {
            let len = c.len() as u64;
            let at = lay.place_blob(len);
            st.write_at(&c, at)?;
            *any_compressed = true;
            let bits = cs.trailing_zeros();
            return Ok(Stored {
                entry: table::compressed_entry(at, len, bits),
                first: at / cs,
                last: (at + len - 1) / cs,
            });
        }
    }
    let c = lay.alloc();
    st.write_at(buf, c * cs)?;
    Ok(Stored {
        entry: c * cs,
        first: c,
        last: c,
    })
}

/// Where the refcount table goes (after `used` clusters), its clusters and the refcount
/// blocks': enough blocks to count every cluster, themselves and the table included.
fn refcount_layout(path: &Path, g: &Geometry, used: u64) -> Result<(u64, u64, u64)> {
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = used + rt + rb;
        let rb2 = total.div_ceil(g.refblock_entries());
        let rt2 = g.clusters_for(rb2 * 8).max(1);
        if (rb2, rt2) == (rb, rt) {
            break;
        }
        (rb, rt) = (rb2, rt2);
    }
    if rt * g.cluster_size() > MAX_REFTABLE_BYTES {
        return Err(Error::request(
            path,
            "compacted image would need a refcount table over QEMU's 8 MiB limit",
        ));
    }
    Ok((used * g.cluster_size(), rt, rb))
}

/// Features a compaction cannot carry over: refused with their name.
fn refuse_features(path: &Path, h: &header::Header) -> Result<()> {
    let what = if h.version != 3 {
        Some("a version 2 image (caches are version 3)")
    } else if h.nb_snapshots > 0 {
        Some("internal snapshots")
    } else if h.has_extension(header::ext_kind::BITMAPS) {
        Some("persistent dirty bitmaps")
    } else if h.incompatible & header::incompat::CORRUPT != 0 {
        Some("an image marked corrupt (`qemu-img check -r all` first)")
    } else if h.incompatible & header::incompat::DATA_FILE != 0 {
        Some("an external data file")
    } else {
        None
    };
    match what {
        Some(w) => Err(Error::unsupported(path, format!("compacting {w}"))),
        None => Ok(()),
    }
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn temp_prefix(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::request(path, "cache path has no UTF-8 file name"))?;
    Ok(format!(".{name}.compact-"))
}

/// `.NAME.compact-PID.tmp` next to the cache.
fn temp_path(path: &Path) -> Result<PathBuf> {
    Ok(dir_of(path).join(format!("{}{}.tmp", temp_prefix(path)?, std::process::id())))
}

/// Temporary files a killed compaction of this cache left behind (their process is gone).
fn remove_stale_temps(path: &Path) {
    let Ok(prefix) = temp_prefix(path) else {
        return;
    };
    let Ok(rd) = std::fs::read_dir(dir_of(path)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.strip_suffix(".tmp"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // We hold the cache's write lock, so no other compaction of it is running; the pid
        // check is a second guard.
        let gone = pid == std::process::id() as i32
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH);
        if gone && pid > 0 {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_blocks_count_themselves() {
        let g = Geometry {
            cluster_bits: 9,
            refcount_order: 4,
        };
        // 256 entries per 512-byte block: 255 used clusters + table + block need two blocks.
        let (off, rt, rb) = refcount_layout(Path::new("x"), &g, 255).unwrap();
        assert_eq!((off, rt, rb), (255 * 512, 1, 2));
        let (_, rt, rb) = refcount_layout(Path::new("x"), &g, 10).unwrap();
        assert_eq!((rt, rb), (1, 1));
    }
}
