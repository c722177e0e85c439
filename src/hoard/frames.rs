//! Decompressed frames of an open hoarded cache, shared by its readers: least recently used
//! frames go when the byte limit is reached (during a read in guest order, those it needs
//! furthest ahead, within a larger limit), and a frame being decompressed is waited for, not
//! decompressed twice (parallel readers of neighbouring ranges meet the same frames).

use crate::Result;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Buffers of evicted frames kept for decompressing into (about one per reading thread).
const SPARE_BUFFERS: usize = 4;

/// (pack, frame in the pack).
pub type FrameId = (u32, u32);

#[derive(Debug)]
struct Inner {
    /// (frame, last use, the chunks).
    slots: Vec<(FrameId, u64, Arc<Vec<u8>>)>,
    /// Frames some reader is decompressing now.
    busy: Vec<FrameId>,
    /// Buffers of evicted frames no reader holds any more, to decompress into again.
    spare: Vec<Vec<u8>>,
    bytes: usize,
    limit: usize,
    /// The limit while reads come in guest order.
    scan_limit: usize,
    clock: u64,
    decoded: u64,
}

#[derive(Debug)]
pub struct FrameCache {
    inner: Mutex<Inner>,
    done: Condvar,
}

impl FrameCache {
    pub fn new(limit: usize, scan_limit: usize) -> FrameCache {
        FrameCache {
            inner: Mutex::new(Inner {
                slots: Vec::new(),
                busy: Vec::new(),
                spare: Vec::new(),
                bytes: 0,
                limit,
                scan_limit: scan_limit.max(limit),
                clock: 0,
                decoded: 0,
            }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frames decoded so far.
    pub fn decoded(&self) -> u64 {
        self.lock().decoded
    }

    /// Frame `id`, from the cache or by `decode` (outside the lock, into a spare buffer when
    /// there is one; another reader asking for the same frame meanwhile waits for it).
    /// `scan`, for a read in guest order: how far ahead the scan needs a frame. To make room,
    /// the least recently used frame goes; during a scan, the scan limit holds and the frame
    /// needed furthest ahead goes first (Belady's choice).
    pub fn get<L: Fn(FrameId) -> u64>(
        &self,
        id: FrameId,
        decode: impl FnOnce(Vec<u8>) -> Result<Vec<u8>>,
        scan: Option<L>,
    ) -> Result<Arc<Vec<u8>>> {
        let mut g = self.lock();
        loop {
            g.clock += 1;
            let now = g.clock;
            if let Some(s) = g.slots.iter_mut().find(|s| s.0 == id) {
                s.1 = now;
                return Ok(Arc::clone(&s.2));
            }
            if !g.busy.contains(&id) {
                break;
            }
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.busy.push(id);
        let spare = g.spare.pop().unwrap_or_default();
        drop(g);
        // Should `decode` panic, the frame is no longer busy and the waiters try it.
        struct Unbusy<'c>(&'c FrameCache, FrameId, bool);
        impl Drop for Unbusy<'_> {
            fn drop(&mut self) {
                if self.2 {
                    self.0.lock().busy.retain(|b| *b != self.1);
                    self.0.done.notify_all();
                }
            }
        }
        let mut guard = Unbusy(self, id, true);
        let r = decode(spare);
        guard.2 = false;
        let mut g = self.lock();
        g.busy.retain(|b| *b != id);
        let out = r.map(|d| {
            let data = Arc::new(d);
            g.decoded += 1;
            let limit = if scan.is_some() {
                g.scan_limit
            } else {
                g.limit
            };
            let later = |id| scan.as_ref().map_or(0, |l| l(id));
            // Counted by capacity: a reused buffer may be larger than its frame. Out of a scan,
            // back to the limit by two frames out for one in: a scan that pauses keeps most.
            let mut evicted = 0;
            while !g.slots.is_empty() && g.bytes + data.capacity() > limit {
                if evicted >= 2 && g.bytes + data.capacity() <= g.scan_limit {
                    break;
                }
                evicted += 1;
                let old = (0..g.slots.len())
                    .min_by_key(|&i| (std::cmp::Reverse(later(g.slots[i].0)), g.slots[i].1))
                    .unwrap();
                let gone = g.slots.swap_remove(old);
                g.bytes -= gone.2.capacity();
                if let Ok(buf) = Arc::try_unwrap(gone.2) {
                    // (At most SPARE_BUFFERS of a frame's largest size, about 1 MiB each.)
                    if g.spare.len() < SPARE_BUFFERS {
                        g.spare.push(buf);
                    }
                }
            }
            let now = g.clock;
            g.bytes += data.capacity();
            g.slots.push((id, now, Arc::clone(&data)));
            data
        });
        drop(g);
        // Waiters look again: they find the frame, or (it failed) decode it themselves.
        self.done.notify_all();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO: Option<fn(FrameId) -> u64> = None;

    #[test]
    fn bounded_and_decoded_once() {
        let c = FrameCache::new(3 * 1024, 4 * 1024);
        for round in 0..2 {
            for f in 0..3 {
                let d = c.get((0, f), |_| Ok(vec![f as u8; 1024]), NO).unwrap();
                assert_eq!(d[0], f as u8, "round {round}");
            }
        }
        assert_eq!(c.decoded(), 3);
        c.get((0, 9), |_| Ok(vec![0; 1024]), NO).unwrap(); // evicts (0, 0)
        assert_eq!(c.lock().bytes, 3 * 1024);
        // A scan may fill the scan limit, and then the frame it needs furthest ahead goes,
        // not the least recently used (0, 1).
        c.get((0, 8), |_| Ok(vec![8; 1024]), Some(|_| 0)).unwrap();
        assert_eq!(c.lock().bytes, 4 * 1024);
        c.get(
            (0, 7),
            |_| Ok(vec![7; 1024]),
            Some(|id| u64::from(id == (0, 9))),
        )
        .unwrap();
        c.get((0, 1), |_| panic!("kept"), NO).unwrap();
        assert_eq!(c.decoded(), 6);
        // Reads out of order bring it back to the limit, two frames out for each one in.
        c.get((0, 6), |_| Ok(vec![6; 1024]), NO).unwrap();
        assert_eq!(c.lock().bytes, 3 * 1024);
        let c = FrameCache::new(2 * 1024, 6 * 1024);
        for f in 0..6 {
            c.get((0, f), |_| Ok(vec![0; 1024]), Some(|_| 0)).unwrap();
        }
        c.get((0, 6), |_| Ok(vec![0; 1024]), NO).unwrap();
        assert_eq!(c.lock().bytes, 5 * 1024);
        c.get((0, 7), |_| Ok(vec![0; 1024]), NO).unwrap();
        c.get((0, 8), |_| Ok(vec![0; 1024]), NO).unwrap();
        assert_eq!(c.lock().bytes, 3 * 1024);
        c.get((0, 9), |_| Ok(vec![0; 1024]), NO).unwrap();
        assert_eq!(c.lock().bytes, 2 * 1024);
        assert!(c
            .get((1, 1), |_| Err(crate::Error::corrupt("x", "bad")), NO)
            .is_err());
        assert!(c.lock().busy.is_empty());
        // Many threads asking for one frame: decoded once.
        let c = Arc::new(FrameCache::new(1 << 20, 1 << 20));
        let hs: Vec<_> = (0..8)
            .map(|_| {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    c.get(
                        (2, 2),
                        |_| {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![7; 4096])
                        },
                        NO,
                    )
                    .unwrap()[0]
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), 7);
        }
        assert_eq!(c.decoded(), 1);
    }
}
