//! A recorded boot in the guest's terms: which files its reads touched, in first-read order,
//! and how many bytes of each; what no file claims is file-system metadata (or free space).

use super::Inventory;
use crate::format::trace::Trace;

#[derive(Debug, Clone, serde::Serialize)]
pub struct TraceFile {
    pub path: String,
    pub fs: u32,
    /// The file's size.
    pub size: u64,
    /// Bytes of the file's data the boot read.
    pub read: u64,
    /// Index of the trace read that first touched it.
    pub first_read: usize,
    /// Disk offset where that read first touched it (orders files one read touched).
    #[serde(skip)]
    first_at: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TraceReport {
    pub reads: usize,
    pub bytes: u64,
    /// Bytes read that lie in no file's data (inode tables, directories, journal, ...).
    pub other_bytes: u64,
    pub files: Vec<TraceFile>,
}

/// Attribute the trace's reads to the files of `inv` (taken with `keep_ranges`).
pub fn attribute(inv: &Inventory, trace: &Trace) -> TraceReport {
    // Every data range of every file, sorted by disk offset: (start, end, entry). Hard links
    // share their ranges: each file counts once, under its first path.
    let mut seen = std::collections::HashSet::new();
    let mut index: Vec<(u64, u64, usize)> = inv
        .ranges
        .iter()
        .enumerate()
        .filter(|(_, rs)| !rs.is_empty() && seen.insert(std::sync::Arc::as_ptr(rs)))
        .flat_map(|(i, rs)| rs.iter().map(move |r| (r.0, r.1, i)))
        .collect();
    index.sort_unstable();
    let mut read = vec![0u64; inv.entries.len()];
    let mut first = vec![(usize::MAX, 0u64); inv.entries.len()];
    let (mut bytes, mut in_files) = (0u64, 0u64);
    for (n, &(off, len)) in trace.reads.iter().enumerate() {
        let end = off.saturating_add(len);
        bytes += len;
        // Ranges are disjoint in a sound file system; a range that starts before `off` may
        // still reach into it, so start from the last range starting at or before `off`.
        let mut i = index.partition_point(|r| r.0 <= off).saturating_sub(1);
        while i < index.len() && index[i].0 < end {
            let (s, e, entry) = index[i];
            let got = e.min(end).saturating_sub(s.max(off));
            if got > 0 {
                read[entry] += got;
                in_files += got;
                first[entry] = first[entry].min((n, s.max(off)));
            }
            i += 1;
        }
    }
    let mut files: Vec<TraceFile> = (0..inv.entries.len())
        .filter(|&i| read[i] > 0)
        .map(|i| TraceFile {
            path: inv.entries[i].path.clone(),
            fs: inv.entries[i].fs,
            size: inv.entries[i].size,
            read: read[i],
            first_read: first[i].0,
            first_at: first[i].1,
        })
        .collect();
    files.sort_by_key(|f| (f.first_read, f.first_at));
    TraceReport {
        reads: trace.reads.len(),
        bytes,
        other_bytes: bytes.saturating_sub(in_files),
        files,
    }
}
