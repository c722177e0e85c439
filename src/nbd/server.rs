//! The server: listening socket, per-connection handshake, and the transmission phase with
//! its worker pool. See the module documentation of [`crate::nbd`] for the protocol subset.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::proto::*;
use super::Export;
use crate::{Error, Result};

/// Worker threads serving the requests of one connection.
pub const WORKERS_PER_CONNECTION: usize = 4;

/// How long [`Server::run`] waits, once stopped, for connections to finish their requests
/// before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Buffer of the reading side of a connection.
const READ_BUFFER: usize = 256 << 10;

type Exports = Arc<Vec<(String, Arc<dyn Export>)>>;

/// State shared by the server, its stoppers and its connection threads.
struct Shared {
    stopping: AtomicBool,
    path: PathBuf,
    /// A second handle on the listening socket: shutting it down wakes `accept()` even when
    /// the socket file is gone (so stop never depends on the path).
    listener: UnixListener,
    conns: Mutex<Conns>,
    /// Signalled whenever a connection ends.
    conn_ended: Condvar,
}

/// Open connections, kept so that a stop can shut their sockets down.
#[derive(Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, UnixStream>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        lock(&self.conns)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An NBD server listening on a Unix socket.
pub struct Server {
    listener: UnixListener,
    exports: Exports,
    shared: Arc<Shared>,
    /// Device and inode of the socket file we created: it is removed only while it is ours.
    ident: Option<(u64, u64)>,
}

/// Stops a running [`Server`]; cheap to clone and send to other threads (or signal handlers'
/// helper threads).
#[derive(Clone)]
pub struct Stopper {
    shared: Arc<Shared>,
}

impl Stopper {
    /// Makes [`Server::run`] return: it stops accepting, removes the socket file, lets the
    /// open connections answer the requests they have read, and closes them. Calling it
    /// again, or before `run`, is harmless (a later `run` returns at once).
    ///
    /// `run` is woken by shutting the listening socket down (and, belt and braces, by a
    /// connection to the socket path).
    pub fn stop(&self) {
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.shared.listener),
                nix::sys::socket::Shutdown::Both,
            );
            let _ = UnixStream::connect(&self.shared.path);
        }
    }
}

fn socket_ident(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_socket())
        .map(|m| (m.dev(), m.ino()))
}

