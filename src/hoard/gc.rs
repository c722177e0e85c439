//! `hoard gc`: delete packs no cache refers to, repack packs that are mostly garbage (and,
//! with `recompress`, every pack, at a slower zstd level: the repack off the hot path that
//! `hoard add`'s fast level leaves to later).
//!
//! Crash safety: new packs are written and synced first; then each index that named a
//! repacked pack is rewritten (synced, renamed into place); only then are old packs deleted.
//! A kill at any point leaves every index resolving (to old packs or new), and at worst
//! packs nothing refers to, which the next gc deletes.

use super::format::{Key, CHUNK};
use super::index::{push_run, CacheIndex, IndexRun};
use super::pipe::{with_pipe, PACK_CHUNKS};
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
    let named: HashSet<[u8; 32]> = idx
        .iter()
        .flat_map(|(_, i)| i.packs.iter().copied())
        .collect();
    let mut readers: HashMap<[u8; 32], PackReader> = HashMap::new();
    let mut dead = Vec::new();
    for id in h.pack_ids()? {
        match PackReader::open(&h.pack_path(&id)) {
            Ok(r) => {
                readers.insert(id, r);
            }
            // Damaged, and nothing needs it: it goes.
            Err(_) if !named.contains(&id) => dead.push(id),
            Err(e) => return Err(e),
        }
    }
    // Every index must resolve (as a reader checks it) before anything is judged unused.
    for (n, i) in &idx {
        check_runs(i, &readers).map_err(|what| {
            Error::corrupt(h.dir(), format!("cache '{n}': {what} (`hoard verify`)"))
        })?;
    }
    let sizes: HashMap<[u8; 32], u32> = readers.iter().map(|(id, p)| (*id, p.chunks())).collect();
    let refs: Vec<&CacheIndex> = idx.iter().map(|(_, i)| i).collect();
    let live = live_map(&refs, &sizes);
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
    // Packs no cache uses go first (a repack that fails later still leaves them collected).
    for id in &dead {
        let p = h.pack_path(id);
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
    }
    rep.deleted_packs = dead.len();
    sync_dir(&h.dir().join("packs"))?;

    // Copy the live chunks of the packs to repack into new packs, in their old order.
    let level = o.recompress.unwrap_or(h.settings.level);
    let frame_chunks = o.frame_chunks.unwrap_or(h.settings.frame_chunks) as usize;
    let mut moved: HashMap<ChunkAt, ChunkAt> = HashMap::new();
    // Packs this gc wrote: never deleted by it, even when one has the id of a pack it
    // replaces (the same chunks packed the same way make the same bytes).
    let mut keep: HashSet<[u8; 32]> = HashSet::new();
    if !repack.is_empty() {
        // For each chunk of the new packs, in order: its old place and (pack number, chunk).
        let mut placed: Vec<(ChunkAt, u32, u32)> = Vec::new();
        let ((), written) = with_pipe(h, level, |pipe| {
            let mut raw: Vec<u8> = Vec::new();
            let mut keys: Vec<Key> = Vec::new();
            let (mut pack, mut in_pack) = (0u32, 0u32);
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
                        if in_pack == PACK_CHUNKS {
                            if !keys.is_empty() {
                                pipe.push(
                                    pack,
                                    std::mem::take(&mut raw),
                                    std::mem::take(&mut keys),
                                )?;
                            }
                            pack += 1;
                            in_pack = 0;
                        }
                        let at = ((c - f0) as u64 * CHUNK) as usize;
                        raw.extend_from_slice(&data[at..at + CHUNK as usize]);
                        keys.push(pkeys[c as usize]);
                        placed.push(((*id, c), pack, in_pack));
                        in_pack += 1;
                        if keys.len() == frame_chunks {
                            pipe.push(pack, std::mem::take(&mut raw), std::mem::take(&mut keys))?;
                        }
                    }
                }
            }
            if !keys.is_empty() {
                pipe.push(pack, raw, keys)?;
            }
            Ok(())
        })?;
        for (old, p, c) in placed {
            let new = *written
                .ids
                .get(&p)
                .ok_or_else(|| Error::corrupt(h.dir(), "gc lost a pack it wrote"))?;
            moved.insert(old, (new, c));
        }
        keep.extend(written.ids.values().copied());
        rep.new_packs = written.ids.len();
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
    for id in repack.iter().filter(|id| !keep.contains(*id)) {
        let p = h.pack_path(id);
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
    }
    sync_dir(&h.dir().join("packs"))?;
    rep.bytes_after = packs_bytes(h)?;
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

/// Whether every run of `i` lies within its pack (as a reader checks when it opens it).
fn check_runs(
    i: &CacheIndex,
    packs: &HashMap<[u8; 32], PackReader>,
) -> std::result::Result<(), String> {
    for (k, r) in i.runs.iter().enumerate().filter(|(_, r)| r.in_pack()) {
        let id = &i.packs[r.pack as usize];
        let Some(p) = packs.get(id) else {
            return Err(format!(
                "names pack {}, which is missing",
                super::format::hex(id)
            ));
        };
        if r.first.checked_add(r.count).is_none_or(|e| e > p.chunks()) {
            return Err(format!(
                "run {k} lies beyond the end of pack {}",
                super::format::hex(id)
            ));
        }
    }
    Ok(())
}

/// `i` with every chunk of a moved pack pointing to its new place.
fn remap(i: &CacheIndex, moved: &HashMap<ChunkAt, ChunkAt>) -> Result<CacheIndex> {
    let mut packs: Vec<[u8; 32]> = Vec::new();
    let mut local: HashMap<[u8; 32], u32> = HashMap::new();
    let mut runs: Vec<IndexRun> = Vec::new();
    for r in &i.runs {
        if !r.in_pack() {
            push_run(&mut runs, r.start, r.count, r.pack, 0);
            continue;
        }
        for k in 0..r.count {
            let old = (i.packs[r.pack as usize], r.first + k);
            let (id, n) = moved.get(&old).copied().unwrap_or(old);
            let next = packs.len() as u32;
            let l = *local.entry(id).or_insert_with(|| {
                packs.push(id);
                next
            });
            push_run(&mut runs, r.start + u64::from(k), 1, l, n);
        }
    }
    Ok(CacheIndex {
        packs,
        runs,
        ..i.clone()
    })
}
