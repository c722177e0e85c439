//! Which decompressed frames a read in guest order needs next.
//!
//! A pack holds chunks in first-boot order, so a read in guest order (a copy, a scrub, a
//! backup of the instance) meets a frame several times, far apart. With the frame cache's
//! least-recently-used eviction such a scan decoded about 12% of the frames it used twice
//! (32-chunk frames) and 21% (64-chunk frames). While reads come in guest order, the cache
//! instead lets go first of the frame needed furthest ahead (never, for one the scan has
//! passed): Belady's choice, since the scan's next reads are known from the index. Reads out
//! of order keep plain least-recently-used eviction. The table of uses is built the first
//! time a cache is read in guest order (a boot does that too, reading files in runs) and kept
//! while it is open.

use super::index::CacheIndex;
use super::parts::{cut_at_frames, FrameEdges};
use crate::Result;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A read continues a scan when it starts at most this many stored chunks (8 MiB) past the
/// furthest end read so far (a copy skips what the cache does not hold).
const NEAR: u64 = 2048;
/// A read ending at most this many stored chunks (16 MiB) before that furthest end neither
/// continues nor ends a scan: requests in flight at once are served out of order (`qemu-img
/// convert` keeps 8 of 2 MiB). One further back ends it.
const BACK: u64 = 4096;
/// Reads in a row that continue one before they count as a scan.
const STREAK: u32 = 8;
/// A frame counts as passed when its last use ends this many chunks (2 MiB) before the read
/// that needs room: reads in flight behind it may still use it.
const LAG: u64 = 512;

/// Whether reads of a hoarded cache come in guest order now.
#[derive(Debug, Default)]
pub struct Scan {
    /// The furthest end (in chunks) read since the scan began.
    high: AtomicU64,
    /// Reads in a row that continued the one before.
    streak: AtomicU32,
}

/// Where each frame of a hoarded cache is used, in guest chunks.
#[derive(Debug)]
pub struct Uses {
    /// (pack, frame, its first use in `uses`) of each frame used, in order, and an end mark.
    frames: Vec<(u32, u32, u32)>,
    /// (first chunk, end chunk) of each use, frame by frame, in guest order.
    uses: Vec<(u64, u64)>,
}

/// Most uses a [`Uses`] holds (16 MiB of them; a cache of ~75 GiB as the benchmarks' guests
/// store theirs): a larger one, or a hostile index, keeps least-recently-used eviction.
pub const MAX_USES: usize = 1 << 20;

impl Uses {
    /// The table of `index` (the file at `path`) over the frame edges of its `packs`;
    /// `None` when it uses its frames over [`MAX_USES`] times (the cut stops there).
    pub fn of(index: &CacheIndex, path: &Path, packs: &[FrameEdges]) -> Result<Option<Uses>> {
        let mut uses = Vec::new();
        let mut over = false;
        cut_at_frames(index, path, packs, |p| {
            if uses.len() == MAX_USES {
                over = true;
                return ControlFlow::Break(());
            }
            uses.push((p.pack, p.frame, p.guest, p.guest + u64::from(p.chunks)));
            ControlFlow::Continue(())
        })?;
        Ok((!over).then(|| Uses::new(uses)))
    }

    /// From every use of a frame (pack, frame, first guest chunk, end chunk), in any order.
    fn new(parts: impl IntoIterator<Item = (u32, u32, u64, u64)>) -> Uses {
        let mut p: Vec<(u32, u32, u64, u64)> = parts.into_iter().collect();
        p.sort_unstable();
        debug_assert!(p.len() <= MAX_USES, "MAX_USES fit in u32");
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
        frames.shrink_to_fit();
        Uses {
            frames,
            uses: p.iter().map(|u| (u.2, u.3)).collect(),
        }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> u64 {
        (std::mem::size_of_val(&self.frames[..]) + std::mem::size_of_val(&self.uses[..])) as u64
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
    /// how many chunks are stored between two guest chunks (at least `BACK + 1` if more).
    pub fn read(&self, first: u64, end: u64, stored: impl FnOnce(u64, u64) -> u64) -> bool {
        let high = self.high.fetch_max(end, Ordering::Relaxed);
        if first >= high {
            if stored(high, first) <= NEAR {
                let s = self.streak.load(Ordering::Relaxed);
                if s < STREAK {
                    self.streak.store(s + 1, Ordering::Relaxed);
                    return false;
                }
                return true;
            }
        } else if stored(end.min(high), high) <= BACK {
            // Served out of order: as things were.
            return self.streak.load(Ordering::Relaxed) >= STREAK;
        }
        // A jump, either way: a scan may begin here.
        self.streak.store(0, Ordering::Relaxed);
        self.high.store(end, Ordering::Relaxed);
        false
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
        let d = |a: u64, b: u64| b - a;
        let o = 100_000u64;
        let got: Vec<bool> = (0..12u64)
            .map(|i| a.read(o + i * 64, o + i * 64 + 64, d))
            .collect();
        assert!(!got[..STREAK as usize].contains(&true));
        assert!(got[11]);
        // Served out of order, a little behind: the scan goes on, without counting.
        assert!(a.read(o + 768 - BACK, o + 832 - BACK, d));
        assert!(a.read(o + 768, o + 832, d));
        // Further behind, or far ahead: it ends.
        assert!(!a.read(o + 832 - BACK - 65, o + 832 - BACK - 1, d));
        assert!(!a.read(1 << 30, (1 << 30) + 64, d));
        assert!(!a.read((1 << 30) + 64, (1 << 30) + 128, d));
        // A scan backwards from a standing start never counts (its steps are neither forward
        // nor far); after a scan forwards, it is taken for requests out of order for at most
        // BACK chunks, then a step ends it.
        let b = Scan::default();
        let back: Vec<bool> = (0..40u64)
            .rev()
            .map(|i| b.read(i * 64, i * 64 + 64, d))
            .collect();
        assert!(!back.contains(&true));
        let e = Scan::default();
        for i in 0..12u64 {
            e.read(o + i * 64, o + i * 64 + 64, d);
        }
        let back: Vec<bool> = (1..=80u64)
            .map(|k| e.read(o + 704 - k * 64, o + 768 - k * 64, d))
            .collect();
        assert_eq!(back.iter().filter(|&&s| s).count(), (BACK / 64) as usize);
        assert!(!back[(BACK / 64) as usize..].contains(&true));
        // Nothing stored between: a jump over what the cache does not hold goes on.
        let c = Scan::default();
        let on = (0..12u64).map(|i| c.read(i << 20, (i << 20) + 64, |_, _| 0));
        assert_eq!(on.filter(|&s| s).count(), 12 - STREAK as usize);
    }
}
