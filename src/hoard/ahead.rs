//! Which decompressed frames a read in guest order needs next.
//!
//! A pack holds chunks in first-boot order, so a read in guest order (a copy, a scrub, a
//! backup of the instance) meets a frame several times, far apart. With the frame cache's
//! least-recently-used eviction such a scan decoded about 12% of the frames it used twice
//! (32-chunk frames) and 21% (64-chunk frames). While reads come in guest order, the cache
//! instead lets go first of the frame needed furthest ahead (never, for one the scan has
//! passed): Belady's choice, since the scan's next reads are known from the index. Reads out
//! of order (a boot) keep plain least-recently-used eviction. The table of uses is built
//! the first time a cache is read in guest order: a server that only boots guests never
//! holds it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A read continues a scan when at most this many stored chunks (8 MiB) lie between the
/// previous read's end and its start (a copy skips what the cache does not hold)...
const NEAR: u64 = 2048;
/// ... or it starts at most this many stored chunks (2 MiB) before that end: requests in
/// flight at once are served a little out of order.
const BACK: u64 = 512;
/// Reads in a row that continue one before they count as a scan.
const STREAK: u32 = 8;
/// A frame counts as passed when its last use ends this many chunks (2 MiB) before the read
/// that needs room: reads in flight behind it may still use it.
const LAG: u64 = 512;

/// Whether reads of a hoarded cache come in guest order now.
#[derive(Debug, Default)]
pub struct Scan {
    /// End (in chunks) of the latest read.
    last_end: AtomicU64,
    /// Reads in a row that continued the one before.
    streak: AtomicU32,
}

/// Where each frame of a hoarded cache is used, in guest chunks.
#[derive(Debug, Default)]
pub struct Uses {
    /// (pack, frame, its first use in `uses`) of each frame used, in order, and an end mark.
    frames: Vec<(u32, u32, u32)>,
    /// (first chunk, end chunk) of each use, frame by frame, in guest order.
    uses: Vec<(u64, u64)>,
}

/// Most uses a [`Uses`] holds (16 MiB of them; a cache of ~75 GiB as the benchmarks' guests
/// store theirs): a larger one, or a hostile index, keeps least-recently-used eviction.
pub const MAX_USES: usize = 1 << 20;
/// Bytes a [`Uses`] holds per frame used and per use.
const BYTES_PER_FRAME: u64 = 12;
const BYTES_PER_USE: u64 = 16;

impl Uses {
    /// From every use of a frame (pack, frame, first guest chunk, end chunk), in any order:
    /// the index cut at frame edges.
    pub fn new(parts: impl IntoIterator<Item = (u32, u32, u64, u64)>) -> Uses {
        let mut p: Vec<(u32, u32, u64, u64)> = parts.into_iter().collect();
        p.sort_unstable();
        // (At most MAX_USES, which fit in u32.)
        let mut frames = Vec::new();
        for (i, u) in p.iter().enumerate() {
            if frames
                .last()
                .is_none_or(|f: &(u32, u32, u32)| (f.0, f.1) != (u.0, u.1))
            {
                frames.push((u.0, u.1, i as u32));
            }
        }
        frames.push((u32::MAX, u32::MAX, p.len() as u32));
        Uses {
            frames,
            uses: p.iter().map(|u| (u.2, u.3)).collect(),
        }
    }

    /// Bytes held for `frames` frames used `uses` times.
    pub fn footprint(frames: u64, uses: u64) -> u64 {
        frames * BYTES_PER_FRAME + uses * BYTES_PER_USE
    }

    /// How far ahead of chunk `pos` a scan next uses frame `frame` of pack `pack`, in chunks:
    /// `u64::MAX` if it has passed every use (or the frame is not this cache's).
    pub fn distance(&self, (pack, frame): (u32, u32), pos: u64) -> u64 {
        let n = self.frames.len().saturating_sub(1);
        let Ok(i) = self.frames[..n].binary_search_by_key(&(pack, frame), |f| (f.0, f.1)) else {
            return u64::MAX;
        };
        let mine = &self.uses[self.frames[i].2 as usize..self.frames[i + 1].2 as usize];
        let pos = pos.saturating_sub(LAG);
        match mine.get(mine.partition_point(|u| u.1 <= pos)) {
            Some(u) => u.0.saturating_sub(pos),
            None => u64::MAX,
        }
    }
}

impl Scan {
    /// A read of chunks `first..end`: whether it continues a scan in guest order. `stored`:
    /// how many chunks are stored between two guest chunks (at least `NEAR + 1` if more).
    pub fn read(&self, first: u64, end: u64, stored: impl FnOnce(u64, u64) -> u64) -> bool {
        let prev = self.last_end.swap(end, Ordering::Relaxed);
        let on = if first >= prev {
            stored(prev, first) <= NEAR
        } else {
            stored(first, prev) <= BACK
        };
        if !on {
            self.streak.store(0, Ordering::Relaxed);
            return false;
        }
        let s = self.streak.load(Ordering::Relaxed);
        if s < STREAK {
            self.streak.store(s + 1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_scans() {
        // Frame 0 used at chunks 0..10 and 5000..5010, frame 1 at 10..20.
        let a = Uses::new([(0, 0, 5000, 5010), (0, 1, 10, 20), (0, 0, 0, 10)]);
        assert_eq!(a.distance((0, 0), 0), 0);
        assert_eq!(a.distance((0, 1), 0), 10);
        // Past frame 0's first use (beyond the lag): its next is at 5000.
        assert_eq!(a.distance((0, 0), 1000), 5000 - (1000 - LAG));
        assert_eq!(a.distance((0, 1), 1000), u64::MAX);
        assert_eq!(a.distance((0, 0), 6000), u64::MAX);
        assert_eq!(a.distance((1, 0), 0), u64::MAX);
        assert_eq!(a.distance((0, 7), 0), u64::MAX);
        // A scan counts after STREAK reads that continue each other; a jump ends it.
        let a = Scan::default();
        let mut got = Vec::new();
        for i in 0..12u64 {
            got.push(a.read(i * 64, i * 64 + 64, |a, b| b - a));
        }
        assert!(!got[..STREAK as usize].contains(&true));
        assert!(got[11]);
        assert!(!a.read(1 << 30, (1 << 30) + 64, |a, b| b - a));
        assert!(!a.read((1 << 30) + 64, (1 << 30) + 128, |a, b| b - a));
        // Back a little goes on (requests served out of order); back further ends a scan.
        for _ in 0..12 {
            a.read((1 << 30) + 128, (1 << 30) + 192, |a, b| b - a);
        }
        assert!(a.read((1 << 30) + 192 - BACK, (1 << 30) + 200, |a, b| b - a));
        assert!(!a.read((1 << 30) + 200 - BACK - 1, (1 << 30) + 200, |a, b| b - a));
        // Nothing stored between: a jump over what the cache does not hold goes on.
        let b = Scan::default();
        let on = (0..12u64).map(|i| b.read(i << 20, (i << 20) + 64, |_, _| 0));
        assert_eq!(on.filter(|&s| s).count(), 12 - STREAK as usize);
    }
}
