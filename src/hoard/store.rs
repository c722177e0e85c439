//! The hoard directory: its settings, the writers' lock, pack files and cache indexes on
//! plain files, each written whole and synced before it is renamed into place.
//!
//! ```text
//! HOARD/hoard.yaml          settings (format version, frame size, compression level, GC window)
//! HOARD/lock                flock(2): one writer at a time (add, rm, gc, receive, pull)
//! HOARD/packs/<id>.pack     immutable packs of unique chunks (id = BLAKE3 of the file)
//! HOARD/indexes/<id>.vmh    cache indexes, content-addressed
//! HOARD/gens/<id>.gen, HEAD generations and the newest one (see [`super::gens`])
//! HOARD/caches/<name>.vmh   the newest generation's indexes by name (what chains name)
//! ```

use super::format::{self as hf, Bad};
use super::index::CacheIndex;
use crate::{Error, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// `hoard.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// On-disk format version of the hoard.
    pub format: u32,
    /// Unique chunks compressed together in one frame (1 to 256).
    pub frame_chunks: u32,
    /// zstd level of `hoard add` (the fast path; `hoard gc --recompress` repacks slower).
    pub level: i32,
    /// `hoard gc` keeps the generations of this many last days (and always the newest), so
    /// that nodes that were offline meanwhile can catch up with a small stream.
    #[serde(default = "default_keep_days")]
    pub keep_days: u32,
}

fn default_keep_days() -> u32 {
    7
}

/// The hoard format this vmicache writes and reads.
pub const FORMAT: u32 = 2;

/// Subdirectories of a hoard.
const SUBDIRS: [&str; 4] = ["packs", "indexes", "gens", "caches"];

impl Default for Settings {
    fn default() -> Self {
        Settings {
            format: FORMAT,
            frame_chunks: 32,
            // Level 4 stores the derived guest set 1.9% smaller than 3 (0.92x -> 0.90x of
            // ZFS-style), `hoard add` taking about 9% longer; reads decode as fast.
            level: 4,
            keep_days: default_keep_days(),
        }
    }
}

/// An open hoard directory.
#[derive(Debug, Clone)]
pub struct Hoard {
    dir: PathBuf,
    pub settings: Settings,
}

/// The hoard's lock, held: exclusive by the one process that changes the hoard, shared by
/// readers that must see no change half done.
pub struct WriteLock(#[allow(dead_code)] Flock<File>);

pub(super) fn io<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(path, op, e)
}

/// Sync a directory (the renames in it made durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    // The parent of a bare file name is the empty path: the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "sync directory"))
}

/// Write `bytes` to `path` whole: a temporary file beside it, synced, renamed over it, the
/// directory synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().map_or("x".into(), |n| n.to_string_lossy())
    ));
    let r = (|| {
        let mut f = File::create(&tmp).map_err(io(&tmp, "create"))?;
        f.write_all(bytes).map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "sync"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "rename into place"))?;
        sync_dir(dir)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// A cache's name in the hoard: letters, digits, `._-+@`, not starting with a dot, at most
/// 128 bytes (it names a file).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::refused(
            crate::Subject::Other(format!("name '{name}'")),
            "a hoarded cache's name is 1-128 letters, digits and ._-+@, not starting with a dot",
        ))
    }
}

impl Hoard {
    /// Make `dir` a hoard (creating it); an existing hoard is left as it is, but one of
    /// format 1 (before generations) is upgraded: its caches become generation 1.
    pub fn init(dir: &Path) -> Result<(Hoard, bool)> {
        if dir.join("hoard.yaml").exists() {
            let h = Hoard::open_any(dir)?;
            if h.settings.format == 1 {
                h.upgrade()?;
            }
            return Ok((Hoard::open(dir)?, false));
        }
        std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        for d in SUBDIRS {
            let d = dir.join(d);
            std::fs::create_dir_all(&d).map_err(io(&d, "create directory"))?;
        }
        write_atomic(&dir.join("HEAD"), b"none\n")?;
        write_settings(dir, &Settings::default())?;
        Ok((Hoard::open(dir)?, true))
    }

    /// Format 1 → 2: the indexes in `caches/` stored by id, one generation naming them.
    fn upgrade(&self) -> Result<()> {
        let lock = self.lock()?;
        // An upgrade killed after writing its record must not leave a hoard whose records
        // lack a HEAD (which reads as damaged).
        if !self.dir.join("HEAD").exists() {
            write_atomic(&self.dir.join("HEAD"), b"none\n")?;
        }
        for d in SUBDIRS {
            let d = self.dir.join(d);
            std::fs::create_dir_all(&d).map_err(io(&d, "create directory"))?;
        }
        let mut caches = std::collections::BTreeMap::new();
        for name in self.view_names()? {
            let p = self.index_path(&name);
            let b = std::fs::read(&p).map_err(io(&p, "read"))?;
            read_index_file(&p)?;
            caches.insert(name, self.put_index_bytes(&b)?);
        }
        self.commit(&lock, "upgrade from hoard format 1", &caches)?;
        let s = Settings {
            format: FORMAT,
            ..self.settings.clone()
        };
        write_settings(&self.dir, &s)?;
        log::info!(
            "{}: upgraded to hoard format {FORMAT} ({} caches in generation 1)",
            self.dir.display(),
            caches.len()
        );
        Ok(())
    }

