//! `hoard gc`: delete packs no cache refers to, repack packs that are mostly garbage (and,
//! with `recompress`, every pack, at a slower zstd level: the repack off the hot path that
//! `hoard add`'s fast level leaves to later).
//!
//! Crash safety: new packs are written and synced first; then each index that named a
//! repacked pack is rewritten (synced, renamed into place); only then are old packs deleted.
//! A kill at any point leaves every index resolving (to old packs or new), and at worst
//! packs nothing refers to, which the next gc deletes.

use super::format::{CacheIndex, IndexRun, Key, CHUNK, ZERO_DATA_PACK};
use super::pipe::with_pipe;
use super::stats::{indexes, live_map};
use super::store::{sync_dir, Hoard, PackReader};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};

/// A chunk: (pack id, chunk in the pack).
type ChunkAt = ([u8; 32], u32);

/// A pack whose live chunks are below this share is repacked.
const REPACK_BELOW: f64 = 0.5;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    /// Packs deleted whole (nothing used them).
    pub deleted_packs: usize,
    /// Packs rewritten, and the packs they became.
    pub repacked: usize,
    pub new_packs: usize,
    /// Indexes rewritten to name the new packs.
    pub indexes_rewritten: usize,
    /// Temporary files of stopped writers removed.
    pub leftovers: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub seconds: f64,
}

/// Options of a gc.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Repack every pack at this zstd level (and this frame size, in chunks).
    pub recompress: Option<i32>,
    pub frame_chunks: Option<u32>,
}

fn packs_bytes(h: &Hoard) -> Result<u64> {
    Ok(h.pack_ids()?
        .iter()
        .map(|id| std::fs::metadata(h.pack_path(id)).map_or(0, |m| m.len()))
        .sum())
}

