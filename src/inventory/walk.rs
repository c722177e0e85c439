//! One file system's files: ext4-view lists directories and reads inodes (checksums, hash
//! trees, journal replay are its business); [`super::extfs`] adds the inode numbers, for loops
//! and hard links, and each file's blocks, for what a cache holds of it. Every walk is bounded.

use super::disk::{overlap, Disk, PartReader};
use super::extfs::ExtFs;
use super::{Entry, Held, Options, Warnings};
use ext4_view::{DirEntry, Ext4, Metadata};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// Deeper directories are not entered.
pub const MAX_DEPTH: usize = 256;
/// Errors one directory's listing may yield before it is left.
const MAX_DIR_ERRORS: usize = 16;
/// Symlink targets longer than this are not read.
const MAX_LINK: u64 = 4096;

/// What one file system yields: its entries, and (when asked for) each entry's disk ranges of
/// data, in entry order.
pub struct Walked {
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub entries: Vec<Entry>,
    pub ranges: Vec<Vec<(u64, u64)>>,
    /// Bytes of all regular files' blocks (hard links once), and of them held.
    pub data_bytes: u64,
    pub data_held: u64,
}

pub struct FsHandle {
    pub fs: Ext4,
    ext: ExtFs,
}

impl FsHandle {
    pub fn open(disk: &Rc<Disk>, start: u64, len: u64) -> Result<FsHandle, String> {
        let ext = ExtFs::open(disk.clone(), start, len)?;
        let reader = PartReader {
            disk: disk.clone(),
            start,
            len,
            block: ext.block_size,
        };
        let fs = Ext4::load(Box::new(reader)).map_err(|e| format!("ext4: {e}"))?;
        Ok(FsHandle { fs, ext })
    }

    /// Every entry under `/`, each directory's in name order; `held`: the disk ranges a cache holds.
    pub fn walk(
        &mut self,
        held: Option<&[(u64, u64)]>,
        opts: &Options,
        left: &mut usize,
        warn: &mut Warnings,
    ) -> Walked {
        let mut w = Walked {
            label: self.fs.label().to_str().unwrap_or("").to_string(),
            uuid: self.fs.uuid().to_string(),
            block_size: self.ext.block_size,
            entries: Vec::new(),
            ranges: Vec::new(),
            data_bytes: 0,
            data_held: 0,
        };
        let mut visited: HashSet<u32> = HashSet::from([2]);
        let mut counted: HashSet<u32> = HashSet::new();
        let mut stack: Vec<(Vec<u8>, u32, usize)> = vec![(b"/".to_vec(), 2, 0)];
        while let Some((dir, ino, depth)) = stack.pop() {
            let inos: HashMap<Vec<u8>, u32> = match self.ext.dir_entries(ino) {
                Ok(v) => v.into_iter().collect(),
                Err(e) => {
                    warn.push(format!("{}: {e}", show(&dir)));
                    HashMap::new()
                }
            };
            let listing = match self.fs.read_dir(dir.as_slice()) {
                Ok(it) => it,
                Err(e) => {
                    warn.push(format!("{}: cannot list: {e}", show(&dir)));
                    continue;
                }
            };
            let mut children: Vec<DirEntry> = Vec::new();
            let mut errors = 0;
            for r in listing {
                match r {
                    Ok(d) if d.file_name() == "." || d.file_name() == ".." => {}
                    Ok(d) => children.push(d),
                    Err(e) => {
                        warn.push(format!("{}: {e}", show(&dir)));
                        // Past a bad entry the listing may go on; an iterator that only
                        // repeats its error is left.
                        errors += 1;
                        if errors == MAX_DIR_ERRORS {
                            break;
                        }
                    }
                }
                if children.len() > *left {
                    break;
                }
            }
            children.sort_by(|a, b| a.file_name().as_ref().cmp(b.file_name().as_ref()));
            for d in children {
                if *left == 0 {
                    warn.push("more entries than --max-entries: the listing stops here");
                    return w;
                }
                *left -= 1;
                let name = d.file_name().as_ref().to_vec();
                let mut path = dir.clone();
                if path.len() > 1 {
                    path.push(b'/');
                }
                path.extend_from_slice(&name);
                let child_ino = inos.get(&name).copied().unwrap_or(0);
                let meta = d.metadata();
                let mut e = entry(&path, child_ino, &d, meta.as_ref().ok());
                let mut ranges = Vec::new();
                if let Err(err) = &meta {
                    warn.push(format!("{}: {err}", show(&path)));
                }
                match e.kind {
                    'd' if child_ino == 0 => warn.push(format!("{}: no inode number found", show(&path))),
                    'd' if depth + 1 >= MAX_DEPTH => {
                        warn.push(format!("{}: deeper than {MAX_DEPTH} levels, not entered", show(&path)))
                    }
                    'd' if !visited.insert(child_ino) => warn.push(format!(
                        "{}: directory inode {child_ino} was met before (a loop or a hard-linked directory), not entered again",
                        show(&path)
                    )),
                    'd' => stack.push((path.clone(), child_ino, depth + 1)),
                    'l' if e.size <= MAX_LINK => match self.fs.read_link(path.as_slice()) {
                        Ok(t) => e.target = Some(show(t.as_ref())),
                        Err(err) => warn.push(format!("{}: {err}", show(&path))),
                    },
                    '-' if child_ino != 0 => {
                        ranges = self.file_ranges(child_ino, &path, warn);
                        let bytes: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
                        // Hard links share their data: counted once in the sums.
                        let first = counted.insert(child_ino);
                        if first {
                            w.data_bytes += bytes;
                        }
                        if let Some(h) = held {
                            let got: u64 = ranges.iter().map(|r| overlap(h, r.0, r.1)).sum();
                            if first {
                                w.data_held += got;
                            }
                            e.held = Some(Held { bytes, held: got });
                        }
                    }
                    _ => {}
                }
                if opts.keep_ranges {
                    w.ranges.push(ranges);
                }
                w.entries.push(e);
            }
        }
        w
    }

