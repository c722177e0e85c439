//! The transmission phase of one connection: reading requests, serving them on the
//! connection's workers, and writing replies. See the module documentation of [`crate::nbd`].

use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

mod reads;

use super::export::Export;
use super::handshake::{handshake, violation};
use super::proto::*;
use super::reply::Reply;
use super::state::{lock, ExportSlot, Exports, Shared};
use crate::Error;
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};

/// Worker threads serving the requests of one connection.
pub const WORKERS_PER_CONNECTION: usize = 4;

/// The socket's send buffer during transmission (`SO_SNDBUF`; the kernel doubles it for its
/// bookkeeping).
const SEND_BUFFER: usize = 4 << 20;

/// Buffer of the reading side of a connection.
const READ_BUFFER: usize = 256 << 10;

/// What a request holds of a connection's reply budget besides its data: headers, an error
/// message.
const REPLY_OVERHEAD: usize = 1 << 10;

/// What a block status request holds of the reply budget (its reply is a list of extents).
const BLOCK_STATUS_RESERVE: usize = 64 << 10;

/// How often a request waiting for reply budget looks whether its connection is ending.
const BUDGET_POLL: Duration = Duration::from_millis(50);

/// Handshake, then transmission, on one accepted connection.
pub(super) fn serve_connection(stream: UnixStream, exports: &Exports, shared: &Arc<Shared>) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let limits = shared.limits;
    let deadline = Instant::now() + limits.handshake_timeout;
    // A client that does not read its option replies must not hold us past the deadline
    // either (the descriptors share one socket, so this covers both halves).
    let _ = write_half.set_write_timeout(Some(limits.handshake_timeout.max(MIN_TIMEOUT)));
    let mut reader = BufReader::with_capacity(
        READ_BUFFER,
        Incoming {
            stream,
            deadline: Some(deadline),
        },
    );
    let writer = Mutex::new(write_half);
    if let Ok(Some(neg)) = handshake(&mut reader, &writer, exports, shared) {
        reader.get_mut().deadline = None;
        let reset = (
            reader.get_ref().stream.set_read_timeout(None),
            lock(&writer).set_write_timeout(None),
        );
        // A kernel send buffer that holds several replies lets workers finish sending and go
        // on decoding while the client reads (the default, about 200 KiB, is less than one
        // 256 KiB read: a sequential read through a hoarded cache took 1.4x as long, a copy
        // of a warm chain twice as long). Best effort: beyond net.core.wmem_max (the default
        // is 208 KiB) only with CAP_NET_ADMIN (a server run as root), else clamped to it.
        {
            let w = lock(&writer);
            if setsockopt(&*w, sockopt::SndBufForce, &SEND_BUFFER).is_err() {
                let _ = setsockopt(&*w, sockopt::SndBuf, &SEND_BUFFER);
            }
        }
        if let (Ok(()), Ok(()), false) = (reset.0, reset.1, shared.stopping()) {
            let conn = Connection {
                export: neg.export,
                structured: neg.structured,
                base_allocation: neg.base_allocation,
                _slot: neg.slot,
                writer,
                shared,
                dead: AtomicBool::new(false),
                budget: Budget {
                    used: Mutex::new(0),
                    freed: Condvar::new(),
                    cap: limits.max_queued_reply_bytes,
                },
            };
            conn.transmission(&mut reader);
            let _ = lock(&conn.writer).shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    let _ = lock(&writer).shutdown(std::net::Shutdown::Both);
}

/// The shortest socket timeout set (a zero timeout means none to the kernel).
const MIN_TIMEOUT: Duration = Duration::from_millis(1);

/// The reading side of a connection. While `deadline` is set (during the handshake) every
/// read waits at most until then, however the client trickles its bytes.
struct Incoming {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timeout"));
            }
            self.stream.set_read_timeout(Some(left.max(MIN_TIMEOUT)))?;
        }
        self.stream.read(buf)
    }
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A request handed to a worker, with its payload for writes (`None` when the payload was
/// too large and has been skipped), and its share of the reply budget.
struct Job<'a> {
    req: Request,
    payload: Option<Vec<u8>>,
    _held: Held<'a>,
}

