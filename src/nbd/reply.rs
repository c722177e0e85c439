//! Replies as the parts they are written in: bytes, ranges of files sent with `sendfile(2)`
//! (no copy through memory: the kernel hands page-cache pages to the socket), and zeros. A
//! read whose export gives pieces ([`Export::read_pieces`]) is answered this way; the parts
//! of one reply are written in order under the connection's writer lock.
//!
//! [`Export::read_pieces`]: super::export::Export::read_pieces

use super::proto::*;
use crate::engine::Piece;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

/// One part of a reply.
pub(super) enum Part<'a> {
    Bytes(Vec<u8>),
    File { file: &'a File, off: u64, len: u64 },
    Zeros(u64),
}

/// A reply under construction: consecutive small byte parts share one buffer.
#[derive(Default)]
pub(super) struct Reply<'a> {
    pub(super) parts: Vec<Part<'a>>,
}

impl<'a> Reply<'a> {
    pub(super) fn bytes(b: Vec<u8>) -> Reply<'a> {
        Reply {
            parts: vec![Part::Bytes(b)],
        }
    }
    fn push_bytes(&mut self, b: &[u8]) {
        match self.parts.last_mut() {
            Some(Part::Bytes(v)) => v.extend_from_slice(b),
            _ => self.parts.push(Part::Bytes(b.to_vec())),
        }
    }
    fn push_piece(&mut self, p: Piece<'a>) {
        match p {
            // Written with the header before it in one vectored write, never copied.
            Piece::Bytes(b) => self.parts.push(Part::Bytes(b)),
            Piece::File { file, off, len } => self.parts.push(Part::File { file, off, len }),
            Piece::Zero(n) => self.parts.push(Part::Zeros(n)),
        }
    }

    /// The reply to a read of `len` bytes at `offset` (cookie `cookie`) from `pieces`:
    /// with `fragment` (structured replies, no `DF` flag) one chunk per piece, zero runs as
    /// `OFFSET_HOLE`; otherwise one data chunk (structured) or a simple reply, zeros written.
    pub(super) fn read(
        cookie: u64,
        offset: u64,
        pieces: Vec<Piece<'a>>,
        structured: bool,
        fragment: bool,
    ) -> Reply<'a> {
        let mut r = Reply::default();
        let len: u64 = pieces.iter().map(Piece::len).sum();
        if !fragment {
            if structured {
                // The request's length fits in u32, so does this.
                let h = chunk_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    len as u32 + 8,
                );
                r.push_bytes(&h);
                r.push_bytes(&offset.to_be_bytes());
            } else {
                r.push_bytes(&simple_reply(0, cookie));
            }
            for p in pieces {
                r.push_piece(p);
            }
            return r;
        }
        let n = pieces.len();
        let mut at = offset;
        for (i, p) in pieces.into_iter().enumerate() {
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let plen = p.len();
            if let Piece::Zero(z) = p {
                const HOLE_LEN: u32 = 12;
                r.push_bytes(&chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    cookie,
                    HOLE_LEN,
                ));
                r.push_bytes(&at.to_be_bytes());
                r.push_bytes(&(z as u32).to_be_bytes());
            } else {
                let h = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, plen as u32 + 8);
                r.push_bytes(&h);
                r.push_bytes(&at.to_be_bytes());
                r.push_piece(p);
            }
            at += plen;
        }
        r
    }

    /// Write the whole reply to `w`: consecutive byte parts in one vectored write.
    pub(super) fn write_to(&self, w: &mut UnixStream) -> io::Result<()> {
        let mut i = 0;
        while i < self.parts.len() {
            match &self.parts[i] {
                Part::Bytes(_) => {
                    let mut bufs = Vec::new();
                    while let Some(Part::Bytes(b)) = self.parts.get(i) {
                        bufs.push(&b[..]);
                        i += 1;
                    }
                    write_all_vectored(w, &bufs)?;
                    continue;
                }
                Part::Zeros(n) => write_zeros(w, *n)?,
                Part::File { file, off, len } => send_file(w, file, *off, *len)?,
            }
            i += 1;
        }
        Ok(())
    }
}

/// All of `bufs`, in order, with as few `writev` calls as the socket takes.
fn write_all_vectored(w: &mut UnixStream, bufs: &[&[u8]]) -> io::Result<()> {
    let (mut i, mut at) = (0, 0);
    while i < bufs.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&bufs[i][at..])
            .chain(bufs[i + 1..].iter().copied())
            .map(io::IoSlice::new)
            .collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while i < bufs.len() && n >= bufs[i].len() - at {
            n -= bufs[i].len() - at;
            i += 1;
            at = 0;
        }
        at += n;
    }
    Ok(())
}

fn write_zeros(w: &mut UnixStream, mut n: u64) -> io::Result<()> {
    static ZEROS: [u8; 65536] = [0; 65536];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// `len` bytes of `file` at `off` to the socket; should the file end early (a base cut short
/// under us), zeros stand for the rest, as reads past the end of a file give.
fn send_file(w: &mut UnixStream, file: &File, off: u64, len: u64) -> io::Result<()> {
    use nix::errno::Errno;
    let mut pos = off as i64;
    let mut left = len;
    while left > 0 {
        let k = left.min(1 << 30) as usize;
        match nix::sys::sendfile::sendfile64(&*w, file, Some(&mut pos), k) {
            Ok(0) => return write_zeros(w, left),
            Ok(n) => left -= n as u64,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
