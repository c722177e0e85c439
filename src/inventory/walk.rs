//! One file system's files: ext4-view lists directories and reads inodes (checksums and hash
//! trees are its business); [`super::extfs`] adds the inode numbers, for loops and hard links,
//! each file's blocks, for what a cache holds of it, and reads content and symlinks; after a
//! crash it reads everything alone, as of the last checkpoint. Every walk is bounded.

use super::disk::{overlap, Disk, PartReader};
use super::entries::{entry, raw_entry, show, sort, unknown_entry, Kid};
use super::extfs::{ExtFs, Piece};
use super::{Entry, Held, Options, Warnings};
use ext4_view::{DirEntry, Ext4};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

/// Deeper directories are not entered.
pub const MAX_DEPTH: usize = 256;
/// Symlink targets longer than this are not read.
const MAX_LINK: u64 = 4096;
/// A directory larger than this is not listed.
const MAX_DIR: u64 = super::extfs::MAX_DIR_BYTES;
/// Bytes ext4-view may read through to find paths, over a walk.
const MAX_LOOKUPS: u64 = 4 << 30;
/// A directory with a hash index (`EXT4_INDEX_FL`): a name is found in it in a few blocks.
const INDEX_FL: u32 = 0x1000;
/// Data ranges kept per file system for `--trace` (16 bytes each).
const MAX_RANGES: usize = 1 << 22;
/// Larger files are not hashed (their content compares as unknown).
pub const MAX_HASHED: u64 = 1 << 30;

/// A file's data as disk byte ranges, shared by its hard links.
pub type Ranges = Arc<Vec<(u64, u64)>>;

/// What one file system yields: its entries sorted by path and, when asked for, each entry's
/// data ranges and content hash, in entry order.
pub struct Walked {
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub entries: Vec<Entry>,
    pub ranges: Vec<Ranges>,
    pub hashes: Vec<Option<[u8; 32]>>,
    /// Bytes of all regular files' blocks (hard links once), and of them held.
    pub data_bytes: u64,
    pub data_held: u64,
}

pub struct FsHandle {
    /// ext4-view, unless the file system is read by our reader alone: after a crash (the
    /// journal's replay by ext4-view is not bounded).
    fs: Option<Ext4>,
    /// Why ext4-view is not used, when it is not.
    own: Option<String>,
    ext: ExtFs,
    disk: Rc<Disk>,
    /// A read buffer kept from file to file.
    buf: Vec<u8>,
}

/// What a regular file's inode yields.
struct FileInfo {
    /// Kept for `--trace` only.
    ranges: Ranges,
    bytes: u64,
    held: Option<u64>,
    hash: Option<[u8; 32]>,
}

/// Per-walk state: what was met and what may still be spent.
struct Walk<'a> {
    held: Option<&'a [(u64, u64)]>,
    opts: &'a Options,
    w: Walked,
    /// Per inode (hard links are mapped and read once).
    files: HashMap<u32, FileInfo>,
    ranges_kept: usize,
    hash_budget: u64,
    /// Bytes ext4-view may still scan to find paths (see `walk`).
    lookups: u64,
    none: Ranges,
}

impl FsHandle {
    pub fn open(disk: &Rc<Disk>, start: u64, len: u64) -> Result<FsHandle, String> {
        let ext = ExtFs::open(disk.clone(), start, len)?;
        // A journal to replay: ext4-view's replay walks whatever extent trees the journal
        // holds, without bound; our reader alone reads the checkpoint instead, refusing what
        // ext4-view would refuse.
        let own = ext.needs_recovery.then(|| "the journal holds changes not yet in place (a guest that crashed or runs): everything is read as of the last checkpoint by our own reader (the journal is not replayed, no metadata checksums are checked)".to_string());
        let fs = if own.is_some() {
            let other = ext.incompat & !super::extfs::INCOMPAT_OWN;
            if other != 0 {
                return Err(format!("incompatible features {other:#x}: not supported"));
            }
            None
        } else {
            let reader = PartReader {
                disk: disk.clone(),
                start,
                len,
                block: ext.block_size,
            };
            Some(Ext4::load(Box::new(reader)).map_err(|e| format!("ext4: {e}"))?)
        };
        Ok(FsHandle {
            fs,
            own,
            ext,
            disk: disk.clone(),
            buf: Vec::new(),
        })
    }