/// The bytes of replies (and write payloads) a connection may hold at once
/// ([`super::state::Limits::max_queued_reply_bytes`]).
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    cap: usize,
}

/// A share of a [`Budget`], given back on drop.
struct Held<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Budget {
    /// Waits until `bytes` more fit (a request larger than the whole budget waits until
    /// nothing else is held) and takes them; `None` if `give_up` says so first.
    fn take(&self, bytes: usize, give_up: impl Fn() -> bool) -> Option<Held<'_>> {
        let bytes = bytes.min(self.cap);
        let mut used = lock(&self.used);
        while *used + bytes > self.cap {
            if give_up() {
                return None;
            }
            used = self
                .freed
                .wait_timeout(used, BUDGET_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *used += bytes;
        Some(Held {
            budget: self,
            bytes,
        })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut used = lock(&self.budget.used);
        *used = used.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

/// The transmission phase of one connection.
struct Connection<'a> {
    export: Arc<dyn Export>,
    structured: bool,
    base_allocation: bool,
    /// Counts this connection against its export's limit until it ends.
    _slot: ExportSlot,
    writer: Mutex<UnixStream>,
    shared: &'a Shared,
    /// The client is gone (a reply could not be written): requests not started are dropped.
    dead: AtomicBool,
    budget: Budget,
}

/// Closes the connection if its worker panics: the other workers, blocked reading
/// requests, must not keep the connection (and the server's panic report) waiting.
struct PanicCloses<'a, 'b>(&'a Connection<'b>);

impl Drop for PanicCloses<'_, '_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.dead.store(true, Ordering::Release);
            let _ = lock(&self.0.writer).shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A refused or failed request: NBD error number and a message for humans.
type Failure = (u32, String);

impl Connection<'_> {
    /// Whether requests read but not started should be dropped: the client is gone or the
    /// server is stopping.
    fn ending(&self) -> bool {
        self.dead.load(Ordering::Acquire) || self.shared.stopping()
    }

    /// Serves requests until the client disconnects, the socket fails, the client violates
    /// the protocol or the server stops. Requests read are answered, unless the client is
    /// gone or the server stops first: then those not started are dropped.
    ///
    /// Leader/follower: each worker takes the reader in turn, reads one request, lets go of
    /// the reader, serves the request and writes its reply whole under the writer lock. No
    /// request changes threads, and up to `WORKERS_PER_CONNECTION` requests are served at
    /// once. A small read the export answers from memory and page-cached local files is
    /// answered by the reader's holder without letting go of the reader, so a queue of such
    /// reads wakes no other thread. The reply budget is taken before
    /// a request's payload is read and given back once its reply is written: a client that
    /// does not read its replies stops being read from.
    fn transmission<R: Read + Send>(&self, r: &mut R) {
        let reader = Mutex::new(r);
        let done = AtomicBool::new(false);
        thread::scope(|scope| {
            for _ in 0..WORKERS_PER_CONNECTION {
                scope.spawn(|| {
                    let _closes = PanicCloses(self);
                    self.work(&reader, &done);
                });
            }
        });
    }

    /// One worker's loop (see [`Connection::transmission`]).
    fn work<R: Read>(&self, reader: &Mutex<&mut R>, done: &AtomicBool) {
        'serve: loop {
            let job = {
                let mut r = lock(reader);
                loop {
                    if done.load(Ordering::Acquire) || self.ending() {
                        break 'serve;
                    }
                    let job = match self.next_job(&mut **r) {
                        Ok(Some(job)) => job,
                        _ => {
                            done.store(true, Ordering::Release);
                            break 'serve;
                        }
                    };
                    // A read the export answers from memory and local files is answered
                    // here, keeping the reader: no other thread is woken for it.
                    match self.read_local(&job.req) {
                        Some(reply) => self.send(&reply),
                        None => break job,
                    }
                }
            };
            if self.ending() {
                break;
            }
            let reply = self.serve(&job.req, job.payload);
            self.send(&reply);
        }
    }

