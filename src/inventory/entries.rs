//! Entries as the walk makes them: from ext4-view's metadata or our own inode decoding, and
//! in path order at the end.

use super::extfs::RawInode;
use super::walk::Walked;
use super::Entry;
use ext4_view::{DirEntry, Metadata};

/// Entries in path order, their ranges and hashes along.
pub fn sort(mut w: Walked) -> Walked {
    let mut order: Vec<usize> = (0..w.entries.len()).collect();
    order.sort_by(|&a, &b| w.entries[a].path.cmp(&w.entries[b].path));
    w.entries = permute(std::mem::take(&mut w.entries), &order);
    w.ranges = permute(std::mem::take(&mut w.ranges), &order);
    w.hashes = permute(std::mem::take(&mut w.hashes), &order);
    w
}

/// `v` in the order `order` names (an empty `v` stays empty).
fn permute<T>(v: Vec<T>, order: &[usize]) -> Vec<T> {
    if v.is_empty() {
        return v;
    }
    let mut old: Vec<Option<T>> = v.into_iter().map(Some).collect();
    order.iter().map(|&i| old[i].take().unwrap()).collect()
}

/// A path as it prints: UTF-8, anything else replaced.
pub fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A listed child: name, inode number (0: unknown), its entry (path filled in by the walk),
/// and what went wrong reading its inode.
pub type Kid = (Vec<u8>, u32, Entry, Option<String>);

pub fn entry(ino: u32, d: &DirEntry, meta: Option<&Metadata>) -> Entry {
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
        kind,
        size: meta.map_or(0, |m| m.len()),
        mode: meta.map_or(0, |m| m.mode()),
        uid: meta.map_or(0, |m| m.uid()),
        gid: meta.map_or(0, |m| m.gid()),
        mtime: meta.map_or(0, |m| m.modified().seconds()),
        ..unknown_entry(ino)
    }
}

/// An entry from an inode as our reader decodes it.
pub fn raw_entry(ino: u32, raw: &RawInode) -> Entry {
    let kind = match raw.mode & 0xF000 {
        0x4000 => 'd',
        0x8000 => '-',
        0xA000 => 'l',
        0x2000 => 'c',
        0x6000 => 'b',
        0x1000 => 'p',
        0xC000 => 's',
        _ => '?',
    };
    Entry {
        kind,
        size: raw.size,
        mode: raw.mode & 0o7777,
        uid: raw.uid,
        gid: raw.gid,
        mtime: raw.mtime,
        ..unknown_entry(ino)
    }
}

pub fn unknown_entry(ino: u32) -> Entry {
    Entry {
        path: String::new(),
        kind: '?',
        size: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime: 0,
        ino,
        target: None,
        held: None,
        fs: 0,
    }
}
