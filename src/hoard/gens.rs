//! Generations: every change of the hoard (add, rm, a gc that rewrites indexes, a receive or
//! pull) makes a new immutable generation, and moving `HEAD` to it is the one step that
//! commits the change.
//!
//! ```text
//! HOARD/gens/<id>.gen        a generation record (YAML; id = BLAKE3 of the file)
//! HOARD/indexes/<id>.vmh     cache indexes, content-addressed (id = BLAKE3 of the file)
//! HOARD/HEAD                 the id of the newest generation (`none` before the first)
//! HOARD/heads                the generations that were newest here, and since when
//! HOARD/caches/<name>.vmh    the newest generation's indexes, hard links (what chains name)
//! ```
//!
//! Order of a commit: packs, then indexes, then the record are written and synced; `HEAD` is
//! renamed into place; then the `caches/` view follows it. A kill before `HEAD` moves leaves
//! the previous generation in force; one after it leaves a view that the next writer (or
//! `hoard verify`) puts right.

use super::format::{hex, parse_hex};
use super::index::CacheIndex;
use super::store::{sync_dir, write_atomic, Hoard, WriteLock};
use crate::{Error, Result, Subject};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A generation's id: the BLAKE3 hash of its record.
pub type GenId = [u8; 32];

/// Largest generation record read (about 100 bytes per cache).
pub(crate) const MAX_GEN_BYTES: u64 = 64 << 20;

/// A generation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    /// 1 for the first, the parent's plus one after.
    pub generation: u64,
    /// When it was made (seconds since the Unix epoch, UTC).
    pub time: u64,
    /// The generation it follows (hex id), none for the first.
    pub parent: Option<String>,
    /// What made it, for people (`add NAME`, `rm NAME`, `gc`, ...).
    pub change: String,
    /// Every cache of this generation: name → hex id of its index.
    pub caches: BTreeMap<String, String>,
}

impl Generation {
    /// The caches with their index ids decoded.
    pub fn indexes(&self) -> Result<BTreeMap<String, [u8; 32]>> {
        self.caches
            .iter()
            .map(|(n, d)| {
                parse_hex(d).map(|id| (n.clone(), id)).ok_or_else(|| {
                    Error::corrupt(
                        Subject::Other(format!("generation {}", self.generation)),
                        format!("cache '{n}' has a bad index id '{d}'"),
                    )
                })
            })
            .collect()
    }