    pub fn open(dir: &Path) -> Result<Hoard> {
        let h = Hoard::open_any(dir)?;
        if h.settings.format == 1 {
            return Err(Error::unsupported(
                dir,
                "hoard format 1 (before generations): `vmicache hoard init DIR` upgrades it",
            ));
        }
        Ok(h)
    }

    fn open_any(dir: &Path) -> Result<Hoard> {
        let conf = dir.join("hoard.yaml");
        let text = std::fs::read_to_string(&conf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::refused(
                    dir,
                    "not a hoard (no hoard.yaml; `vmicache hoard init DIR` makes one)",
                )
            } else {
                Error::io(&conf, "read", e)
            }
        })?;
        let settings: Settings = serde_norway::from_str(&text)
            .map_err(|e| Error::invalid(&conf, format!("hoard settings: {e}")))?;
        if settings.format != 1 && settings.format != FORMAT {
            return Err(Error::unsupported(
                &conf,
                format!(
                    "hoard format {} (this vmicache knows {FORMAT})",
                    settings.format
                ),
            ));
        }
        if !(1..=hf::MAX_FRAME_CHUNKS).contains(&settings.frame_chunks) {
            return Err(Error::invalid(&conf, "frame_chunks must be 1 to 256"));
        }
        if !(1..=22).contains(&settings.level) {
            return Err(Error::invalid(&conf, "level must be a zstd level, 1 to 22"));
        }
        let need: &[&str] = if settings.format == 1 {
            &["packs", "caches"]
        } else {
            &SUBDIRS
        };
        for d in need {
            let p = dir.join(d);
            if !p.is_dir() {
                return Err(Error::invalid(dir, format!("hoard without {d}/")));
            }
        }
        Ok(Hoard {
            dir: dir.to_path_buf(),
            settings,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Wait for, and take, the writers' lock.
    pub fn lock(&self) -> Result<WriteLock> {
        let f = self.lock_file("lock", true)?.expect("created");
        self.take(f, "lock", true, true)
            .map(|l| l.expect("a lock that was waited for"))
    }

    /// Wait for, and take, the lock shared (readers that must not see a writer's half work,
    /// such as verify); None when no writer ever ran here (no lock file). Needs no write
    /// access to the hoard.
    pub fn read_lock(&self) -> Result<Option<WriteLock>> {
        self.read_lock_with(true)
    }

    /// [`Hoard::read_lock`]; `wait`: false refuses at once while a writer holds the lock (for
    /// callers that do something else then, as the hook builds a cache itself).
    pub fn read_lock_with(&self, wait: bool) -> Result<Option<WriteLock>> {
        let Some(f) = self.lock_file("lock", false)? else {
            return Ok(None);
        };
        match self.take(f, "lock", false, wait)? {
            Some(l) => Ok(Some(l)),
            None => Err(Error::refused(
                &self.dir,
                "busy: a writer (add, rm, gc, receive, pull) holds it",
            )),
        }
    }

    /// The lock of `hoard sync` (HOARD/sync.lock), taken without waiting: None while another
    /// sync runs (it reaches the newest generation as well).
    pub fn try_sync_lock(&self) -> Result<Option<WriteLock>> {
        let f = self.lock_file("sync.lock", true)?.expect("created");
        self.take(f, "sync.lock", true, false)
    }

    /// `HOARD/NAME` opened to be locked: created when `create` (which needs write access),
    /// else None when it is not there.
    fn lock_file(&self, name: &str, create: bool) -> Result<Option<File>> {
        let p = self.dir.join(name);
        let r = if create {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
        } else {
            File::open(&p)
        };
        match r {
            Ok(f) => Ok(Some(f)),
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&p, "open", e)),
        }
    }

    /// flock `f` (`HOARD/NAME`), exclusive or shared; held elsewhere: wait for it (saying
    /// so) when `wait`, else None.
    fn take(&self, f: File, name: &str, exclusive: bool, wait: bool) -> Result<Option<WriteLock>> {
        let p = self.dir.join(name);
        let (now, then) = if exclusive {
            (FlockArg::LockExclusiveNonblock, FlockArg::LockExclusive)
        } else {
            (FlockArg::LockSharedNonblock, FlockArg::LockShared)
        };
        match Flock::lock(f, now) {
            Ok(l) => Ok(Some(WriteLock(l))),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => Ok(None),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                log::warn!(
                    "{}: another vmicache holds the hoard's lock ({}): waiting for it",
                    self.dir.display(),
                    if exclusive {
                        "a writer, or a reader such as send, push, verify or checkout"
                    } else {
                        "a writer: add, rm, gc, receive or pull"
                    }
                );
                Flock::lock(f, then)
                    .map(|l| Some(WriteLock(l)))
                    .map_err(|(_, e)| Error::io(&p, "lock", e.into()))
            }
            Err((_, e)) => Err(Error::io(&p, "lock", e.into())),
        }
    }

    pub fn pack_path(&self, id: &[u8; 32]) -> PathBuf {
        self.dir.join("packs").join(format!("{}.pack", hf::hex(id)))
    }

    pub fn index_path(&self, name: &str) -> PathBuf {
        self.dir.join("caches").join(format!("{name}.vmh"))
    }

    fn listing(&self, sub: &str, ext: &str) -> Result<Vec<String>> {
        let d = self.dir.join(sub);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&d).map_err(io(&d, "list"))? {
            let e = e.map_err(io(&d, "list"))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(stem) = n.strip_suffix(ext) {
                if !stem.starts_with('.') {
                    out.push(stem.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Names in the `caches/` view.
    pub fn view_names(&self) -> Result<Vec<String>> {
        self.listing("caches", ".vmh")
    }

    /// Ids of the packs present (well named ones; others are reported by verify).
    pub fn pack_ids(&self) -> Result<Vec<[u8; 32]>> {
        self.ids("packs", ".pack")
    }

    /// Ids of the well-named files `SUB/<hex id>EXT`.
    pub(super) fn ids(&self, sub: &str, ext: &str) -> Result<Vec<[u8; 32]>> {
        Ok(self
            .listing(sub, ext)?
            .iter()
            .filter_map(|s| hf::parse_hex(s))
            .collect())
    }

    /// Temporary files left by writers that stopped (only while holding the lock).
    pub fn leftovers(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for sub in ["packs", "indexes", "gens", "caches", "."] {
            let d = self.dir.join(sub);
            for e in std::fs::read_dir(&d).map_err(io(&d, "list"))? {
                let e = e.map_err(io(&d, "list"))?;
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(".tmp-") {
                    out.push(e.path());
                }
            }
        }
        Ok(out)
    }

    /// The id of the index of cache `name` in the newest generation.
    pub fn index_id(&self, name: &str) -> Result<[u8; 32]> {
        check_name(name)?;
        self.head_caches()?
            .get(name)
            .copied()
            .ok_or_else(|| self.no_such(name))
    }

    pub fn no_such(&self, name: &str) -> Error {
        Error::refused(
            crate::Subject::Other(format!("hoard {}", self.dir.display())),
            format!("no cache named '{name}' (see `vmicache hoard list`)"),
        )
    }
}

impl Hoard {
    /// Remove the scratch directories of `vmicache register`s that are gone: each holds an
    /// flock on `DIR/lock` all along; a directory whose lock is free is removed while we hold
    /// it (one without a lock file yet is young: left alone for an hour). The number removed.
    pub fn sweep_registers(&self) -> Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir, "list"))? {
            let e = e.map_err(io(&self.dir, "list"))?;
            if !e.file_name().to_string_lossy().starts_with(".register-") {
                continue;
            }
            let dir = e.path();
            let _held = match File::open(dir.join("lock")) {
                Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                    Ok(l) => l,
                    Err(_) => continue,
                },
                Err(_) => {
                    let young = std::fs::metadata(&dir)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_none_or(|age| age.as_secs() < 3600);
                    if young {
                        continue;
                    }
                    std::fs::remove_dir_all(&dir).map_err(io(&dir, "remove"))?;
                    n += 1;
                    continue;
                }
            };
            std::fs::remove_dir_all(&dir).map_err(io(&dir, "remove"))?;
            n += 1;
        }
        Ok(n)
    }
}

