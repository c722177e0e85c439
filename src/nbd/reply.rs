//! Replies as the parts they are written in: bytes, ranges of files sent with `sendfile(2)`
//! (no copy through memory: the kernel hands page-cache pages to the socket), and zeros. A
//! read whose export gives pieces ([`Export::read_pieces`]) is answered this way; the parts
//! of one reply are written in order under the connection's writer lock.
//!
//! Only file ranges already in the page cache are sent by `sendfile` ([`resident`]): under
//! the writer lock, a disk read would hold up every other reply of the connection. The rest
//! is read into memory first, by the worker, in parallel with the others ([`settle`]).
//!
//! [`Export::read_pieces`]: super::export::Export::read_pieces

use super::proto::*;
use crate::engine::storage::resident;
use crate::engine::Piece;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

/// Header buffers grow to this size at most (data is never appended to them).
const HEADERS_MAX: usize = 512;

/// One part of a reply.
pub(super) enum Part<'a> {
    Bytes(Vec<u8>),
    /// A slice of a buffer a layer keeps.
    Shared(std::sync::Arc<Vec<u8>>, usize, usize),
    /// A range of a file the part keeps open (a lazily opened base's).
    HeldFile(std::sync::Arc<File>, u64, u64),
    File {
        file: &'a File,
        off: u64,
        len: u64,
    },
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
    /// Append header bytes: to the last part when that is a small buffer of headers (data
    /// read into memory is never copied to join them; the vectored write gathers them).
    fn push_bytes(&mut self, b: &[u8]) {
        match self.parts.last_mut() {
            Some(Part::Bytes(v)) if v.len() + b.len() <= HEADERS_MAX => v.extend_from_slice(b),
            _ => self.parts.push(Part::Bytes(b.to_vec())),
        }
    }
    fn push_piece(&mut self, p: Piece<'a>) {
        match p {
            // Written with the header before it in one vectored write, never copied.
            Piece::Bytes(b) => self.parts.push(Part::Bytes(b)),
            Piece::File { file, off, len } => self.parts.push(Part::File { file, off, len }),
            Piece::Zero(n) => self.parts.push(Part::Zeros(n)),
            Piece::Shared { buf, off, len } => self.parts.push(Part::Shared(buf, off, len)),
            Piece::Held { file, off, len } => self.parts.push(Part::HeldFile(file, off, len)),
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
                Part::Bytes(_) | Part::Shared(..) => {
                    let mut bufs = Vec::new();
                    loop {
                        match self.parts.get(i) {
                            Some(Part::Bytes(b)) => bufs.push(&b[..]),
                            Some(Part::Shared(b, off, len)) => bufs.push(&b[*off..*off + *len]),
                            _ => break,
                        }
                        i += 1;
                    }
                    write_all_vectored(w, &bufs)?;
                    continue;
                }
                Part::Zeros(n) => write_zeros(w, *n)?,
                Part::File { file, off, len } => send_file(w, file, *off, *len)?,
                Part::HeldFile(file, off, len) => send_file(w, file, *off, *len)?,
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
/// under us), zeros stand for the rest, as reads past the end of a file give. Should
/// `sendfile` fail on the file's side (a file system without it, a disk error), the rest is
/// read and written: the reply goes out whole, or the connection is closed by the caller.
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
            Err(e @ (Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN | Errno::EAGAIN)) => {
                return Err(e.into())
            }
            Err(_) => {
                let b = read_file(file, pos as u64, left)?;
                return w.write_all(&b);
            }
        }
    }
    Ok(())
}

/// `len` bytes of `file` at `off` read into memory (zeros past its end).
fn read_file(file: &File, off: u64, len: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len as usize];
    let mut done = 0;
    while done < b.len() {
        match file.read_at(&mut b[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(b)
}

/// Pieces whose file ranges are not all in the page cache read into memory now (by the
/// worker, outside the writer lock). A lazily opened base's pieces ([`Piece::Held`]) are not
/// asked again: the base made them of ranges it had just found in the page cache.
pub(super) fn settle(pieces: Vec<Piece<'_>>) -> io::Result<Vec<Piece<'_>>> {
    pieces
        .into_iter()
        .map(|p| match p {
            Piece::File { file, off, len } if !resident(file, off, len) => {
                read_file(file, off, len).map(Piece::Bytes)
            }
            p => Ok(p),
        })
        .collect()
}

/// Whether every file range of `pieces` is in the page cache.
pub(super) fn all_resident(pieces: &[Piece<'_>]) -> bool {
    pieces.iter().all(|p| match p {
        Piece::File { file, off, len } => resident(file, *off, *len),
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residency_follows_the_page_cache() {
        // On the crate's own file system (a tmpfs keeps every page).
        let mut f = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        assert!(resident(&f, 0, 1 << 20));
        nix::fcntl::posix_fadvise(
            &f,
            0,
            1 << 20,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(!resident(&f, 0, 1 << 20));
        assert_eq!(read_file(&f, 4096, 8192).unwrap(), vec![7u8; 8192]);
        assert!(resident(&f, 4096, 8192));
        // Past the end reads as zeros.
        assert_eq!(read_file(&f, (1 << 20) - 2, 4).unwrap(), vec![7, 7, 0, 0]);
    }
}
