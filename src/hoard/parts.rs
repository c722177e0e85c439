//! A hoarded cache's index cut at the edges of its packs' frames: which guest chunks each
//! frame holds for it. A checkout decodes each frame once from these; a read in guest order
//! learns from them where it meets each frame next ([`super::ahead::Uses`]).

use super::index::CacheIndex;
use super::store::PackReader;
use crate::{Error, Result};
use std::ops::ControlFlow;
use std::path::Path;

/// Guest chunks `guest..guest+chunks` of a hoarded cache are chunks `at..at+chunks` of frame
/// `frame` of its pack `pack` (by its number in the index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePart {
    pub pack: u32,
    pub frame: u32,
    pub at: u32,
    pub guest: u64,
    pub chunks: u32,
}

/// Where a pack's frames start.
#[derive(Debug, Clone, Copy)]
pub struct FrameEdges<'p> {
    /// First chunk of each frame: from 0, increasing.
    pub first: &'p [u32],
    /// Chunks in the pack.
    pub chunks: u32,
}

impl<'p> FrameEdges<'p> {
    pub fn of(p: &'p PackReader) -> FrameEdges<'p> {
        FrameEdges {
            first: &p.first,
            chunks: p.chunks(),
        }
    }
}

/// The stored runs of `index` (the file at `path`) cut at the edges of the frames of its
/// packs (`packs`, in its order), in guest order, until `each` breaks. A run beyond its pack
/// is an error.
pub fn cut_at_frames(
    index: &CacheIndex,
    path: &Path,
    packs: &[FrameEdges],
    mut each: impl FnMut(FramePart) -> ControlFlow<()>,
) -> Result<()> {
    for (i, r) in index.runs.iter().enumerate().filter(|(_, r)| r.in_pack()) {
        let beyond = || {
            Error::corrupt(
                path,
                format!(
                    "run {i} names chunks {}+{} of pack {}",
                    r.first, r.count, r.pack
                ),
            )
        };
        let pack = packs.get(r.pack as usize).ok_or_else(beyond)?;
        let end = (r.first.checked_add(r.count))
            .filter(|&e| e <= pack.chunks)
            .ok_or_else(beyond)?;
        let mut c = r.first;
        while c < end {
            let fi = pack.first.partition_point(|&f| f <= c).saturating_sub(1);
            let next = pack.first.get(fi + 1).copied().unwrap_or(pack.chunks);
            let f0 = pack.first.get(fi).copied().filter(|&f| f <= c);
            let (Some(f0), n @ 1..) = (f0, next.min(end).saturating_sub(c)) else {
                return Err(Error::corrupt(
                    path,
                    format!("pack {} has no frame holding its chunk {c}", r.pack),
                ));
            };
            let part = FramePart {
                pack: r.pack,
                frame: fi as u32,
                at: c - f0,
                guest: r.start + u64::from(c - r.first),
                chunks: n,
            };
            if each(part).is_break() {
                return Ok(());
            }
            c += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hoard::index::IndexRun;

    fn index(runs: &[(u64, u32, u32, u32)]) -> CacheIndex {
        CacheIndex {
            runs: (runs.iter())
                .map(|&(start, count, pack, first)| IndexRun {
                    start,
                    count,
                    pack,
                    first,
                })
                .collect(),
            virtual_size: 1 << 30,
            cluster_bits: 16,
            backing_file: None,
            backing_format: None,
            extension: Vec::new(),
            trace: Vec::new(),
            packs: Vec::new(),
        }
    }

    /// (pack, frame, at, guest, chunks) of each part.
    type Cut = Vec<(u32, u32, u32, u64, u32)>;

    fn cut(idx: &CacheIndex, packs: &[FrameEdges]) -> Result<Cut> {
        let mut out = Vec::new();
        cut_at_frames(idx, Path::new("x.vmh"), packs, |p| {
            out.push((p.pack, p.frame, p.at, p.guest, p.chunks));
            ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    #[test]
    fn runs_cut_at_frame_edges_and_hostile_ones_refused() {
        // A pack of 10 chunks in frames 0..4, 4..8, 8..10.
        let p = FrameEdges {
            first: &[0, 4, 8],
            chunks: 10,
        };
        let idx = index(&[(100, 7, 0, 2), (200, 1, 0, 9)]);
        let want = vec![
            (0, 0, 2, 100, 2),
            (0, 1, 0, 102, 4),
            (0, 2, 0, 106, 1),
            (0, 2, 1, 200, 1),
        ];
        assert_eq!(cut(&idx, &[p]).unwrap(), want);
        // Stopped early.
        let mut n = 0;
        cut_at_frames(&idx, Path::new("x"), &[p], |_| {
            n += 1;
            if n == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(n, 2);
        // A run beyond its pack, a pack the index lacks, a pack with no frames, frames
        // not starting at 0: errors, never a panic.
        for (idx, packs) in [
            (index(&[(0, 3, 0, 8)]), vec![p]),
            (index(&[(0, 1, 1, 0)]), vec![p]),
            (
                index(&[(0, 1, 0, 0)]),
                vec![FrameEdges {
                    first: &[],
                    chunks: 4,
                }],
            ),
            (
                index(&[(0, 1, 0, 0)]),
                vec![FrameEdges {
                    first: &[2],
                    chunks: 4,
                }],
            ),
        ] {
            let e = cut(&idx, &packs).unwrap_err().to_string();
            assert!(e.contains("x.vmh"), "{e}");
        }
    }
}