/// Take the lock of a `vmicache register` scratch directory (held while the value lives; see
/// `register_alive`).
pub fn lock_scratch(dir: &Path) -> Result<WriteLock> {
    let p = dir.join("lock");
    let f = File::create(&p).map_err(io(&p, "create"))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map(WriteLock)
        .map_err(|(_, e)| Error::io(&p, "lock", e.into()))
}

fn write_settings(dir: &Path, s: &Settings) -> Result<()> {
    let text = format!(
        "# vmicache hoard (see docs/format.md)\n{}",
        serde_norway::to_string(s).expect("settings serialize")
    );
    write_atomic(&dir.join("hoard.yaml"), text.as_bytes())
}

/// Read and check a cache index file (bounded in size).
pub fn read_index_file(path: &Path) -> Result<CacheIndex> {
    let f = File::open(path).map_err(io(path, "open"))?;
    read_index_from(&f, path)
}

pub fn read_index_from(f: &File, path: &Path) -> Result<CacheIndex> {
    let len = f.metadata().map_err(io(path, "stat"))?.len();
    if len > hf::MAX_INDEX_BYTES {
        return Err(Error::invalid(
            path,
            format!("hoard index of {len} B is too large"),
        ));
    }
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, 0).map_err(io(path, "read"))?;
    CacheIndex::decode(&b).map_err(|Bad(w)| Error::corrupt(path, w))
}

pub use super::pack::{encode_frame, PackReader, PackWriter};
