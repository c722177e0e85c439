//! What a hoard holds: its caches and how much each takes, the packs, deduplication and
//! compression figures; and `hoard rm`.

use super::ahead::Uses;
use super::format::{CHUNK, FRAME_ENTRY, KEY_LEN, PACK_FOOTER, PACK_HEADER};
use super::index::CacheIndex;
use super::parts::FrameEdges;
use super::store::{Hoard, PackReader};
use crate::format::ext::CacheMeta;
use crate::{Error, Result};
use std::collections::HashMap;

/// One hoarded cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheInfo {
    pub name: String,
    pub virtual_size: u64,
    /// Guest bytes in data chunks (stored in packs) and in zeros (zero clusters, and data
    /// chunks of zeros).
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// Index runs, and the index file's size.
    pub runs: usize,
    pub index_bytes: u64,
    /// The base as the cache named it.
    pub base: Option<String>,
    /// When the cache was sealed (Unix seconds), from its vmicache extension.
    pub sealed: Option<u64>,
    pub trace_bytes: u64,
    /// Set when the index could not be read (the other fields are then zero).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole hoard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HoardStats {
    pub dir: String,
    pub caches: Vec<CacheInfo>,
    pub packs: usize,
    /// Bytes of pack files on disk, and of compressed frames in them.
    pub pack_bytes: u64,
    pub frame_bytes: u64,
    /// Chunks stored in packs, and those of them some cache refers to.
    pub stored_chunks: u64,
    pub live_chunks: u64,
    /// Guest bytes of data all caches hold (what they would take as separate caches, less
    /// zeros).
    pub logical_bytes: u64,
    /// logical / unique (live chunks × 4 KiB).
    pub dedup_ratio: f64,
    /// Unique bytes / bytes of their frames.
    pub compression_ratio: f64,
    /// logical / bytes on disk (packs and indexes).
    pub total_ratio: f64,
    /// Bytes of every index and pack table (not data), per stored chunk.
    pub metadata_per_chunk: f64,
    /// Bytes a server holds in memory per stored chunk with every cache open: index runs,
    /// frame tables and where each cache uses each frame (the chunk keys stay on disk: only
    /// `hoard add` reads them).
    pub memory_per_chunk: f64,
    pub index_bytes: u64,
}

impl CacheInfo {
    pub fn of(name: &str, idx: &CacheIndex, index_bytes: u64) -> CacheInfo {
        let mut data = 0u64;
        let mut zero = 0u64;
        for r in &idx.runs {
            let b = (r.end() * CHUNK).min(idx.virtual_size) - r.start * CHUNK;
            if r.in_pack() {
                data += b;
            } else {
                zero += b;
            }
        }
        let meta = CacheMeta::decode(&idx.extension).ok();
        CacheInfo {
            name: name.to_string(),
            virtual_size: idx.virtual_size,
            data_bytes: data,
            zero_bytes: zero,
            runs: idx.runs.len(),
            index_bytes,
            base: idx.backing_file.clone(),
            sealed: meta.map(|m| m.sealed).filter(|&s| s != 0),
            trace_bytes: idx.trace.len() as u64,
            error: None,
        }
    }
}

/// The indexes of all hoarded caches (those that read; the others with their error).
/// A hoarded cache: its name, its index's id, and the index (or why it does not read).
pub type Hoarded = (String, [u8; 32], std::result::Result<CacheIndex, Error>);

/// The newest generation's caches.
pub fn indexes(h: &Hoard) -> Result<Vec<Hoarded>> {
    Ok(h.head_caches()?
        .into_iter()
        .map(|(n, id)| {
            let i = h.stored_index(&id);
            (n, id, i)
        })
        .collect())
}

/// Chunks of each pack (by id) that some index refers to.
pub fn live_map(
    idx: &[&CacheIndex],
    packs: &HashMap<[u8; 32], u32>,
) -> HashMap<[u8; 32], Vec<bool>> {
    let mut live: HashMap<[u8; 32], Vec<bool>> = packs
        .iter()
        .map(|(id, &n)| (*id, vec![false; n as usize]))
        .collect();
    for i in idx {
        for r in i.runs.iter().filter(|r| r.in_pack()) {
            if let Some(v) = live.get_mut(&i.packs[r.pack as usize]) {
                let (a, b) = (r.first as usize, (r.first + r.count) as usize);
                if b <= v.len() {
                    v[a..b].iter_mut().for_each(|x| *x = true);
                }
            }
        }
    }
    live
}

