//! `hoard verify`: every pack's hash, every frame and chunk, every index resolving.

use super::format::{hex, key_of, parse_hex, CHUNK};
use super::layer::HoardLayer;
use super::store::{Hoard, PackReader};
use crate::engine::storage::FileStorage;
use crate::Result;
use std::collections::HashSet;
use std::io::Read;

/// What verify found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub packs: usize,
    pub chunks: u64,
    pub caches: usize,
    /// Generations kept here (all checked).
    pub generations: usize,
    /// Damage: each names the file and what is wrong.
    pub problems: Vec<String>,
    /// Harmless findings: packs no cache refers to (gc reclaims them), leftovers.
    pub notes: Vec<String>,
}

/// BLAKE3 of a whole file, streamed.
fn file_hash(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(*h.finalize().as_bytes());
        }
        h.update(&buf[..n]);
    }
}

/// Check one pack: its id (BLAKE3 of the file), then every frame against its hash and every
/// chunk against its key (a pack can be unchanged since it was written and still wrong).
fn check_pack(path: &std::path::Path, id: &[u8; 32], r: &mut Report) {
    let p = path.display();
    match file_hash(path) {
        Ok(h) if &h == id => {}
        Ok(_) => r
            .problems
            .push(format!("{p}: content does not match its name (BLAKE3)")),
        // Gone since it was listed (a gc, though verify holds the writers' lock): not damage.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return r.problems.push(format!("{p}: {e}")),
    }
    let pr = match PackReader::open(path) {
        Ok(pr) => pr,
        Err(e) => return r.problems.push(e.to_string()),
    };
    r.chunks += u64::from(pr.chunks());
    let keys = match pr.keys() {
        Ok(k) => Some(k),
        Err(e) => {
            r.problems.push(e.to_string());
            None
        }
    };
    for i in 0..pr.frames.len() {
        match pr.read_frame(i) {
            Err(e) => r.problems.push(e.to_string()),
            Ok(d) => {
                let Some(k) = &keys else { continue };
                for (j, c) in d.chunks_exact(CHUNK as usize).enumerate() {
                    let n = pr.first[i] as usize + j;
                    if key_of(c) != k[n] {
                        r.problems
                            .push(format!("{p}: chunk {n} (frame {i}) does not match its key"));
                    }
                }
            }
        }
    }
}

/// Check the whole hoard. Holds the lock shared, so no add or gc changes it meanwhile (and
/// several verifies may run at once).
pub fn verify(h: &Hoard) -> Result<Report> {
    let _lock = h.read_lock()?;
    let mut r = Report::default();
    let dir = h.dir().join("packs");
    let mut present = HashSet::new();
    for e in std::fs::read_dir(&dir).map_err(|e| crate::Error::io(&dir, "list", e))? {
        let e = e.map_err(|e| crate::Error::io(&dir, "list", e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with(".tmp-") {
            r.notes.push(format!(
                "{}: left by a writer that stopped (gc removes it)",
                e.path().display()
            ));
            continue;
        }
        match n.strip_suffix(".pack").and_then(parse_hex) {
            Some(id) => {
                r.packs += 1;
                check_pack(&e.path(), &id, &mut r);
                present.insert(id);
            }
            None => r
                .problems
                .push(format!("{}: not a pack name", e.path().display())),
        }
    }
    let mut used = HashSet::new();
    let mut unread = false;
    match h.head_caches() {
        Err(e) => {
            // No newest generation to check against: nothing is judged unused either.
            r.problems.push(e.to_string());
            unread = true;
        }
        Ok(caches) => check_generations(h, &caches, &present, &mut used, &mut unread, &mut r)?,
    }
    for id in h.gen_ids()? {
        if let Err(e) = h.read_gen(&id) {
            r.problems.push(e.to_string());
        }
    }
    if !unread {
        for id in present.difference(&used) {
            r.notes.push(format!(
                "pack {} is not used by any cache (gc reclaims it)",
                hex(id)
            ));
        }
    }
    r.notes.sort();
    Ok(r)
}

/// The newest generation's caches (each opened as a reader opens it), then the older
/// generations kept here (each index read, its packs present).
fn check_generations(
    h: &Hoard,
    caches: &std::collections::BTreeMap<String, [u8; 32]>,
    present: &HashSet<[u8; 32]>,
    used: &mut HashSet<[u8; 32]>,
    unread: &mut bool,
    r: &mut Report,
) -> Result<()> {
    for (name, id) in caches {
        r.caches += 1;
        let path = h.stored_index_path(id);
        if let Err(e) = h.index_bytes(id) {
            r.problems.push(format!("cache '{name}': {e}"));
        }
        // The packs an index names count as used even when something else of it is wrong.
        match super::store::read_index_file(&path) {
            Ok(i) => used.extend(i.packs.iter().copied()),
            Err(_) => *unread = true,
        }
        let opened =
            FileStorage::open(&path, false).and_then(|st| HoardLayer::open(&path, Box::new(st)));
        if let Err(e) = opened {
            r.problems.push(format!("cache '{name}': {e}"));
        }
    }
    let mut seen: HashSet<[u8; 32]> = caches.values().copied().collect();
    let hist = h.history()?;
    r.generations = hist.len();
    for (_, g) in hist.iter().skip(1) {
        let Ok(idx) = g.indexes() else { continue };
        for (name, id) in idx {
            if !seen.insert(id) {
                continue;
            }
            let what = format!("cache '{name}' of generation {}", g.generation);
            match h.stored_index(&id) {
                Ok(i) => {
                    for p in &i.packs {
                        if !present.contains(p) {
                            r.problems
                                .push(format!("{what}: names pack {}, which is missing", hex(p)));
                        }
                    }
                    used.extend(i.packs.iter().copied());
                }
                Err(e) => {
                    r.problems.push(format!("{what}: {e}"));
                    *unread = true;
                }
            }
        }
    }
    if !h.view_matches()? {
        r.notes.push(format!(
            "{}/caches does not match the newest generation yet (a writer stopped; the next one puts it right)",
            h.dir().display()
        ));
    }
    Ok(())
}