    /// Write a reply whole under the writer lock.
    fn send(&self, reply: &Reply<'_>) {
        let mut w = lock(&self.writer);
        if reply.write_to(&mut w).is_err() {
            // The client is gone: drop what is queued and make the reader notice.
            self.dead.store(true, Ordering::Release);
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The share of the reply budget a request holds while it is served and answered.
    fn cost(req: &Request) -> usize {
        let data = match req.typ {
            CMD_READ | CMD_WRITE if req.length <= MAX_PAYLOAD => req.length as usize,
            CMD_BLOCK_STATUS => BLOCK_STATUS_RESERVE,
            _ => 0,
        };
        data + REPLY_OVERHEAD
    }

    /// The next request to serve; `Ok(None)` on `NBD_CMD_DISC`, or when the connection ends
    /// while the request waits for reply budget.
    fn next_job(&self, r: &mut impl Read) -> io::Result<Option<Job<'_>>> {
        let mut hdr = [0u8; REQUEST_LEN];
        r.read_exact(&mut hdr)?;
        let req = Request::decode(&hdr).ok_or_else(|| violation("bad request magic"))?;
        if req.typ == CMD_DISC {
            return Ok(None);
        }
        let Some(held) = self.budget.take(Self::cost(&req), || self.ending()) else {
            return Ok(None);
        };
        let payload = match req.typ {
            CMD_WRITE if req.length <= MAX_PAYLOAD => {
                let mut buf = vec![0u8; req.length as usize];
                r.read_exact(&mut buf)?;
                Some(buf)
            }
            CMD_WRITE => {
                let skipped = io::copy(&mut r.take(u64::from(req.length)), &mut io::sink())?;
                if skipped != u64::from(req.length) {
                    return Err(violation("truncated write payload"));
                }
                None
            }
            _ => None,
        };
        Ok(Some(Job {
            req,
            payload,
            _held: held,
        }))
    }

    /// The complete reply to one request.
    fn serve(&self, req: &Request, payload: Option<Vec<u8>>) -> Reply<'_> {
        if req.typ == CMD_READ && self.check(req).is_ok() {
            if let Some(r) = self.read_zero_copy(req) {
                return r;
            }
        }
        Reply::bytes(self.serve_bytes(req, payload))
    }

    /// The complete reply to one request, in memory.
    fn serve_bytes(&self, req: &Request, payload: Option<Vec<u8>>) -> Vec<u8> {
        if let Err((errno, msg)) = self.check(req) {
            return self.error_reply(req, errno, &msg);
        }
        let (off, len) = (req.offset, u64::from(req.length));
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let export = &*self.export;
        let done = match req.typ {
            CMD_READ => return self.read(req),
            CMD_BLOCK_STATUS => return self.block_status(req),
            CMD_WRITE => match payload {
                Some(buf) => export.write(&buf, off, fua),
                None => {
                    let msg = format!("write of {len} bytes exceeds the {MAX_PAYLOAD} limit");
                    return self.error_reply(req, EINVAL, &msg);
                }
            },
            CMD_FLUSH => export.flush(),
            CMD_TRIM => export
                .trim(off, len)
                .and_then(|()| if fua { export.flush() } else { Ok(()) }),
            CMD_WRITE_ZEROES => export
                .write_zeroes(off, len, req.flags & CMD_FLAG_NO_HOLE == 0)
                .and_then(|()| if fua { export.flush() } else { Ok(()) }),
            _ => unreachable!("check() refuses unknown commands"),
        };
        match done {
            Ok(()) => simple_reply(0, req.cookie).to_vec(),
            Err(e) => self.error_reply(req, errno(&e), &e.to_string()),
        }
    }

