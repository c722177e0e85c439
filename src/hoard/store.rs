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

use super::format::{self as hf, Bad, Codec, Footer, Frame, Key};
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
            level: 3,
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

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(path, op, e)
}

/// Sync a directory (the renames in it made durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
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
        write_settings(dir, &Settings::default())?;
        Ok((Hoard::open(dir)?, true))
    }

    /// Format 1 → 2: the indexes in `caches/` stored by id, one generation naming them.
    fn upgrade(&self) -> Result<()> {
        let lock = self.lock()?;
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
                format!("hoard format {} (this vmicache knows {FORMAT})", settings.format),
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
        let p = self.dir.join("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io(&p, "open"))?;
        self.take(f, true).map(|l| l.expect("an exclusive lock"))
    }

    /// Wait for, and take, the lock shared (readers that must not see a writer's half work,
    /// such as verify); None when no writer ever ran here (no lock file). Needs no write
    /// access to the hoard.
    pub fn read_lock(&self) -> Result<Option<WriteLock>> {
        let p = self.dir.join("lock");
        match File::open(&p) {
            Ok(f) => self.take(f, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&p, "open", e)),
        }
    }

    fn take(&self, f: File, exclusive: bool) -> Result<Option<WriteLock>> {
        let p = self.dir.join("lock");
        let (now, wait) = if exclusive {
            (FlockArg::LockExclusiveNonblock, FlockArg::LockExclusive)
        } else {
            (FlockArg::LockSharedNonblock, FlockArg::LockShared)
        };
        match Flock::lock(f, now) {
            Ok(l) => Ok(Some(WriteLock(l))),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                log::warn!(
                    "{}: another hoard writer (add, rm, gc) is at work: waiting for it",
                    self.dir.display()
                );
                Flock::lock(f, wait)
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

    /// Names of the hoarded caches (of the newest generation), sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.head_caches()?.into_keys().collect())
    }

    /// Names in the `caches/` view.
    pub fn view_names(&self) -> Result<Vec<String>> {
        self.listing("caches", ".vmh")
    }

    /// Ids of the packs present (well named ones; others are reported by verify).
    pub fn pack_ids(&self) -> Result<Vec<[u8; 32]>> {
        Ok(self
            .listing("packs", ".pack")?
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
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
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

    /// The index of cache `name` in the newest generation.
    pub fn read_index(&self, name: &str) -> Result<CacheIndex> {
        self.stored_index(&self.index_id(name)?)
    }
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

/// A pack opened for reading: its frames table (checked), the file kept open.
#[derive(Debug)]
pub struct PackReader {
    pub path: PathBuf,
    file: File,
    pub footer: Footer,
    pub frames: Vec<Frame>,
    /// First chunk of each frame.
    pub first: Vec<u32>,
}

impl PackReader {
    pub fn open(path: &Path) -> Result<PackReader> {
        let file = File::open(path).map_err(io(path, "open"))?;
        let len = file.metadata().map_err(io(path, "stat"))?.len();
        let bad = |Bad(w)| Error::corrupt(path, w);
        if len < hf::PACK_HEADER + hf::PACK_FOOTER {
            return Err(Error::corrupt(
                path,
                format!("pack of {len} B is cut short"),
            ));
        }
        let mut h = [0u8; hf::PACK_HEADER as usize];
        file.read_exact_at(&mut h, 0).map_err(io(path, "read"))?;
        hf::check_pack_header(&h).map_err(bad)?;
        let mut f = [0u8; hf::PACK_FOOTER as usize];
        file.read_exact_at(&mut f, len - hf::PACK_FOOTER)
            .map_err(io(path, "read"))?;
        let footer = Footer::decode(&f, len).map_err(bad)?;
        let mut t = vec![0u8; (u64::from(footer.frames) * hf::FRAME_ENTRY) as usize];
        file.read_exact_at(&mut t, footer.table_offset)
            .map_err(io(path, "read"))?;
        if blake3::hash(&t).as_bytes() != &footer.table_hash {
            return Err(Error::corrupt(path, "frames table checksum mismatch"));
        }
        let (frames, first) = hf::decode_frames(&t, &footer).map_err(bad)?;
        Ok(PackReader {
            path: path.to_path_buf(),
            file,
            footer,
            frames,
            first,
        })
    }

    pub fn chunks(&self) -> u32 {
        self.footer.chunks
    }

    /// The chunk keys, in chunk order (checked against the footer).
    pub fn keys(&self) -> Result<Vec<Key>> {
        let n = self.footer.chunks as usize;
        let mut b = vec![0u8; n * hf::KEY_LEN];
        self.file
            .read_exact_at(&mut b, self.footer.keys_offset())
            .map_err(io(&self.path, "read"))?;
        if blake3::hash(&b).as_bytes() != &self.footer.keys_hash {
            return Err(Error::corrupt(&self.path, "chunk keys checksum mismatch"));
        }
        Ok(b.chunks_exact(hf::KEY_LEN)
            .map(|k| k.try_into().unwrap())
            .collect())
    }

    /// The frame holding chunk `c` (< chunks()).
    pub fn frame_of(&self, c: u32) -> usize {
        self.first.partition_point(|&f| f <= c) - 1
    }

    /// Frame `i`'s chunks, decompressed and checked against its hash: a damaged frame is an
    /// error (logged), never data.
    pub fn read_frame(&self, i: usize) -> Result<Vec<u8>> {
        let f = &self.frames[i];
        let mut stored = vec![0u8; f.len as usize];
        self.file
            .read_exact_at(&mut stored, f.offset)
            .map_err(io(&self.path, "read"))?;
        let raw = u64::from(f.chunks) * hf::CHUNK;
        let data = match f.codec {
            Codec::Plain => stored,
            Codec::Zstd => match decompress(&stored, raw as usize) {
                Ok(d) if d.len() as u64 == raw => d,
                Ok(d) => {
                    return Err(self.damaged(i, format!("decompresses to {} B, not {raw}", d.len())))
                }
                Err(e) => return Err(self.damaged(i, format!("does not decompress: {e}"))),
            },
        };
        if blake3::hash(&data).as_bytes() != &f.hash {
            return Err(self.damaged(i, "checksum mismatch".into()));
        }
        Ok(data)
    }

    fn damaged(&self, i: usize, what: String) -> Error {
        let f = &self.frames[i];
        let what = format!(
            "frame {i} (at {:#x}, {} B, chunks {}..{}) {what}",
            f.offset,
            f.len,
            self.first[i],
            self.first[i] + u32::from(f.chunks)
        );
        log::error!(
            "{}: damaged hoard pack: {what}; the read fails",
            self.path.display()
        );
        Error::corrupt(&self.path, what)
    }
}

/// Decompress a frame of at most `cap` bytes with this thread's decompression context, into
/// a buffer that is not zeroed first.
fn decompress(stored: &[u8], cap: usize) -> std::io::Result<Vec<u8>> {
    use std::cell::RefCell;
    thread_local! {
        static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        let mut out = Vec::with_capacity(cap);
        d.as_mut().unwrap().decompress_to_buffer(stored, &mut out)?;
        Ok(out)
    })
}

/// Compress a frame's chunks: zstd at `level`, or as they are when that saves nothing.
/// Each thread keeps one compression context per level (creating one per frame cost ~4% of
/// an add).
pub fn encode_frame(raw: &[u8], level: i32) -> (Vec<u8>, Codec, [u8; 32]) {
    use std::cell::RefCell;
    thread_local! {
        static CCTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    }
    let hash = *blake3::hash(raw).as_bytes();
    let c = CCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        c.as_mut().and_then(|(_, z)| z.compress(raw).ok())
    });
    match c {
        Some(c) if c.len() < raw.len() => (c, Codec::Zstd, hash),
        _ => (raw.to_vec(), Codec::Plain, hash),
    }
}