pub fn stats(h: &Hoard) -> Result<HoardStats> {
    let all = indexes(h)?;
    let mut caches = Vec::new();
    let mut index_bytes = 0;
    for (n, id, i) in &all {
        let len = std::fs::metadata(h.stored_index_path(id)).map_or(0, |m| m.len());
        index_bytes += len;
        caches.push(match i {
            Ok(i) => CacheInfo::of(n, i, len),
            Err(e) => CacheInfo {
                name: n.clone(),
                virtual_size: 0,
                data_bytes: 0,
                zero_bytes: 0,
                runs: 0,
                index_bytes: len,
                base: None,
                sealed: None,
                trace_bytes: 0,
                error: Some(e.to_string()),
            },
        });
    }
    let ok: Vec<&CacheIndex> = all.iter().filter_map(|(_, _, i)| i.as_ref().ok()).collect();
    let mut sizes = HashMap::new();
    let (mut pack_bytes, mut frame_bytes, mut stored, mut tables) = (0u64, 0u64, 0u64, 0u64);
    let mut memory: u64 = ok
        .iter()
        .map(|i| (i.runs.len() * std::mem::size_of::<super::index::IndexRun>()) as u64)
        .sum();
    let ids = h.pack_ids()?;
    let mut edges = HashMap::new();
    for id in &ids {
        let path = h.pack_path(id);
        pack_bytes += std::fs::metadata(&path).map_or(0, |m| m.len());
        if let Ok(p) = PackReader::open(&path) {
            sizes.insert(*id, p.chunks());
            stored += u64::from(p.chunks());
            frame_bytes += p.footer.table_offset - PACK_HEADER;
            memory += u64::from(p.footer.frames)
                * (std::mem::size_of::<super::format::Frame>() + 4) as u64;
            tables += PACK_HEADER
                + PACK_FOOTER
                + u64::from(p.footer.frames) * FRAME_ENTRY
                + u64::from(p.chunks()) * KEY_LEN as u64;
            // Its frame edges, not the reader: a hoard may hold more packs than files open.
            let chunks = p.chunks();
            edges.insert(*id, (p.first, chunks));
        }
    }
    // Where each cache uses each frame: built when a cache is read in guest order (not over
    // MAX_USES uses).
    for (_, id, i) in &all {
        let Ok(i) = i else { continue };
        let packs: Option<Vec<FrameEdges>> = (i.packs.iter())
            .map(|id| {
                let (first, chunks) = edges.get(id)?;
                Some(FrameEdges {
                    first,
                    chunks: *chunks,
                })
            })
            .collect();
        let Some(packs) = packs else { continue };
        if let Ok(Some(uses)) = Uses::of(i, &h.stored_index_path(id), &packs) {
            memory += uses.bytes();
        }
    }
    let live: u64 = live_map(&ok, &sizes)
        .values()
        .map(|v| v.iter().filter(|&&x| x).count() as u64)
        .sum();
    let logical: u64 = caches.iter().map(|c| c.data_bytes).sum();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ok(HoardStats {
        dir: h.dir().display().to_string(),
        caches,
        packs: ids.len(),
        pack_bytes,
        frame_bytes,
        stored_chunks: stored,
        live_chunks: live,
        logical_bytes: logical,
        dedup_ratio: ratio(logical as f64, (live * CHUNK) as f64),
        compression_ratio: ratio((stored * CHUNK) as f64, frame_bytes as f64),
        total_ratio: ratio(logical as f64, (pack_bytes + index_bytes) as f64),
        metadata_per_chunk: ratio((tables + index_bytes) as f64, stored as f64),
        memory_per_chunk: ratio(memory as f64, stored as f64),
        index_bytes,
    })
}

/// Deregister a cache: its index goes; the chunks only it used stay until `hoard gc`.
pub fn remove(h: &Hoard, name: &str) -> Result<()> {
    super::store::check_name(name)?;
    let lock = h.lock()?;
    h.sync_view()?;
    let mut caches = h.head_caches()?;
    if caches.remove(name).is_none() {
        return Err(h.no_such(name));
    }
    h.commit(&lock, &format!("rm {name}"), &caches)?;
    Ok(())
}