    /// Every entry under `/`, sorted by path; `held`: the disk ranges a cache holds; `left`:
    /// entries that may still be listed; `hash_budget`: bytes of content that may be read.
    pub fn walk(
        &mut self,
        held: Option<&[(u64, u64)]>,
        opts: &Options,
        left: &mut usize,
        hash_budget: &mut u64,
        warn: &mut Warnings,
    ) -> Walked {
        if let Some(why) = &self.own {
            warn.push(why.clone());
        }
        // ext4-view finds each path from the root, reading through every directory on the
        // way that has no hash index: bytes it may scan so, over the whole walk (some 20 s of
        // its scanning; a sound guest needs a few MiB, 6,000 subdirectories of one directory
        // made by mkfs -d some 600 MiB).
        let lookups: u64 = MAX_LOOKUPS;
        let mut overdrawn = 0u64;
        let mut st = Walk {
            held,
            opts,
            w: Walked {
                label: self.ext.label.clone(),
                uuid: self.ext.uuid.clone(),
                block_size: self.ext.block_size,
                entries: Vec::new(),
                ranges: Vec::new(),
                hashes: Vec::new(),
                data_bytes: 0,
                data_held: 0,
            },
            files: HashMap::new(),
            ranges_kept: 0,
            hash_budget: *hash_budget,
            lookups,
            none: Arc::new(Vec::new()),
        };
        let root_len = self.ext.inode(2).map_or(0, |i| i.size);
        let mut visited: HashSet<u32> = HashSet::from([2]);
        // (path, inode, depth, size, bytes ext4-view scans to find the path)
        let mut stack: Vec<(Vec<u8>, u32, usize, u64, u64)> =
            vec![(b"/".to_vec(), 2, 0, root_len, 0)];
        'dirs: while let Some((dir, ino, depth, len, cost)) = stack.pop() {
            if len > MAX_DIR {
                warn.push(format!(
                    "{}: a directory of {len} bytes: not listed",
                    show(&dir)
                ));
                continue;
            }
            // What finding a child's path costs: this directory's path, then this directory
            // read through (or a few blocks of its index).
            let indexed = ino != 0 && self.ext.inode(ino).is_ok_and(|i| i.flags & INDEX_FL != 0);
            let child_cost = cost.saturating_add(if indexed {
                2 * self.ext.block_size
            } else {
                len.max(self.ext.block_size)
            });
            if self.fs.is_some() && st.lookups < cost {
                if overdrawn == 0 {
                    warn.push(format!("{}: not listed: finding paths through directories without a hash index would cost more than the walk allows (4 GiB read through); others like it are counted at the end", show(&dir)));
                }
                overdrawn += 1;
                continue;
            }
            st.lookups = st.lookups.saturating_sub(cost);
            let (inos, err) = if ino == 0 {
                (HashMap::new(), None)
            } else {
                self.ext.dir_entries(ino)
            };
            // ext4-view is given no directory our bounded reader could not read whole: its own
            // walk of a hostile extent tree has no bound.
            if let Some(e) = err {
                warn.push(format!("{}: not listed: {e}", show(&dir)));
                continue;
            }
            let kids = if self.fs.is_none() {
                self.own_listing(&inos, *left)
            } else {
                match self.listing(ino, &inos, &dir, *left, warn) {
                    Some(k) => k,
                    None => continue,
                }
            };
            for (name, child, mut e, err) in kids {
                if *left == 0 {
                    warn.push("more entries than --max-entries: the listing stops here");
                    break 'dirs;
                }
                *left -= 1;
                let mut path = dir.clone();
                if path.len() > 1 {
                    path.push(b'/');
                }
                path.extend_from_slice(&name);
                e.path = show(&path);
                if let Some(err) = err {
                    warn.push(format!("{}: {err}", e.path));
                }
                let mut ranges = st.none.clone();
                let mut hash = None;
                match e.kind {
                    'd' if child == 0 => {
                        warn.push(format!("{}: no inode number found, not entered", show(&path)))
                    }
                    'd' if depth + 1 >= MAX_DEPTH => warn.push(format!(
                        "{}: deeper than {MAX_DEPTH} levels, not entered",
                        show(&path)
                    )),
                    'd' if child != 0 && !visited.insert(child) => warn.push(format!(
                        "{}: directory inode {child} was met before (a loop or a hard-linked directory), not entered again",
                        show(&path)
                    )),
                    'd' => stack.push((path.clone(), child, depth + 1, e.size, child_cost)),
                    'l' if child != 0 => match self.ext.link_target(child, MAX_LINK) {
                        Ok(t) => e.target = Some(show(&t)),
                        Err(err) => warn.push(format!("{}: target not read: {err}", show(&path))),
                    },
                    '-' if child != 0 => {
                        (ranges, hash) = self.file(&mut st, child, &path, &mut e, warn);
                    }
                    _ => {}
                }
                if opts.keep_ranges {
                    st.w.ranges.push(ranges);
                }
                if opts.hash_content {
                    st.w.hashes.push(hash);
                }
                st.w.entries.push(e);
            }
        }
        if self.ext.bad_names > 0 {
            warn.push(format!(
                "{} directory entries skipped: their names are empty or hold '/' or NUL",
                self.ext.bad_names
            ));
        }
        if overdrawn > 1 {
            warn.push(format!(
                "{overdrawn} directories not listed for the cost of finding their paths"
            ));
        }
        *hash_budget = st.hash_budget;
        sort(st.w)
    }

    /// A directory's children as ext4-view lists them (names, inodes read by it, checksums
    /// checked), each with its inode number from `inos`, in name order; None: not listed.
    fn listing(
        &mut self,
        ino: u32,
        inos: &HashMap<Vec<u8>, u32>,
        dir: &[u8],
        left: usize,
        warn: &mut Warnings,
    ) -> Option<Vec<Kid>> {
        let fs = self.fs.as_ref()?;
        let listing = match fs.read_dir(dir) {
            Ok(it) => it,
            Err(e) => {
                let why = self.unreadable(ino).unwrap_or_else(|| e.to_string());
                warn.push(format!("{}: cannot list: {why}", show(dir)));
                return None;
            }
        };
        let mut children: Vec<DirEntry> = Vec::new();
        let mut names: HashSet<Vec<u8>> = HashSet::new();
        // ext4-view's listing ends at its first error.
        for r in listing {
            match r {
                Ok(d) if d.file_name() == "." || d.file_name() == ".." => {}
                Ok(d) if !names.insert(d.file_name().as_ref().to_vec()) => {}
                Ok(d) => children.push(d),
                Err(e) => {
                    let why = self.unreadable(ino).unwrap_or_else(|| e.to_string());
                    warn.push(format!("{}: listing cut short: {why}", show(dir)))
                }
            }
            if children.len() > left {
                break;
            }
        }
        children.sort_by(|a, b| a.file_name().as_ref().cmp(b.file_name().as_ref()));
        let kids = children
            .into_iter()
            .map(|d| {
                let name = d.file_name().as_ref().to_vec();
                let child = inos.get(&name).copied().unwrap_or(0);
                let meta = d.metadata();
                // What ext4-view made of zeros it was handed (an offline cache) is said as
                // what it is.
                let err = meta.as_ref().err().map(|err| {
                    let at = self.ext.inode_offset(child);
                    if at.is_some_and(|a| self.disk.zero_filled(&[(a, a + 1)])) {
                        "its inode is neither in the cache nor readable from the base".to_string()
                    } else {
                        err.to_string()
                    }
                });
                (name, child, entry(child, &d, meta.as_ref().ok()), err)
            })
            .collect();
        Some(kids)
    }

    /// A directory's children as our own reader sees them (after a crash: as of the last
    /// checkpoint, consistently; ext4-view's replay of a journal is not bounded), in name order.
    fn own_listing(&mut self, inos: &HashMap<Vec<u8>, u32>, left: usize) -> Vec<Kid> {
        let mut names: Vec<(&Vec<u8>, u32)> = inos
            .iter()
            .filter(|(n, _)| n.as_slice() != b"." && n.as_slice() != b"..")
            .map(|(n, &i)| (n, i))
            .collect();
        names.sort();
        // One more than may be listed: the walk says where it stopped.
        names.truncate(left.saturating_add(1));
        names
            .into_iter()
            .map(|(name, child)| match self.ext.inode(child) {
                Ok(raw) => (name.clone(), child, raw_entry(child, &raw), None),
                Err(err) => (name.clone(), child, unknown_entry(child), Some(err)),
            })
            .collect()
    }

    /// A regular file's data ranges (when kept for `--trace`), held bytes and (with
    /// `hash_content`) hash; each inode worked out once, its hard links share the result.
    fn file(
        &mut self,
        st: &mut Walk,
        ino: u32,
        path: &[u8],
        e: &mut Entry,
        warn: &mut Warnings,
    ) -> (Ranges, Option<[u8; 32]>) {
        if !st.files.contains_key(&ino) {
            let pieces = self.file_data(ino, path, warn);
            let r: Vec<(u64, u64)> = pieces.iter().map(|p| (p.1, p.2)).collect();
            let bytes = r.iter().fold(0u64, |a, x| a.saturating_add(x.1 - x.0));
            let held = st.held.map(|h| {
                r.iter()
                    .fold(0u64, |a, x| a.saturating_add(overlap(h, x.0, x.1)))
            });
            st.w.data_bytes = st.w.data_bytes.saturating_add(bytes);
            st.w.data_held = st.w.data_held.saturating_add(held.unwrap_or(0));
            let hash = if st.opts.hash_content {
                self.hash(st, e.size, &pieces, warn)
            } else {
                None
            };
            let kept = if !st.opts.keep_ranges {
                st.none.clone()
            } else if st.ranges_kept + r.len() <= MAX_RANGES {
                st.ranges_kept += r.len();
                Arc::new(r)
            } else {
                if st.ranges_kept <= MAX_RANGES {
                    warn.push(
                        "more data ranges than --trace keeps: later files are not attributed",
                    );
                    st.ranges_kept = MAX_RANGES + 1;
                }
                st.none.clone()
            };
            st.files.insert(
                ino,
                FileInfo {
                    ranges: kept,
                    bytes,
                    held,
                    hash,
                },
            );
        }
        let f = &st.files[&ino];
        if let Some(held) = f.held {
            e.held = Some(Held {
                bytes: f.bytes,
                held,
            });
        }
        (f.ranges.clone(), f.hash)
    }

    /// BLAKE3 of a regular file's content, None when it cannot be read whole (an offline
    /// cache lacks some of it), is too large, or is past the walk's budget.
    fn hash(
        &mut self,
        st: &mut Walk,
        size: u64,
        pieces: &[Piece],
        warn: &mut Warnings,
    ) -> Option<[u8; 32]> {
        if size > MAX_HASHED {
            return None;
        }
        if size > st.hash_budget {
            if st.hash_budget != u64::MAX {
                warn.push("more file content than the disk holds: the rest is not compared");
                st.hash_budget = u64::MAX;
            }
            return None;
        }
        if st.hash_budget != u64::MAX {
            st.hash_budget -= size;
        }
        let mut h = blake3::Hasher::new();
        self.read_data(size, pieces, |b| {
            h.update(b);
        })
        .ok()?;
        Some(*h.finalize().as_bytes())
    }

    /// A regular file's data as pieces (byte in the file, disk start, disk end).
    fn file_data(&mut self, ino: u32, path: &[u8], warn: &mut Warnings) -> Vec<Piece> {
        match self.ext.data(ino) {
            Ok((_, pieces)) => pieces,
            Err(e) => {
                warn.push(format!("{}: blocks not mapped: {e}", show(path)));
                Vec::new()
            }
        }
    }

    /// Why directory `ino` could not be listed, when the reason is that ext4-view was handed
    /// zeros for its blocks (an offline cache lacks them).
    fn unreadable(&mut self, ino: u32) -> Option<String> {
        let (_, pieces) = self.ext.data(ino).ok()?;
        let r: Vec<(u64, u64)> = pieces.iter().map(|p| (p.1, p.2)).collect();
        self.disk
            .zero_filled(&r)
            .then(|| "its blocks are neither in the cache nor readable from the base".into())
    }

    /// The packages dpkg installed (see [`super::packages`]): the status file found by path
    /// and read through our own reads (after a crash: as of the last checkpoint).
    pub fn packages(&mut self, warn: &mut Warnings) -> Vec<super::Package> {
        use super::packages::{parse, MAX_STATUS, STATUS};
        if self.ext.lookup("/var/lib/rpm").is_ok_and(|i| i.is_some()) {
            warn.push("/var/lib/rpm: an rpm database, not read (rpm packages are not listed)");
        }
        let read = match self.ext.lookup(STATUS) {
            Ok(None) => return Vec::new(),
            Err(e) => Err(e),
            Ok(Some(ino)) => match self.ext.data(ino) {
                Err(e) => Err(e),
                Ok((inode, _)) if inode.mode & 0xF000 != 0x8000 => {
                    Err("not a regular file".to_string())
                }
                Ok((inode, _)) if inode.size > MAX_STATUS => {
                    Err(format!("{} bytes, more than {MAX_STATUS}", inode.size))
                }
                Ok((inode, pieces)) => {
                    let mut out = Vec::new();
                    self.read_data(inode.size, &pieces, |b| out.extend_from_slice(b))
                        .map(|_| out)
                }
            },
        };
        match read {
            Ok(b) => parse(&String::from_utf8_lossy(&b)),
            Err(e) => {
                warn.push(format!("{STATUS}: not read, packages not listed: {e}"));
                Vec::new()
            }
        }
    }

    /// The content of a regular file (`size` bytes; holes as zeros) fed to `f` in pieces, read
    /// through our block maps (no path lookups: a huge linear directory costs nothing more).
    pub fn read_data(
        &mut self,
        size: u64,
        pieces: &[Piece],
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), String> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(1 << 20, 0);
        let r = self.read_pieces(size, pieces, &mut buf, &mut f);
        self.buf = buf;
        r
    }

    fn read_pieces(
        &self,
        size: u64,
        pieces: &[Piece],
        buf: &mut [u8],
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), String> {
        static ZEROS: [u8; 65536] = [0; 65536];
        let zeros = |mut n: u64, f: &mut dyn FnMut(&[u8])| {
            while n > 0 {
                let k = n.min(ZEROS.len() as u64);
                f(&ZEROS[..k as usize]);
                n -= k;
            }
        };
        let mut pos = 0u64;
        for &(at, start, end) in pieces {
            if at < pos {
                return Err("blocks overlap".into());
            }
            zeros(at - pos, f);
            let mut d = start;
            while d < end {
                let n = (end - d).min(buf.len() as u64) as usize;
                self.disk.read_into(d, &mut buf[..n])?;
                f(&buf[..n]);
                d += n as u64;
            }
            pos = at + (end - start);
        }
        zeros(size.saturating_sub(pos), f);
        Ok(())
    }
}
