//! Reads as pieces that can be sent without copying file data through memory: zero runs,
//! bytes read into memory, and ranges of files that do not change while open (a sealed cache,
//! a base), which a server hands to `sendfile(2)`.

use super::image::Image;
use super::layer::Piece;
use super::layer::{MapMode, Mapping, SharedPart};
use crate::Result;

/// Appends `p` to `out`, merging it into the last piece when both are zeros or contiguous
/// ranges of one file; empty pieces are dropped.
fn push<'a>(out: &mut Vec<Piece<'a>>, p: Piece<'a>) {
    if p.is_empty() {
        return;
    }
    match (out.last_mut(), &p) {
        (Some(Piece::Zero(a)), Piece::Zero(b)) => *a += b,
        (
            Some(Piece::File { file, off, len }),
            Piece::File {
                file: f2,
                off: o2,
                len: l2,
            },
        ) if std::ptr::eq(*file, *f2) && *off + *len == *o2 => *len += l2,
        (
            Some(Piece::Held { file, off, len }),
            Piece::Held {
                file: f2,
                off: o2,
                len: l2,
            },
        ) if std::sync::Arc::ptr_eq(file, f2) && *off + *len == *o2 => *len += l2,
        _ => out.push(p),
    }
}

/// What a run of one layer becomes: a piece, or a range to take from below.
enum Step<'a> {
    Done(Piece<'a>),
    Below(u64, u64),
}

impl Image {
    /// Read `[off, off+len)` as pieces: what layers opened read-only hold as ranges of their
    /// files, zero runs as zeros, the rest (this layer's own data when it is writable,
    /// compressed clusters, what copy-on-read fetches) as bytes. One walk of the chain, as
    /// [`Image::read_sparse`].
    pub fn read_pieces(&self, off: u64, len: u64) -> Result<Vec<Piece<'_>>> {
        let mut out = Vec::new();
        self.pieces_into(off, len, &mut out, false)?;
        Ok(out)
    }

    /// [`Self::read_pieces`] when it needs nothing but memory and local files (no read
    /// filter, no storage reached over the network or opened on demand): `None` otherwise,
    /// having read nothing that matters. For answering a read at once, without handing it to
    /// another thread.
    pub fn read_pieces_local(&self, off: u64, len: u64) -> Result<Option<Vec<Piece<'_>>>> {
        let mut out = Vec::new();
        Ok(self.pieces_into(off, len, &mut out, true)?.then_some(out))
    }

    /// Appends the pieces of `[off, off+len)`; with `local`, gives up (false) at the first
    /// piece that would need more than memory and local files.
    fn pieces_into<'a>(
        &'a self,
        off: u64,
        len: u64,
        out: &mut Vec<Piece<'a>>,
        local: bool,
    ) -> Result<bool> {
        if local && (self.read_filter().is_some() || self.storage().file().is_none()) {
            return Ok(false);
        }
        // A layer that stands for a chain of its own (a lazily opened base) hands out its
        // own pieces, which keep open what they refer to.
        if let Some(pieces) = self.layer().pieces(off, len) {
            for p in pieces? {
                push(out, p);
            }
            return Ok(true);
        }
        if self.read_filter().is_some() {
            // Copy-on-read decides what it reads: as a sparse read does.
            let mut buf = vec![0u8; len as usize];
            let mut at = 0usize;
            for r in self.read_sparse(&mut buf, off)? {
                let n = r.len as usize;
                push(
                    out,
                    if r.zero {
                        Piece::Zero(r.len)
                    } else {
                        Piece::Bytes(buf[at..at + n].to_vec())
                    },
                );
                at += n;
            }
            return Ok(true);
        }
        let layer = self.layer();
        let file = if layer.stable() {
            layer.storage().file()
        } else {
            None
        };
        let steps = {
            let mapped = layer.map(off, len, MapMode::SPARSE)?;
            let mut steps = Vec::with_capacity(mapped.runs.len());
            for run in &mapped.runs {
                // Decoding stored data (decompressing a hoard's frames, reading its packs) is
                // worker's work, not the connection reader's.
                if local && run.map == Mapping::Stored {
                    return Ok(false);
                }
                // A layer's own buffers (decompressed frames), sent as they are.
                if let Some(parts) = (run.map == Mapping::Stored)
                    .then(|| layer.read_shared(run))
                    .flatten()
                {
                    for part in parts? {
                        steps.push(Step::Done(match part {
                            SharedPart::Zero(n) => Piece::Zero(n),
                            SharedPart::Bytes(buf, off, len) => Piece::Shared { buf, off, len },
                            SharedPart::Copied(b) => Piece::Bytes(b),
                        }));
                    }
                    continue;
                }
                steps.push(match (run.map, file) {
                    (Mapping::Unallocated, _) => Step::Below(run.off, run.len),
                    (Mapping::Zero { .. }, _) => Step::Done(Piece::Zero(run.len)),
                    (Mapping::Data { host }, Some(f)) => Step::Done(Piece::File {
                        file: f,
                        off: host,
                        len: run.len,
                    }),
                    _ => {
                        let mut b = vec![0u8; run.len as usize];
                        layer.read_run(&mut b, run)?;
                        Step::Done(Piece::Bytes(b))
                    }
                });
            }
            steps
            // The mapping's guard is let go before anything is read from below.
        };
        for s in steps {
            match s {
                Step::Done(p) => push(out, p),
                Step::Below(pos, n) => {
                    let have = match self.backing() {
                        Some(b) => b.virtual_size().saturating_sub(pos).min(n),
                        None => 0,
                    };
                    if let (Some(b), true) = (self.backing(), have > 0) {
                        if !b.pieces_into(pos, have, out, local)? {
                            return Ok(false);
                        }
                    }
                    // Past the end of what is below reads as zeros.
                    push(out, Piece::Zero(n - have));
                }
            }
        }
        Ok(true)
    }
}