/// A pack being written: a temporary file in `packs/`, renamed to its id when finished.
pub struct PackWriter {
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    hasher: blake3::Hasher,
    at: u64,
    frames: Vec<Frame>,
    keys: Vec<u8>,
    chunks: u32,
    renamed: bool,
}

impl PackWriter {
    pub fn create(hoard: &Hoard) -> Result<PackWriter> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = hoard.dir.join("packs");
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}.pack", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        let h = hf::pack_header();
        file.write_all(&h).map_err(io(&tmp, "write"))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h);
        Ok(PackWriter {
            dir,
            tmp,
            file: Some(file),
            hasher,
            at: hf::PACK_HEADER,
            frames: Vec::new(),
            keys: Vec::new(),
            chunks: 0,
            renamed: false,
        })
    }

    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.at
    }

    pub fn is_empty(&self) -> bool {
        self.chunks == 0
    }

    /// Append a frame (as [`encode_frame`] made it) of `keys.len()` chunks.
    pub fn push(
        &mut self,
        stored: &[u8],
        codec: Codec,
        hash: [u8; 32],
        keys: &[Key],
    ) -> Result<()> {
        let f = self.file.as_mut().expect("pack writer open");
        f.write_all(stored).map_err(io(&self.tmp, "write"))?;
        self.hasher.update(stored);
        self.frames.push(Frame {
            offset: self.at,
            len: stored.len() as u32,
            chunks: keys.len() as u16,
            codec,
            hash,
        });
        self.at += stored.len() as u64;
        for k in keys {
            self.keys.extend_from_slice(k);
        }
        self.chunks += keys.len() as u32;
        Ok(())
    }

    /// Write the tables, sync, and rename the pack to its id (None, and nothing left, when no
    /// chunk was written).
    pub fn finish(mut self) -> Result<Option<[u8; 32]>> {
        if self.chunks == 0 {
            return Ok(None);
        }
        let mut t = Vec::with_capacity(self.frames.len() * hf::FRAME_ENTRY as usize);
        for f in &self.frames {
            f.encode(&mut t);
        }
        let footer = Footer {
            frames: self.frames.len() as u32,
            chunks: self.chunks,
            table_offset: self.at,
            table_hash: *blake3::hash(&t).as_bytes(),
            keys_hash: *blake3::hash(&self.keys).as_bytes(),
        };
        let mut f = self.file.take().expect("pack writer open");
        let end = footer.encode();
        for part in [&t[..], &self.keys[..], &end[..]] {
            f.write_all(part).map_err(io(&self.tmp, "write"))?;
            self.hasher.update(part);
        }
        f.sync_all().map_err(io(&self.tmp, "sync"))?;
        let id = *self.hasher.finalize().as_bytes();
        let path = self.dir.join(format!("{}.pack", hf::hex(&id)));
        std::fs::rename(&self.tmp, &path).map_err(io(&path, "rename into place"))?;
        self.renamed = true;
        sync_dir(&self.dir)?;
        Ok(Some(id))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // Unfinished (an error, or nothing written): leave nothing behind.
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