    /// The disk byte ranges of a regular file's data (its last block cut to its size).
    fn file_ranges(&mut self, ino: u32, path: &[u8], warn: &mut Warnings) -> Vec<(u64, u64)> {
        match self.ext.extents(ino) {
            Ok((inode, exts)) => {
                let bs = self.ext.block_size;
                exts.iter()
                    .filter_map(|x| {
                        let start = x.logical * bs;
                        let end = ((x.logical + x.count) * bs).min(inode.size);
                        (end > start).then(|| {
                            let d = self.ext.disk_offset(x.phys);
                            (d, d + (end - start))
                        })
                    })
                    .collect()
            }
            Err(e) => {
                warn.push(format!("{}: blocks not mapped: {e}", show(path)));
                Vec::new()
            }
        }
    }
}

/// A path as it prints: UTF-8, anything else replaced.
pub fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn entry(path: &[u8], ino: u32, d: &DirEntry, meta: Option<&Metadata>) -> Entry {
    let ft = meta.map(|m| m.file_type()).or_else(|| d.file_type().ok());
    let kind = match ft {
        Some(t) if t.is_dir() => 'd',
        Some(t) if t.is_regular_file() => '-',
        Some(t) if t.is_symlink() => 'l',
        Some(t) if t.is_char_dev() => 'c',
        Some(t) if t.is_block_dev() => 'b',
        Some(t) if t.is_fifo() => 'p',
        Some(t) if t.is_socket() => 's',
        _ => '?',
    };
    Entry {
        path: show(path),
        kind,
        size: meta.map_or(0, |m| m.len()),
        mode: meta.map_or(0, |m| m.mode()),
        uid: meta.map_or(0, |m| m.uid()),
        gid: meta.map_or(0, |m| m.gid()),
        mtime: meta.map_or(0, |m| m.modified().seconds()),
        ino,
        target: None,
        held: None,
        fs: 0,
    }
}