pub fn gc(h: &Hoard, o: &GcOptions) -> Result<GcReport> {
    let t0 = std::time::Instant::now();
    let _lock = h.lock()?;
    let mut rep = GcReport {
        bytes_before: packs_bytes(h)?,
        ..GcReport::default()
    };
    for p in h.leftovers()? {
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
        rep.leftovers += 1;
    }
    let all = indexes(h)?;
    // An index that does not read keeps every pack: gc never deletes what it cannot rule out.
    if let Some((n, Err(e))) = all.iter().find(|(_, i)| i.is_err()) {
        return Err(Error::refused(
            h.dir(),
            format!("cache '{n}' does not read ({e}): nothing collected (`hoard verify`, `hoard rm {n}`)"),
        ));
    }
    let idx: Vec<(String, CacheIndex)> = all.into_iter().map(|(n, i)| (n, i.unwrap())).collect();
    let mut readers: HashMap<[u8; 32], PackReader> = HashMap::new();
    for id in h.pack_ids()? {
        readers.insert(id, PackReader::open(&h.pack_path(&id))?);
    }
    let sizes: HashMap<[u8; 32], u32> = readers.iter().map(|(id, p)| (*id, p.chunks())).collect();
    let refs: Vec<&CacheIndex> = idx.iter().map(|(_, i)| i).collect();
    let live = live_map(&refs, &sizes);
    for (_, i) in &idx {
        if let Some(id) = i.packs.iter().find(|id| !readers.contains_key(*id)) {
            return Err(Error::corrupt(
                h.dir(),
                format!(
                    "a cache names pack {} which is missing (`hoard verify`)",
                    super::format::hex(id)
                ),
            ));
        }
    }
    let mut dead = Vec::new();
    let mut repack: Vec<[u8; 32]> = Vec::new();
    let mut ids: Vec<&[u8; 32]> = live.keys().collect();
    ids.sort();
    for id in ids {
        let v = &live[id];
        let n = v.iter().filter(|&&x| x).count();
        if n == 0 {
            dead.push(*id);
        } else if o.recompress.is_some() || (n as f64) < REPACK_BELOW * v.len() as f64 {
            repack.push(*id);
        }
    }

    // Copy the live chunks of the packs to repack into new packs, in their old order.
    let level = o.recompress.unwrap_or(h.settings.level);
    let frame_chunks = o.frame_chunks.unwrap_or(h.settings.frame_chunks) as usize;
    let mut moved: HashMap<ChunkAt, ChunkAt> = HashMap::new();
    if !repack.is_empty() {
        let mut pending: Vec<ChunkAt> = Vec::new(); // old place of each chunk of the new pack
        let ((), written) = with_pipe(h, level, |pipe| {
            let mut raw: Vec<u8> = Vec::new();
            let mut keys: Vec<Key> = Vec::new();
            for id in &repack {
                let pr = &readers[id];
                let pkeys = pr.keys()?;
                let v = &live[id];
                for fi in 0..pr.frames.len() {
                    let f0 = pr.first[fi];
                    let n = u32::from(pr.frames[fi].chunks);
                    if !(f0..f0 + n).any(|c| v[c as usize]) {
                        continue;
                    }
                    let data = pr.read_frame(fi)?;
                    for c in (f0..f0 + n).filter(|&c| v[c as usize]) {
                        let at = ((c - f0) as u64 * CHUNK) as usize;
                        raw.extend_from_slice(&data[at..at + CHUNK as usize]);
                        keys.push(pkeys[c as usize]);
                        pending.push((*id, c));
                        if keys.len() == frame_chunks {
                            pipe.push(0, std::mem::take(&mut raw), std::mem::take(&mut keys))?;
                        }
                    }
                }
            }
            if !keys.is_empty() {
                pipe.push(0, raw, keys)?;
            }
            Ok(())
        })?;
        if let Some(new) = written.ids.get(&0) {
            rep.new_packs = 1;
            for (i, old) in pending.into_iter().enumerate() {
                moved.insert(old, (*new, i as u32));
            }
        }
        rep.repacked = repack.len();
    }

    // Rewrite the indexes that name repacked packs.
    let gone: HashSet<[u8; 32]> = repack.iter().copied().collect();
    for (name, i) in &idx {
        if !i.packs.iter().any(|p| gone.contains(p)) {
            continue;
        }
        h.write_index(name, &remap(i, &moved)?)?;
        rep.indexes_rewritten += 1;
    }
    for id in dead.iter().chain(repack.iter()) {
        let p = h.pack_path(id);
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
    }
    rep.deleted_packs = dead.len();
    sync_dir(&h.dir().join("packs"))?;
    rep.bytes_after = packs_bytes(h)?;
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

/// `i` with every chunk of a moved pack pointing to its new place.
fn remap(i: &CacheIndex, moved: &HashMap<ChunkAt, ChunkAt>) -> Result<CacheIndex> {
    let mut packs: Vec<[u8; 32]> = Vec::new();
    let mut local: HashMap<[u8; 32], u32> = HashMap::new();
    let mut runs: Vec<IndexRun> = Vec::new();
    for r in &i.runs {
        for k in 0..r.count {
            let c = r.start + u64::from(k);
            let (pack, first) = if !r.in_pack() {
                (r.pack, 0)
            } else {
                let old = (i.packs[r.pack as usize], r.first + k);
                let (id, n) = moved.get(&old).copied().unwrap_or(old);
                let next = packs.len() as u32;
                let l = *local.entry(id).or_insert_with(|| {
                    packs.push(id);
                    next
                });
                (l, n)
            };
            match runs.last_mut() {
                Some(l)
                    if l.end() == c
                        && l.pack == pack
                        && (pack >= ZERO_DATA_PACK || l.first + l.count == first) =>
                {
                    l.count += 1
                }
                _ => runs.push(IndexRun {
                    start: c,
                    count: 1,
                    pack,
                    first,
                }),
            }
        }
    }
    Ok(CacheIndex {
        packs,
        runs,
        ..i.clone()
    })
}
