//! Answering reads and block status: zero-copy pieces (inline when small and cached), the
//! byte path with hole chunks, and `base:allocation` extents.

use super::{errno, Connection};
use crate::engine::image::SparseRun;
use crate::engine::Piece;
use crate::nbd::proto::*;
use crate::nbd::reply::{all_resident, settle, Reply};
use crate::Error;

/// Reads up to this size that the export answers from memory and local files are answered
/// by the thread that read them (no hand-off to a worker: at queue depth 16 of 64 KiB reads,
/// about a fifth less time per request); larger ones are worth the workers' parallel sends.
const INLINE_READ_MAX: u32 = 128 << 10;

impl Connection<'_> {
    /// The reply to a small valid read the export answers from memory and local files alone
    /// (larger reads go to the workers, whose sends overlap).
    pub(super) fn read_local(&self, req: &Request) -> Option<Reply<'_>> {
        if req.typ != CMD_READ
            || req.length == 0
            || req.length > INLINE_READ_MAX
            || self.check(req).is_err()
        {
            return None;
        }
        let pieces = self
            .export
            .read_pieces_local(req.offset, u64::from(req.length))
            .ok()??;
        // What is not in the page cache is read by a worker, not here.
        if !all_resident(&pieces) {
            return None;
        }
        self.pieces_reply(req, pieces)
    }

    /// The reply to `req` from its pieces (`None` if they do not cover it exactly).
    fn pieces_reply<'a>(&self, req: &Request, pieces: Vec<Piece<'a>>) -> Option<Reply<'a>> {
        if pieces.iter().map(|p| p.len()).sum::<u64>() != u64::from(req.length) {
            return None;
        }
        let fragment = self.structured && req.flags & CMD_FLAG_DF == 0;
        Some(Reply::read(
            req.cookie,
            req.offset,
            pieces,
            self.structured,
            fragment,
        ))
    }

    /// A read answered from the export's pieces, when it gives them (`None`: it does not).
    pub(super) fn read_zero_copy(&self, req: &Request) -> Option<Reply<'_>> {
        if req.length == 0 {
            return None;
        }
        // File ranges not in the page cache are read here, outside the writer lock.
        let read = self
            .export
            .read_pieces(req.offset, u64::from(req.length))
            .and_then(|p| match p {
                Some(p) => settle(p)
                    .map(Some)
                    .map_err(|e| Error::io(format!("export at {:#x}", req.offset), "read", e)),
                None => Ok(None),
            });
        let pieces = match read {
            Ok(p) => p?,
            Err(e) => {
                return Some(Reply::bytes(self.error_reply(
                    req,
                    errno(&e),
                    &e.to_string(),
                )))
            }
        };
        self.pieces_reply(req, pieces)
    }

    /// A read's reply: the data follows the simple reply header or, with structured replies,
    /// forms a single final `OFFSET_DATA` chunk; with structured replies and without `DF`,
    /// runs the export knows to be zero go as `OFFSET_HOLE` chunks instead, as qemu-nbd does.
    pub(super) fn read(&self, req: &Request) -> Vec<u8> {
        let len = req.length as usize;
        if self.structured && len == 0 {
            return chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0).to_vec();
        }
        let sparse = self.structured && req.flags & CMD_FLAG_DF == 0;
        let head = if self.structured {
            CHUNK_HEADER_LEN + 8
        } else {
            SIMPLE_REPLY_LEN
        };
        let mut out = vec![0u8; head + len];
        let read = if sparse {
            self.export.read_sparse(&mut out[head..], req.offset)
        } else {
            self.export
                .read(&mut out[head..], req.offset)
                .map(|()| Vec::new())
        };
        let runs = match read {
            Ok(runs) => runs,
            Err(e) => return self.error_reply(req, errno(&e), &e.to_string()),
        };
        if Self::has_holes(&runs, req.length) {
            return Self::sparse_reply(req, &runs, &out[head..]);
        }
        if self.structured {
            out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                (len + 8) as u32,
            ));
            out[CHUNK_HEADER_LEN..head].copy_from_slice(&req.offset.to_be_bytes());
        } else {
            out[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(0, req.cookie));
        }
        out
    }

    /// Whether `runs` describe a read of `len` bytes exactly and hold a zero run (otherwise
    /// the read goes as one data chunk).
    fn has_holes(runs: &[SparseRun], len: u32) -> bool {
        runs.iter().any(|r| r.zero)
            && runs.iter().all(|r| r.len > 0)
            && runs.iter().map(|r| r.len).sum::<u64>() == u64::from(len)
    }

    /// A read's reply as consecutive chunks in offset order: `OFFSET_HOLE` for each zero run,
    /// `OFFSET_DATA` for each other run (from `data`, the bytes read); the last one is
    /// flagged done.
    fn sparse_reply(req: &Request, runs: &[SparseRun], data: &[u8]) -> Vec<u8> {
        const HOLE_LEN: usize = 12;
        let bytes: u64 = runs.iter().filter(|r| !r.zero).map(|r| r.len + 8).sum();
        let mut out =
            Vec::with_capacity(runs.len() * (CHUNK_HEADER_LEN + HOLE_LEN) + bytes as usize);
        let mut pos = 0usize;
        for (i, &SparseRun { len: n, zero }) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let at = req.offset + pos as u64;
            // Every run is at most req.length long: lengths fit in u32.
            if zero {
                let h = chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, HOLE_LEN as u32);
                out.extend_from_slice(&h);
                out.extend_from_slice(&at.to_be_bytes());
                out.extend_from_slice(&(n as u32).to_be_bytes());
            } else {
                let h = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req.cookie, n as u32 + 8);
                out.extend_from_slice(&h);
                out.extend_from_slice(&at.to_be_bytes());
                out.extend_from_slice(&data[pos..pos + n as usize]);
            }
            pos += n as usize;
        }
        out
    }

    /// A `base:allocation` block status reply: the export's extents clipped to the request,
    /// merged when their flags are equal, and only the first with `REQ_ONE`.
    pub(super) fn block_status(&self, req: &Request) -> Vec<u8> {
        let len = u64::from(req.length);
        let extents = match self.export.block_status(req.offset, len) {
            Ok(e) => e,
            Err(e) => return self.error_reply(req, errno(&e), &e.to_string()),
        };
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut covered = 0u64;
        for (l, f) in extents {
            let l = l.min(len - covered);
            if l == 0 {
                continue;
            }
            let f = f & (STATE_HOLE | STATE_ZERO);
            // Lengths fit in u32: their sum never exceeds req.length.
            match out.last_mut() {
                Some(last) if last.1 == f => last.0 += l as u32,
                _ => out.push((l as u32, f)),
            }
            covered += l;
            if covered == len {
                break;
            }
        }
        if out.is_empty() {
            // Nothing known: "allocated, contents unknown" is always a safe answer.
            out.push((req.length, 0));
        }
        if req.flags & CMD_FLAG_REQ_ONE != 0 {
            out.truncate(1);
        }
        block_status_chunk(req.cookie, CONTEXT_ID_BASE_ALLOCATION, &out)
    }
}