    /// The record's bytes, as written and hashed.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "# vmicache hoard generation (see docs/format.md)\n{}",
            serde_norway::to_string(self).expect("a generation serializes")
        )
        .into_bytes()
    }

    /// A record from its bytes, checked against the id it is known by.
    pub fn decode(b: &[u8], id: &GenId, what: impl Into<Subject>) -> Result<Generation> {
        let what = what.into();
        if blake3::hash(b).as_bytes() != id {
            return Err(Error::corrupt(what, "generation record checksum mismatch"));
        }
        let text = std::str::from_utf8(b)
            .map_err(|_| Error::corrupt(what.clone(), "generation record is not UTF-8"))?;
        let g: Generation = serde_norway::from_str(text)
            .map_err(|e| Error::corrupt(what.clone(), format!("generation record: {e}")))?;
        for n in g.caches.keys() {
            super::store::check_name(n)?;
        }
        g.indexes()?;
        if g.parent.as_deref().is_some_and(|p| parse_hex(p).is_none()) {
            return Err(Error::corrupt(what, "generation record: bad parent id"));
        }
        Ok(g)
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`YYYY-MM-DDTHH:MM:SSZ`).
pub fn rfc3339(t: u64) -> String {
    let (days, s) = ((t / 86_400) as i64, t % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn read_bounded(path: &std::path::Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut b = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut b)
        .map_err(|e| Error::io(path, "read", e))?;
    if b.len() as u64 > max {
        return Err(Error::invalid(path, format!("larger than {max} B")));
    }
    Ok(b)
}

impl Hoard {
    pub fn gen_path(&self, id: &GenId) -> PathBuf {
        self.dir().join("gens").join(format!("{}.gen", hex(id)))
    }

    pub fn stored_index_path(&self, id: &[u8; 32]) -> PathBuf {
        self.dir().join("indexes").join(format!("{}.vmh", hex(id)))
    }

    /// The id of the newest generation; None in a hoard that never had one. A hoard that has
    /// generation records but no `HEAD` is damaged, not empty: that is an error (one that
    /// `hoard init --repair` mends), so that no writer takes it for an empty hoard.
    pub fn head_id(&self) -> Result<Option<GenId>> {
        let p = self.dir().join("HEAD");
        match std::fs::read_to_string(&p) {
            Ok(s) if s.trim() == "none" => Ok(None),
            Ok(s) => parse_hex(s.trim()).map(Some).ok_or_else(|| {
                Error::corrupt(
                    &p,
                    "HEAD does not name a generation (`vmicache hoard init --repair`)",
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.gen_ids()?.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::corrupt(
                        &p,
                        "missing, though generations are recorded here (`vmicache hoard init --repair` points it at the newest whole one)",
                    ))
                }
            }
            Err(e) => Err(Error::io(&p, "read", e)),
        }
    }

    /// Ids of the generation records present (well named).
    pub fn gen_ids(&self) -> Result<Vec<GenId>> {
        self.ids("gens", ".gen")
    }

    /// The newest generation, with its id.
    pub fn head(&self) -> Result<Option<(GenId, Generation)>> {
        match self.head_id()? {
            None => Ok(None),
            Some(id) => {
                let g = self.read_gen(&id).map_err(|e| {
                    Error::corrupt(
                        self.dir().join("HEAD"),
                        format!("names a generation that does not read ({e}); `vmicache hoard init --repair`"),
                    )
                })?;
                Ok(Some((id, g)))
            }
        }
    }

    /// Whether generation `g`'s indexes and the packs they name are all here.
    pub fn whole(&self, g: &Generation) -> bool {
        g.indexes().is_ok_and(|m| {
            m.values().all(|id| {
                self.stored_index(id)
                    .is_ok_and(|i| self.missing_pack(&i).is_none())
            })
        })
    }

    /// The first pack `i` names that is not here.
    pub fn missing_pack(&self, i: &CacheIndex) -> Option<[u8; 32]> {
        i.packs
            .iter()
            .find(|p| !self.pack_path(p).exists())
            .copied()
    }

    /// Point a missing or damaged `HEAD` at the newest generation that is whole here (its
    /// indexes and packs present). The generation chosen, or None when HEAD was sound.
    pub fn repair_head(&self, lock: &WriteLock) -> Result<Option<u64>> {
        if self.head().is_ok() {
            return Ok(None);
        }
        let mut all: Vec<(GenId, Generation)> = self
            .gen_ids()?
            .into_iter()
            .filter_map(|id| self.read_gen(&id).ok().map(|g| (id, g)))
            .collect();
        // The one that was newest here last, else the highest number.
        all.sort_by_key(|(_, g)| std::cmp::Reverse((g.generation, g.time)));
        let heads = self.heads()?;
        let rank = |id: &GenId| {
            heads
                .iter()
                .position(|(h, _)| h == id)
                .unwrap_or(usize::MAX)
        };
        all.sort_by_key(|(id, _)| rank(id));
        let Some((id, g)) = all.into_iter().find(|(_, g)| self.whole(g)) else {
            return Err(Error::corrupt(
                self.dir(),
                "no generation here is whole (indexes and packs present): nothing to repair to",
            ));
        };
        self.set_head(lock, &id)?;
        log::warn!(
            "{}: HEAD repaired: it names generation {} now",
            self.dir().display(),
            g.generation
        );
        Ok(Some(g.generation))
    }

    /// The newest generation's caches (empty before the first add).
    pub fn head_caches(&self) -> Result<BTreeMap<String, [u8; 32]>> {
        match self.head()? {
            None => Ok(BTreeMap::new()),
            Some((_, g)) => g.indexes(),
        }
    }

    pub fn read_gen(&self, id: &GenId) -> Result<Generation> {
        let p = self.gen_path(id);
        let b = read_bounded(&p, MAX_GEN_BYTES)?;
        Generation::decode(&b, id, &p)
    }

    /// The generations kept here, newest first: the newest (`HEAD`), then those that were
    /// the newest here before it (`heads`; a node that received generation 8 while at 5 keeps
    /// 5, though 6 and 7 never were here), as far as their records read. Records that never
    /// were `HEAD` (a writer stopped before it moved) are not among them, nor those of the
    /// newest's number or later (history left behind by `pull --force`).
    pub fn history(&self) -> Result<Vec<(GenId, Generation)>> {
        Ok(self
            .history_since()?
            .into_iter()
            .map(|(id, g, _)| (id, g))
            .collect())
    }

    /// [`Hoard::history`], each with when it was replaced here (None for the newest).
    pub fn history_since(&self) -> Result<Vec<(GenId, Generation, Option<u64>)>> {
        let Some((hid, hg)) = self.head()? else {
            return Ok(Vec::new());
        };
        let mut out = vec![(hid, hg.clone(), None)];
        // When HEAD last moved (its own line, when the log has it, says the same).
        let mut replaced: Option<u64> = self.head_mtime();
        for (id, t) in self.heads()? {
            // `t`: when `id` became the newest; it was replaced when the one after it did.
            let at = replaced.unwrap_or(t);
            replaced = Some(t);
            if id == hid || out.iter().any(|(x, _, _)| *x == id) {
                continue;
            }
            if let Ok(g) = self.read_gen(&id) {
                if g.generation < hg.generation {
                    out.push((id, g, Some(at)));
                }
            }
        }
        Ok(out)
    }

    fn head_mtime(&self) -> Option<u64> {
        std::fs::metadata(self.dir().join("HEAD"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }

    /// Make the `heads` log know the current `HEAD`: a hoard made before the log had none (its
    /// older generations are logged from their records), and a writer killed after moving
    /// `HEAD` may not have logged it. Under the writers' lock.
    pub fn ensure_heads(&self, _lock: &WriteLock) -> Result<()> {
        // No HEAD yet (or a damaged one, which others report): nothing to log.
        let Ok(Some((hid, hg))) = self.head() else {
            return Ok(());
        };
        let heads = self.heads()?;
        if heads.first().is_some_and(|(id, _)| *id == hid) {
            return Ok(());
        }
        let mut lines = String::new();
        if !self.dir().join("heads").exists() {
            let mut older: Vec<(GenId, Generation)> = self
                .gen_ids()?
                .into_iter()
                .filter(|id| *id != hid)
                .filter_map(|id| self.read_gen(&id).ok().map(|g| (id, g)))
                .filter(|(_, g)| g.generation < hg.generation)
                .collect();
            older.sort_by_key(|(_, g)| (g.generation, g.time));
            for (id, g) in older {
                lines.push_str(&format!("{} {}\n", hex(&id), g.time));
            }
        }
        let t = self.head_mtime().unwrap_or_else(now);
        lines.push_str(&format!("{} {t}\n", hex(&hid)));
        self.append_heads(&lines)
    }

    /// Append lines to the `heads` log (after a newline, should a torn line end it).
    fn append_heads(&self, lines: &str) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom, Write};
        let p = self.dir().join("heads");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&p)
            .map_err(|e| Error::io(&p, "open", e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, "stat", e))?.len();
        let mut last = [b'\n'];
        if len > 0 {
            f.seek(SeekFrom::Start(len - 1))
                .and_then(|_| f.read_exact(&mut last))
                .map_err(|e| Error::io(&p, "read", e))?;
        }
        let text = if last[0] == b'\n' {
            lines.to_string()
        } else {
            format!("\n{lines}")
        };
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io(&p, "append", e))
    }

    /// The `heads` log, newest first: each generation that became the newest here, and when
    /// (seconds since the epoch); lines that do not parse, or whose time is not plausible,
    /// are passed over.
    pub fn heads(&self) -> Result<Vec<(GenId, u64)>> {
        let p = self.dir().join("heads");
        let b = match read_bounded(&p, MAX_GEN_BYTES) {
            Ok(b) => b,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let mut out: Vec<(GenId, u64)> = String::from_utf8_lossy(&b)
            .lines()
            .filter_map(|l| {
                let (id, t) = l.split_once(' ')?;
                let t: u64 = t.trim().parse().ok()?;
                // After 2001 and not beyond tomorrow: a torn line's cut-off time is not one.
                (1_000_000_000..now() + 86_400)
                    .contains(&t)
                    .then_some((parse_hex(id)?, t))
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Rewrite the `heads` log with only the generations in `keep` (gc).
    pub fn prune_heads(&self, keep: &std::collections::HashSet<GenId>) -> Result<()> {
        let mut lines: Vec<String> = self
            .heads()?
            .into_iter()
            .filter(|(id, _)| keep.contains(id))
            .map(|(id, t)| format!("{} {t}\n", hex(&id)))
            .collect();
        lines.reverse();
        write_atomic(&self.dir().join("heads"), lines.concat().as_bytes())
    }

    /// The bytes of stored index `id`, checked against it.
    pub fn index_bytes(&self, id: &[u8; 32]) -> Result<Vec<u8>> {
        let p = self.stored_index_path(id);
        let b = read_bounded(&p, super::format::MAX_INDEX_BYTES)?;
        if blake3::hash(&b).as_bytes() != id {
            return Err(Error::corrupt(&p, "index file checksum mismatch"));
        }
        Ok(b)
    }

    /// Stored index `id`, read and checked (against its id, then decoded).
    pub fn stored_index(&self, id: &[u8; 32]) -> Result<CacheIndex> {
        let b = self.index_bytes(id)?;
        CacheIndex::decode(&b)
            .map_err(|super::format::Bad(w)| Error::corrupt(self.stored_index_path(id), w))
    }

    /// Store index bytes under their id (kept when already there); the id.
    pub fn put_index_bytes(&self, b: &[u8]) -> Result<[u8; 32]> {
        let id = *blake3::hash(b).as_bytes();
        let p = self.stored_index_path(&id);
        if !p.exists() {
            write_atomic(&p, b)?;
        }
        Ok(id)
    }

    /// Encode and store an index; its id.
    pub fn put_index(&self, idx: &CacheIndex) -> Result<[u8; 32]> {
        let b = idx.encode().map_err(|super::format::Bad(w)| {
            Error::refused(self.dir(), format!("an index cannot be written: {w}"))
        })?;
        self.put_index_bytes(&b)
    }

    /// Store a generation record (kept when already there); its id.
    pub fn put_gen(&self, g: &Generation) -> Result<GenId> {
        self.put_gen_bytes(&g.encode())
    }

    /// Store a generation record's bytes as they are (a received record keeps the bytes its
    /// id hashes); its id.
    pub fn put_gen_bytes(&self, b: &[u8]) -> Result<GenId> {
        let id = *blake3::hash(b).as_bytes();
        let p = self.gen_path(&id);
        if !p.exists() {
            write_atomic(&p, b)?;
        }
        Ok(id)
    }

    /// A stored record's bytes, checked against its id (what send and push pass on).
    pub fn gen_bytes(&self, id: &GenId) -> Result<Vec<u8>> {
        let p = self.gen_path(id);
        let b = read_bounded(&p, MAX_GEN_BYTES)?;
        Generation::decode(&b, id, &p)?;
        Ok(b)
    }

    /// Make `HEAD` name generation `id` (its record and everything it names already stored),
    /// then bring the `caches/` view to it.
    pub fn set_head(&self, lock: &WriteLock, id: &GenId) -> Result<()> {
        // The log first (the generation leaving HEAD too, should it be missing there): a line
        // for one that never became HEAD (a kill before the rename) is passed over, being of
        // the number the next commit takes again.
        self.ensure_heads(lock)?;
        self.append_heads(&format!("{} {}\n", hex(id), now()))?;
        write_atomic(
            &self.dir().join("HEAD"),
            format!("{}\n", hex(id)).as_bytes(),
        )?;
        self.sync_view()
    }

    /// Commit a new generation after the newest, with these caches (their indexes stored).
    pub fn commit(
        &self,
        lock: &WriteLock,
        change: &str,
        caches: &BTreeMap<String, [u8; 32]>,
    ) -> Result<(GenId, Generation)> {
        let head = self.head()?;
        let g = Generation {
            generation: head
                .as_ref()
                .map_or(0, |(_, g)| g.generation)
                .checked_add(1)
                .ok_or_else(|| Error::corrupt(self.dir(), "generation numbers are exhausted"))?,
            time: now().max(head.as_ref().map_or(0, |(_, g)| g.time)),
            parent: head.as_ref().map(|(id, _)| hex(id)),
            change: change.to_string(),
            caches: caches.iter().map(|(n, d)| (n.clone(), hex(d))).collect(),
        };
        let id = self.put_gen(&g)?;
        self.set_head(lock, &id)?;
        log::info!(
            "{}: generation {} ({change}): {} caches",
            self.dir().display(),
            g.generation,
            g.caches.len()
        );
        Ok((id, g))
    }

    /// Make `caches/` hold exactly the newest generation's indexes (hard links to them).
    pub fn sync_view(&self) -> Result<()> {
        let want = self.head_caches()?;
        let dir = self.dir().join("caches");
        let mut changed = false;
        for (name, id) in &want {
            let view = self.index_path(name);
            let src = self.stored_index_path(id);
            if self.is_view_of(name, id) {
                continue;
            }
            let tmp = dir.join(format!(".tmp-{}-{name}.vmh", std::process::id()));
            let _ = std::fs::remove_file(&tmp);
            std::fs::hard_link(&src, &tmp).map_err(|e| Error::io(&src, "link", e))?;
            std::fs::rename(&tmp, &view).map_err(|e| Error::io(&view, "rename into place", e))?;
            changed = true;
        }
        for name in self.view_names()? {
            if !want.contains_key(&name) {
                let p = self.index_path(&name);
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, "remove", e))?;
                changed = true;
            }
        }
        if changed {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Whether the `caches/` view matches the newest generation.
    pub fn view_matches(&self) -> Result<bool> {
        let want = self.head_caches()?;
        if self.view_names()? != want.keys().cloned().collect::<Vec<_>>() {
            return Ok(false);
        }
        Ok(want.iter().all(|(name, id)| self.is_view_of(name, id)))
    }

    /// Whether `caches/NAME.vmh` is (a hard link of) stored index `id`.
    pub fn is_view_of(&self, name: &str, id: &[u8; 32]) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (
            std::fs::metadata(self.index_path(name)),
            std::fs::metadata(self.stored_index_path(id)),
        ) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_764_600_000), "2025-12-01T14:40:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