    /// Validates flags, permissions and range of a request.
    fn check(&self, req: &Request) -> std::result::Result<(), Failure> {
        let allowed = match req.typ {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            t => return Err((EINVAL, format!("unknown command {t}"))),
        };
        if req.flags & !allowed != 0 {
            return Err((
                EINVAL,
                format!("flags {:#x} not valid for command {}", req.flags, req.typ),
            ));
        }
        let writes = matches!(req.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && self.export.read_only() {
            return Err((EPERM, "the export is read-only".to_string()));
        }
        if req.typ == CMD_READ && req.length > MAX_PAYLOAD {
            let errno = if req.flags & CMD_FLAG_DF != 0 {
                EOVERFLOW
            } else {
                EINVAL
            };
            let msg = format!(
                "read of {} bytes exceeds the {MAX_PAYLOAD} limit",
                req.length
            );
            return Err((errno, msg));
        }
        if req.typ == CMD_FLUSH {
            return Ok(());
        }
        let size = self.export.size();
        match req.offset.checked_add(u64::from(req.length)) {
            Some(end) if end <= size => {}
            _ => {
                let msg = format!(
                    "request {}+{} beyond the end of the export ({size} bytes)",
                    req.offset, req.length
                );
                return Err((if writes { ENOSPC } else { EINVAL }, msg));
            }
        }
        if req.typ == CMD_BLOCK_STATUS {
            if !self.base_allocation {
                return Err((EINVAL, "no metadata context was negotiated".to_string()));
            }
            if req.length == 0 {
                return Err((EINVAL, "block status of 0 bytes".to_string()));
            }
        }
        Ok(())
    }

    /// An error reply: a structured error chunk (with the message) when structured replies
    /// were negotiated, a simple reply otherwise.
    fn error_reply(&self, req: &Request, errno: u32, msg: &str) -> Vec<u8> {
        if self.structured {
            error_chunk(req.cookie, errno, msg)
        } else {
            simple_reply(errno, req.cookie).to_vec()
        }
    }
}

/// The NBD error number for a vmicache error: a request out of range or refused is `EINVAL`
/// (`EOVERFLOW` is only for structured replies too large), a write to something read-only
/// or locked `EPERM`, an I/O error the NBD error of its cause, anything else `EIO`.
fn errno(e: &Error) -> u32 {
    match e {
        Error::Io { source, .. } => io_errno(source),
        Error::OutOfRange { .. } | Error::Refused { .. } => EINVAL,
        Error::ReadOnly { .. } | Error::Locked { .. } => EPERM,
        _ => EIO,
    }
}

fn io_errno(e: &io::Error) -> u32 {
    use io::ErrorKind as K;
    if let Some(raw) = e.raw_os_error() {
        return os_errno(Errno::from_raw(raw));
    }
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => EPERM,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => ENOSPC,
        K::InvalidInput => EINVAL,
        _ => EIO,
    }
}

/// The NBD error number for an operating-system error: permission and read-only errors are
/// `EPERM`, out-of-space ones `ENOSPC`, `EINVAL` stays, everything else is `EIO`.
fn os_errno(e: Errno) -> u32 {
    match e {
        Errno::EPERM | Errno::EACCES | Errno::EROFS => EPERM,
        Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG => ENOSPC,
        Errno::EINVAL => EINVAL,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_nbd_numbers() {
        let io = |k| Error::io("x", "write", io::Error::from(k));
        assert_eq!(errno(&io(io::ErrorKind::PermissionDenied)), EPERM);
        assert_eq!(errno(&io(io::ErrorKind::StorageFull)), ENOSPC);
        assert_eq!(errno(&io(io::ErrorKind::UnexpectedEof)), EIO);
        let os = |e: Errno| Error::io("x", "write", io::Error::from(e));
        assert_eq!(errno(&os(Errno::ENOSPC)), ENOSPC);
        assert_eq!(errno(&os(Errno::EDQUOT)), ENOSPC);
        assert_eq!(errno(&os(Errno::EROFS)), EPERM);
        assert_eq!(errno(&os(Errno::EINVAL)), EINVAL);
        assert_eq!(errno(&os(Errno::ENOENT)), EIO);
        assert_eq!(errno(&Error::out_of_range("x", "beyond the end")), EINVAL);
        assert_eq!(errno(&Error::read_only("x", "open read-only")), EPERM);
        assert_eq!(errno(&Error::refused("x", "unaligned")), EINVAL);
        assert_eq!(errno(&Error::request("x", "refused")), EINVAL);
        assert_eq!(errno(&Error::corrupt("x", "bad L2")), EIO);
    }
}
