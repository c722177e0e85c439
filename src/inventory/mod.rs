//! Inside an image, in the guest's own terms (Mirage's inventory, offline): partitions, ext2/3/4
//! file systems and their files, installed packages, what a cache holds of each file and which
//! files a recorded boot read. Reads go through the chain, read-only; a base that cannot be
//! reached limits what can be resolved, and the warnings say so.
//!
//! ext4-view (a maintained pure-Rust ext4 reader) lists directories and reads inodes; [`extfs`]
//! reads what its API does not give (inode numbers, block maps, and through them content), and
//! reads alone a file system whose journal needs replaying. docs/inventory.md has the bounds.

pub mod diff;
mod disk;
mod entries;
mod extfs;
mod packages;
mod part;
pub mod trace;
mod walk;

use crate::engine::Image;
use crate::Result;
use disk::Disk;
pub use part::Partition;
use std::collections::HashSet;
use std::rc::Rc;

/// Warnings met while reading (capped: a hostile image could yield millions).
#[derive(Debug, Default, Clone)]
pub struct Warnings(pub Vec<String>, pub u64);

const MAX_WARNINGS: usize = 200;

impl Warnings {
    pub fn push(&mut self, w: impl Into<String>) {
        if self.0.len() < MAX_WARNINGS {
            self.0.push(w.into());
        } else {
            self.1 += 1;
        }
    }
}

/// How much of a regular file's data a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Held {
    /// Bytes of the file's data blocks (holes not counted).
    pub bytes: u64,
    /// Of them, held by the layers above the base.
    pub held: u64,
}

impl Held {
    /// `whole`, `part` or `none`; `-` for a file with no data blocks.
    pub fn word(&self) -> &'static str {
        match (self.bytes, self.held) {
            (0, _) => "-",
            (b, h) if h >= b => "whole",
            (_, 0) => "none",
            _ => "part",
        }
    }
}

/// One directory entry of a guest file system.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub path: String,
    /// `ls -l`'s letter: `-` regular, `d`, `l`, `c`, `b`, `p`, `s`; `?` unknown.
    pub kind: char,
    pub size: u64,
    /// Permission bits (07777).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub ino: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// For a cache: how much of the file's data it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// The partition the file system is on (0: the whole disk).
    pub fs: u32,
}

/// One file system found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FsInfo {
    pub partition: u32,
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub entries: usize,
    /// Bytes of regular files' data blocks, and of them held by the cache.
    pub data_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_held: Option<u64>,
}

/// What the cache layers hold, summed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheSummary {
    /// Guest bytes the layers above the base hold.
    pub held_bytes: u64,
    /// Of them, regular files' data.
    pub file_data: u64,
    /// The rest: file-system metadata (inode tables, directories, journal, ...) and blocks no
    /// file claims.
    pub metadata: u64,
    pub files_whole: usize,
    pub files_part: usize,
    pub files_none: usize,
}

/// An installed package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub arch: String,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Keep each regular file's disk ranges (for `--trace`).
    pub keep_ranges: bool,
    /// Hash each regular file's content (for `--diff`).
    pub hash_content: bool,
    /// Stop listing after this many entries.
    pub max_entries: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keep_ranges: false,
            hash_content: false,
            max_entries: 4_000_000,
        }
    }
}

/// The inventory of one image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inventory {
    pub image: String,
    pub disk_bytes: u64,
    /// Layers in the chain (1: a base on its own; more: a cache or an instance over it).
    pub layers: usize,
    pub partitions: Vec<Partition>,
    pub filesystems: Vec<FsInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSummary>,
    pub packages: Vec<Package>,
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
    /// Per entry, the disk ranges of its data (with [`Options::keep_ranges`]; hard links
    /// share them).
    #[serde(skip)]
    pub ranges: Vec<walk::Ranges>,
    /// Per entry, the BLAKE3 of a regular file's content (with [`Options::hash_content`]).
    #[serde(skip)]
    pub hashes: Vec<Option<[u8; 32]>>,
    /// The base fingerprint a cache layer of the chain recorded (what its trace must match).
    #[serde(skip)]
    pub base_fingerprint: Option<[u8; 32]>,
}