impl Server {
    /// Creates the socket at `socket` and prepares to serve `exports` (name, export).
    ///
    /// The socket file must not exist, or be a stale socket nobody listens on (it is then
    /// replaced). An empty name is allowed and names the default export; without one, the
    /// first export is the default.
    pub fn bind(socket: &Path, exports: Vec<(String, Arc<dyn Export>)>) -> Result<Server> {
        if exports.is_empty() {
            return Err(Error::request(socket, "NBD server: no export to serve"));
        }
        for (i, (name, _)) in exports.iter().enumerate() {
            if name.len() > MAX_STRING || name.contains('\0') {
                return Err(Error::request(socket, format!("bad export name {name:?}")));
            }
            if exports[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::request(
                    socket,
                    format!("export name {name:?} given twice"),
                ));
            }
        }
        match std::fs::symlink_metadata(socket) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(socket) {
                Ok(_) => {
                    return Err(Error::io(
                        socket,
                        "bind",
                        io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another server is listening on this socket",
                        ),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(socket)
                        .map_err(|e| Error::io(socket, "remove stale socket", e))?;
                }
                Err(e) => return Err(Error::io(socket, "probe existing socket", e)),
            },
            Ok(_) => {
                return Err(Error::io(
                    socket,
                    "bind",
                    io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(socket, "stat", e)),
        }
        let listener = UnixListener::bind(socket).map_err(|e| Error::io(socket, "bind", e))?;
        let second = listener
            .try_clone()
            .map_err(|e| Error::io(socket, "dup", e))?;
        Ok(Server {
            listener,
            exports: Arc::new(exports),
            shared: Arc::new(Shared {
                stopping: AtomicBool::new(false),
                path: socket.to_path_buf(),
                listener: second,
                conns: Mutex::new(Conns::default()),
                conn_ended: Condvar::new(),
            }),
            ident: socket_ident(socket),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> Stopper {
        Stopper {
            shared: self.shared.clone(),
        }
    }

    /// Serves connections, each on its own thread, until [`Stopper::stop`]; then removes
    /// the socket file and ends the connections (see [`Stopper::stop`]) before returning.
    pub fn run(&self) -> Result<()> {
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        while !self.shared.stopping() {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if self.shared.stopping() => break,
                Err(_) => {
                    // Out of descriptors and the like: retry rather than spin.
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            if self.shared.stopping() {
                break;
            }
            threads.retain(|t| !t.is_finished());
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            let id = {
                let mut conns = self.shared.conns();
                conns.next_id += 1;
                let id = conns.next_id;
                conns.open.insert(id, clone);
                id
            };
            let exports = self.exports.clone();
            let shared = self.shared.clone();
            let spawned = thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    let _registered = Registration {
                        shared: &shared,
                        id,
                    };
                    serve_connection(stream, &exports, &shared);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(_) => {
                    if let Some(s) = self.shared.conns().open.remove(&id) {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        }
        self.remove_socket();
        self.close_connections();
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Ends the reading side of every connection, waits up to [`SHUTDOWN_GRACE`] for them
    /// to answer what they have read, then closes what remains.
    fn close_connections(&self) {
        let mut conns = self.shared.conns();
        for s in conns.open.values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !conns.open.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            conns = self
                .shared
                .conn_ended
                .wait_timeout(conns, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        for s in conns.open.values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn remove_socket(&self) {
        if self.ident.is_some() && socket_ident(&self.shared.path) == self.ident {
            let _ = std::fs::remove_file(&self.shared.path);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.remove_socket();
    }
}

/// Removes a connection from [`Conns`] when its thread ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.conns().open.remove(&self.id);
        self.shared.conn_ended.notify_all();
    }
}

// ---------------------------------------------------------------------------
// One connection
// ---------------------------------------------------------------------------

/// What the handshake settled.
struct Negotiated {
    export: Arc<dyn Export>,
    structured: bool,
    base_allocation: bool,
}

fn serve_connection(stream: UnixStream, exports: &Exports, shared: &Shared) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER, stream);
    let writer = Mutex::new(write_half);
    if let Ok(Some(neg)) = handshake(&mut reader, &writer, exports, shared) {
        let conn = Connection {
            export: neg.export,
            structured: neg.structured,
            base_allocation: neg.base_allocation,
            writer,
        };
        conn.transmission(&mut reader);
        let _ = lock(&conn.writer).shutdown(std::net::Shutdown::Both);
    } else {
        let _ = lock(&writer).shutdown(std::net::Shutdown::Both);
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn violation(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The export selected by `name`: an empty name selects the export named `""` if there is
/// one, otherwise the first.
fn lookup(exports: &[(String, Arc<dyn Export>)], name: &str) -> Option<usize> {
    exports
        .iter()
        .position(|(n, _)| n == name)
        .or(if name.is_empty() { Some(0) } else { None })
}

fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn preferred_block_size(export: &dyn Export) -> u32 {
    let p = export.preferred_block_size();
    if p.is_power_of_two() && (512..=MAX_PAYLOAD).contains(&p) {
        p
    } else {
        4096
    }
}

/// Option haggling. `Ok(None)` when the client leaves (or must be dropped) without
/// entering transmission; `Err` on I/O errors and protocol violations.
fn handshake(
    r: &mut impl Read,
    writer: &Mutex<UnixStream>,
    exports: &Exports,
    shared: &Shared,
) -> io::Result<Option<Negotiated>> {
    let send = |bytes: &[u8]| lock(writer).write_all(bytes);
    let reply = |opt: u32, typ: u32, data: &[u8]| send(&option_reply(opt, typ, data));

    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send(&greeting)?;

    let client_flags = read_u32(r)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(violation("unknown client flags"));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut structured = false;
    // Export index and selection of the last SET_META_CONTEXT.
    let mut meta: Option<(usize, bool)> = None;

    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(violation("bad option magic"));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION_LEN {
            // Skipping gigabytes is not worth it; the protocol allows dropping such clients.
            return Err(violation("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        if !fixed && opt != OPT_EXPORT_NAME {
            // Plain newstyle has no way to refuse an option.
            return Err(violation(
                "option other than EXPORT_NAME without fixed newstyle",
            ));
        }
        if shared.stopping() && opt != OPT_ABORT && opt != OPT_EXPORT_NAME {
            reply(opt, REP_ERR_SHUTDOWN, b"server is shutting down")?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let Some(idx) = std::str::from_utf8(&data)
                    .ok()
                    .and_then(|name| lookup(exports, name))
                else {
                    return Ok(None);
                };
                if shared.stopping() {
                    return Ok(None);
                }
                let export = exports[idx].1.clone();
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(&*export, structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                send(&b)?;
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    base_allocation: meta == Some((idx, true)),
                }));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = reply(opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for (name, _) in exports.iter() {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    reply(opt, REP_SERVER, &d)?;
                }
                reply(opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                structured = true;
                reply(opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let mut d = OptionData::new(&data);
                let parsed = (|| {
                    let name = d.string()?;
                    let n = d.u16()?;
                    let requests = (0..n).map(|_| d.u16()).collect::<Option<Vec<u16>>>()?;
                    d.is_empty().then_some((name, requests))
                })();
                let Some((name, requests)) = parsed else {
                    reply(opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(idx) = lookup(exports, name) else {
                    let msg = format!("no export named {name:?}");
                    reply(opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let (canonical, export) = &exports[idx];
                send_info(&reply, opt, canonical, &**export, structured, &requests)?;
                reply(opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated {
                        export: export.clone(),
                        structured,
                        base_allocation: meta == Some((idx, true)),
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    meta = None;
                }
                if !structured {
                    reply(opt, REP_ERR_INVALID, b"structured replies not negotiated")?;
                    continue;
                }
                let mut d = OptionData::new(&data);
                let parsed = (|| {
                    let name = d.string()?;
                    let n = d.u32()?;
                    // Each query takes at least 4 bytes: bound n before collecting.
                    if n as usize > data.len() / 4 {
                        return None;
                    }
                    let queries = (0..n).map(|_| d.string()).collect::<Option<Vec<&str>>>()?;
                    d.is_empty().then_some((name, queries))
                })();
                let Some((name, queries)) = parsed else {
                    reply(opt, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                let Some(idx) = lookup(exports, name) else {
                    let msg = format!("no export named {name:?}");
                    reply(opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let selected = if set {
                    queries.contains(&CONTEXT_BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries
                            .iter()
                            .any(|q| *q == CONTEXT_BASE_ALLOCATION || *q == "base:")
                };
                if selected {
                    let id = if set { CONTEXT_ID_BASE_ALLOCATION } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    reply(opt, REP_META_CONTEXT, &d)?;
                }
                if set {
                    meta = Some((idx, selected));
                }
                reply(opt, REP_ACK, &[])?;
            }
            _ => {
                // STARTTLS, EXTENDED_HEADERS and anything newer.
                let msg = format!("option {opt} is not supported");
                reply(opt, REP_ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}

/// The `NBD_REP_INFO` replies of `INFO`/`GO`: export size and flags, block sizes, and the
/// name and description when requested.
fn send_info(
    reply: &impl Fn(u32, u32, &[u8]) -> io::Result<()>,
    opt: u32,
    name: &str,
    export: &dyn Export,
    structured: bool,
    requests: &[u16],
) -> io::Result<()> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.size().to_be_bytes());
    d.extend_from_slice(&transmission_flags(export, structured).to_be_bytes());
    reply(opt, REP_INFO, &d)?;

    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&preferred_block_size(export).to_be_bytes());
    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    reply(opt, REP_INFO, &d)?;

    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        reply(opt, REP_INFO, &d)?;
    }
    if requests.contains(&INFO_DESCRIPTION) {
        if let Some(desc) = export.description() {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(truncate_utf8(&desc, MAX_STRING).as_bytes());
            reply(opt, REP_INFO, &d)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A request handed to a worker, with its payload for writes (`None` when the payload was
/// too large and has been skipped).
struct Job {
    req: Request,
    payload: Option<Vec<u8>>,
}

/// The transmission phase of one connection.
struct Connection {
    export: Arc<dyn Export>,
    structured: bool,
    base_allocation: bool,
    writer: Mutex<UnixStream>,
}

/// A refused or failed request: NBD error number and a message for humans.
type Failure = (u32, String);

impl Connection {
    /// Serves requests until the client disconnects, the socket fails or the client violates
    /// the protocol, then waits until every request read is answered.
    ///
    /// Leader/follower: each worker takes the reader in turn, reads one request, lets go of
    /// the reader, serves the request and writes its reply whole under the writer lock. No
    /// request changes threads, so a queue of small cached reads costs no hand-offs, and up to
    /// `WORKERS_PER_CONNECTION` requests are served at once.
    fn transmission<R: Read + Send>(&self, r: &mut R) {
        let reader = Mutex::new(r);
        let done = std::sync::atomic::AtomicBool::new(false);
        thread::scope(|scope| {
            for _ in 0..WORKERS_PER_CONNECTION {
                scope.spawn(|| loop {
                    let job = {
                        let mut r = lock(&reader);
                        if done.load(std::sync::atomic::Ordering::Acquire) {
                            break;
                        }
                        match self.next_job(&mut **r) {
                            Ok(Some(job)) => job,
                            _ => {
                                done.store(true, std::sync::atomic::Ordering::Release);
                                break;
                            }
                        }
                    };
                    let reply = self.serve(&job.req, job.payload);
                    let mut w = lock(&self.writer);
                    if w.write_all(&reply).is_err() {
                        // The client is gone: make the reader notice too.
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    }
                });
            }
        });
    }

    /// The next request to serve; `Ok(None)` on `NBD_CMD_DISC`.
    fn next_job(&self, r: &mut impl Read) -> io::Result<Option<Job>> {
        let mut hdr = [0u8; REQUEST_LEN];
        r.read_exact(&mut hdr)?;
        let req = Request::decode(&hdr).ok_or_else(|| violation("bad request magic"))?;
        let payload = match req.typ {
            CMD_DISC => return Ok(None),
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
        Ok(Some(Job { req, payload }))
    }

    /// The complete reply to one request.
    fn serve(&self, req: &Request, payload: Option<Vec<u8>>) -> Vec<u8> {
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

    /// A read's reply: the data follows the simple reply header or, with structured replies,
    /// forms a single final `OFFSET_DATA` chunk; with structured replies and without `DF`,
    /// runs the export knows to be zero go as `OFFSET_HOLE` chunks instead, as qemu-nbd does.
    fn read(&self, req: &Request) -> Vec<u8> {
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
    fn has_holes(runs: &[(u64, bool)], len: u32) -> bool {
        runs.iter().any(|r| r.1)
            && runs.iter().all(|r| r.0 > 0)
            && runs.iter().map(|r| r.0).sum::<u64>() == u64::from(len)
    }

    /// A read's reply as consecutive chunks in offset order: `OFFSET_HOLE` for each zero run,
    /// `OFFSET_DATA` for each other run (from `data`, the bytes read); the last one is
    /// flagged done.
    fn sparse_reply(req: &Request, runs: &[(u64, bool)], data: &[u8]) -> Vec<u8> {
        const HOLE_LEN: usize = 12;
        let bytes: u64 = runs.iter().filter(|r| !r.1).map(|r| r.0 + 8).sum();
        let mut out =
            Vec::with_capacity(runs.len() * (CHUNK_HEADER_LEN + HOLE_LEN) + bytes as usize);
        let mut pos = 0usize;
        for (i, &(n, zero)) in runs.iter().enumerate() {
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
    fn block_status(&self, req: &Request) -> Vec<u8> {
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

/// The NBD error number for a vmicache error.
fn errno(e: &Error) -> u32 {
    match e {
        Error::Io { source, .. } => io_errno(source),
        Error::Request { .. } => EINVAL,
        Error::Locked { .. } => EPERM,
        _ => EIO,
    }
}

fn io_errno(e: &io::Error) -> u32 {
    use io::ErrorKind as K;
    match e.raw_os_error() {
        // EPERM, EACCES, EROFS
        Some(1 | 13 | 30) => return EPERM,
        // ENOSPC, EDQUOT, EFBIG
        Some(28 | 122 | 27) => return ENOSPC,
        Some(22) => return EINVAL,
        Some(_) => return EIO,
        None => {}
    }
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => EPERM,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => ENOSPC,
        K::InvalidInput => EINVAL,
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
        let os = Error::io("x", "write", io::Error::from_raw_os_error(28));
        assert_eq!(errno(&os), ENOSPC);
        assert_eq!(errno(&Error::request("x", "out of range")), EINVAL);
        assert_eq!(errno(&Error::corrupt("x", "bad L2")), EIO);
    }

    #[test]
    fn default_export() {
        let e: Arc<dyn Export> = Arc::new(super::super::MemExport::new(512));
        let list = vec![("a".to_string(), e.clone()), ("".to_string(), e.clone())];
        assert_eq!(lookup(&list, ""), Some(1));
        assert_eq!(lookup(&list, "a"), Some(0));
        assert_eq!(lookup(&list[..1], ""), Some(0));
        assert_eq!(lookup(&list, "b"), None);
    }
}
