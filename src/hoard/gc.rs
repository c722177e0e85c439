//! `hoard gc`: delete packs no cache refers to, repack packs that are mostly garbage (and,
//! with `recompress`, every pack, at a slower zstd level: the repack off the hot path that
//! `hoard add`'s fast level leaves to later).
//!
//! The GC window: the generations of the last `keep_days` days and the newest are kept, with
//! every index and pack they name; older generations, and whatever only they named, go.
//! Only the newest generation's indexes are repacked (older ones are immutable), and only
//! packs that no older kept generation names (repacking those would free nothing).
//!
//! Crash safety: new packs are written and synced first; then the rewritten indexes, and a
//! new generation naming them is committed; only then are old packs, indexes and records
//! deleted. A kill at any point leaves every kept generation resolving, and at worst files
//! nothing refers to, which the next gc deletes.

use super::format::{Key, CHUNK};
use super::gens::{GenId, Generation};
use super::index::{push_run, CacheIndex, IndexRun};
use super::pipe::{with_pipe, PACK_CHUNKS};
use super::stats::live_map;
use super::store::{sync_dir, Hoard, PackReader};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap, HashSet};

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
    /// Generations out of the window, and indexes only they named, deleted.
    pub deleted_generations: usize,
    pub deleted_indexes: usize,
    /// Generations kept.
    pub kept_generations: usize,
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
    /// Keep the generations of this many last days (default: the hoard's `keep_days`).
    pub keep_days: Option<u32>,
    /// Delete only: never repack, so never make a generation of its own (what a node that
    /// follows a registry runs: a local generation would stand between it and the next
    /// one the storage node publishes).
    pub no_repack: bool,
}

/// The generations gc keeps (newest first): the newest, and those that were the newest at
/// some time in the last `days` days (a generation counts from when the next one came, so
/// that one that stayed newest for a month is not dropped the day after it is replaced).
/// `days`: None for the hoard's `keep_days`.
pub fn kept_generations(h: &Hoard, days: Option<u32>) -> Result<Vec<(GenId, Generation)>> {
    let days = days.unwrap_or(h.settings.keep_days);
    let since = super::gens::now().saturating_sub(u64::from(days) * 86_400);
    Ok(h.history_since()?
        .into_iter()
        .filter(|(_, _, replaced)| replaced.is_none_or(|t| days > 0 && t >= since))
        .map(|(id, g, _)| (id, g))
        .collect())
}

/// Delete the generation records not in `gens`, then the stored indexes not in `indexes`
/// (records first: a kill between leaves indexes nothing names, never a record naming
/// what is gone). The numbers deleted.
fn drop_unkept(
    h: &Hoard,
    gens: &HashSet<GenId>,
    indexes: &HashSet<[u8; 32]>,
) -> Result<(usize, usize)> {
    let mut counts = [0usize; 2];
    let files = [
        (h.gen_ids()?, gens, h.dir().join("gens")),
        (h.ids("indexes", ".vmh")?, indexes, h.dir().join("indexes")),
    ];
    for (k, (ids, keep, dir)) in files.into_iter().enumerate() {
        for id in ids.iter().filter(|id| !keep.contains(*id)) {
            let p = if k == 0 {
                h.gen_path(id)
            } else {
                h.stored_index_path(id)
            };
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
            counts[k] += 1;
        }
        if counts[k] > 0 {
            sync_dir(&dir)?;
        }
    }
    Ok((counts[0], counts[1]))
}

fn packs_bytes(h: &Hoard) -> Result<u64> {
    Ok(h.pack_ids()?
        .iter()
        .map(|id| std::fs::metadata(h.pack_path(id)).map_or(0, |m| m.len()))
        .sum())
}