/// Take the inventory of the chain `img` (opened read-only; its name `name`).
pub fn take(img: Image, name: &str, opts: &Options) -> Result<Inventory> {
    let layers = img.layers().len();
    let base_fingerprint = img.layers().iter().find_map(|l| {
        let meta = l.layer().cache_meta().ok().flatten()?;
        meta.base.map(|b| b.fingerprint)
    });
    let disk = Rc::new(Disk::new(img));
    let held = disk.held()?;
    let mut warn = Warnings::default();
    let parts = {
        let d = disk.clone();
        let mut read = move |off: u64, len: usize| d.read(off, len).ok();
        part::partitions(&mut read, disk.size(), &mut warn)
    };
    let mut inv = Inventory {
        image: name.to_string(),
        disk_bytes: disk.size(),
        layers,
        partitions: parts.clone(),
        filesystems: Vec::new(),
        cache: None,
        packages: Vec::new(),
        entries: Vec::new(),
        warnings: Vec::new(),
        ranges: Vec::new(),
        hashes: Vec::new(),
        base_fingerprint,
    };
    let mut left = opts.max_entries;
    // Content hashed for --diff: at most the disk's size and 1 GiB more in all (a hostile
    // file system could name one sparse file a million times).
    let mut hash_budget = disk.size().saturating_add(walk::MAX_HASHED);
    for p in &parts {
        match disk.read(p.start + 1024, 1024) {
            Ok(sb) if extfs::is_ext(&sb) => {}
            Ok(_) => continue,
            Err(e) => {
                warn.push(format!(
                    "partition {}: cannot read where a superblock would be: {e}",
                    p.number
                ));
                continue;
            }
        }
        let mut h = match walk::FsHandle::open(&disk, p.start, p.len) {
            Ok(h) => h,
            Err(e) => {
                warn.push(format!(
                    "partition {}: ext file system not read: {e}",
                    p.number
                ));
                continue;
            }
        };
        let w = h.walk(
            held.as_deref(),
            opts,
            &mut left,
            &mut hash_budget,
            &mut warn,
        );
        inv.filesystems.push(FsInfo {
            partition: p.number,
            label: w.label,
            uuid: w.uuid,
            block_size: w.block_size,
            entries: w.entries.len(),
            data_bytes: w.data_bytes,
            data_held: held.as_ref().map(|_| w.data_held),
        });
        inv.packages.extend(h.packages(&mut warn));
        inv.entries.extend(w.entries.into_iter().map(|mut e| {
            e.fs = p.number;
            e
        }));
        inv.ranges.extend(w.ranges);
        inv.hashes.extend(w.hashes);
    }
    if inv.filesystems.is_empty() {
        warn.push("no ext2/3/4 file system found");
    }
    if let Some(h) = &held {
        let held_bytes = h.iter().fold(0u64, |a, r| a.saturating_add(r.1 - r.0));
        let file_data = inv
            .filesystems
            .iter()
            .filter_map(|f| f.data_held)
            .fold(0u64, u64::saturating_add);
        // Files, not names: a hard link counts once.
        let mut seen: HashSet<(u32, u32)> = HashSet::new();
        let (mut whole, mut part, mut none) = (0, 0, 0);
        for e in &inv.entries {
            if let Some(h) = e.held.filter(|_| seen.insert((e.fs, e.ino))) {
                match h.word() {
                    "whole" => whole += 1,
                    "part" => part += 1,
                    "none" => none += 1,
                    _ => {}
                }
            }
        }
        inv.cache = Some(CacheSummary {
            held_bytes,
            file_data,
            metadata: held_bytes.saturating_sub(file_data),
            files_whole: whole,
            files_part: part,
            files_none: none,
        });
    }
    inv.packages.sort();
    let (failed, why) = disk.failures();
    if failed > 0 {
        warn.push(format!(
            "{failed} reads could not be answered (first: {}): what they would have shown is missing",
            why.unwrap_or_default()
        ));
    }
    if warn.1 > 0 {
        warn.0.push(format!("... and {} more warnings", warn.1));
    }
    inv.warnings = warn.0;
    Ok(inv)
}