pub fn gc(h: &Hoard, o: &GcOptions) -> Result<GcReport> {
    let t0 = std::time::Instant::now();
    let lock = h.lock()?;
    let mut rep = GcReport {
        bytes_before: packs_bytes(h)?,
        ..GcReport::default()
    };
    h.ensure_heads(&lock)?;
    rep.leftovers += h.sweep_registers()?;
    for p in h.leftovers()? {
        std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
        rep.leftovers += 1;
    }
    h.sync_view()?;
    let kept = kept_generations(h, o.keep_days)?;
    // Every index of a kept generation, read. One that does not read keeps every pack: gc
    // never deletes what it cannot rule out.
    let mut kept_idx: HashMap<[u8; 32], CacheIndex> = HashMap::new();
    for (_, g) in &kept {
        for (n, id) in g.indexes()? {
            if kept_idx.contains_key(&id) {
                continue;
            }
            let i = h.stored_index(&id).map_err(|e| Error::refused(
                h.dir(),
                format!("cache '{n}' of generation {} does not read ({e}): nothing collected (`hoard verify`)", g.generation),
            ))?;
            kept_idx.insert(id, i);
        }
    }
    let head = kept
        .first()
        .map(|(_, g)| g.indexes())
        .transpose()?
        .unwrap_or_default();
    let idx: Vec<(String, CacheIndex)> = head
        .iter()
        .map(|(n, id)| (n.clone(), kept_idx[id].clone()))
        .collect();
    let head_ids: HashSet<[u8; 32]> = head.values().copied().collect();
    let named: HashSet<[u8; 32]> = kept_idx
        .values()
        .flat_map(|i| i.packs.iter().copied())
        .collect();
    // Packs an older kept generation names: they stay while it does.
    let pinned: HashSet<[u8; 32]> = kept_idx
        .iter()
        .filter(|(id, _)| !head_ids.contains(*id))
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
    for (id, i) in &kept_idx {
        let n = head
            .iter()
            .find(|(_, x)| *x == id)
            .map_or("(older)", |(n, _)| n);
        check_runs(i, &readers).map_err(|what| {
            Error::corrupt(h.dir(), format!("cache '{n}': {what} (`hoard verify`)"))
        })?;
    }
    let sizes: HashMap<[u8; 32], u32> = readers.iter().map(|(id, p)| (*id, p.chunks())).collect();
    let refs: Vec<&CacheIndex> = kept_idx.values().collect();
    let live = live_map(&refs, &sizes);
    let mut repack: Vec<[u8; 32]> = Vec::new();
    let mut ids: Vec<&[u8; 32]> = live.keys().collect();
    ids.sort();
    for id in ids {
        let v = &live[id];
        let n = v.iter().filter(|&&x| x).count();
        if n == 0 {
            dead.push(*id);
        } else if pinned.contains(id) || o.no_repack {
            continue;
        } else if o.recompress.is_some() || (n as f64) < REPACK_BELOW * v.len() as f64 {
            repack.push(*id);
        }
    }
    // Generations out of the window go first, then what only they used: the packs no kept
    // generation uses (a repack that fails later still leaves them collected).
    let (g, i) = drop_unkept(
        h,
        &kept.iter().map(|(id, _)| *id).collect(),
        &kept_idx.keys().copied().collect(),
    )?;
    rep.deleted_generations += g;
    rep.deleted_indexes += i;
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

    // Rewrite the newest generation's indexes that name repacked packs, and commit them.
    let gone: HashSet<[u8; 32]> = repack.iter().copied().collect();
    let mut caches: BTreeMap<String, [u8; 32]> = head.clone();
    for (name, i) in &idx {
        if !i.packs.iter().any(|p| gone.contains(p)) {
            continue;
        }
        caches.insert(name.clone(), h.put_index(&remap(i, &moved)?)?);
        rep.indexes_rewritten += 1;
    }
    if rep.indexes_rewritten > 0 {
        h.commit(&lock, "gc (repack)", &caches)?;
    }
    // What the window keeps now (the generation before a repack's is kept by a window of a
    // day or more, and with it the packs it names).
    let kept = kept_generations(h, o.keep_days)?;
    rep.kept_generations = kept.len();
    let keep_gens: HashSet<GenId> = kept.iter().map(|(id, _)| *id).collect();
    let mut keep_indexes: HashSet<[u8; 32]> = HashSet::new();
    for (_, g) in &kept {
        keep_indexes.extend(g.indexes()?.into_values());
    }
    let mut named_now: HashSet<[u8; 32]> = HashSet::new();
    for id in &keep_indexes {
        match kept_idx.get(id) {
            Some(i) => named_now.extend(i.packs.iter().copied()),
            None => named_now.extend(h.stored_index(id)?.packs),
        }
    }
    let (g, i) = drop_unkept(h, &keep_gens, &keep_indexes)?;
    h.prune_heads(&keep_gens)?;
    rep.deleted_generations += g;
    rep.deleted_indexes += i;
    for id in repack
        .iter()
        .filter(|id| !keep.contains(*id) && !named_now.contains(*id))
    {
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
