//! The listening side of the server: binding the socket, the accept loop with one thread per
//! connection, and stopping. See the module documentation of [`crate::nbd`].

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::proto::*;
use super::transmission::serve_connection;
use super::Export;
use crate::{Error, Result};

/// What one server allows its clients: every connection costs a thread, a descriptor and
/// buffers, so all of it is bounded. [`Limits::default`] suits a server of a few VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections, in any phase; a connection beyond it is closed as soon as it is
    /// accepted (before the greeting). Default 16.
    pub max_connections: usize,
    /// Connections in transmission on one export; `NBD_OPT_GO` beyond it is refused with
    /// `NBD_REP_ERR_POLICY` (`NBD_OPT_EXPORT_NAME` is closed). Default 8.
    pub max_connections_per_export: usize,
    /// Time from accept to the end of option haggling, however the client trickles its
    /// bytes; a client still haggling after it is dropped. Default 10 s.
    pub handshake_timeout: Duration,
    /// Bytes of replies (and write payloads) one connection may hold in memory at once;
    /// when they are reached the server stops reading requests from that connection until
    /// the client reads its replies. A single request larger than this (up to the 32 MiB
    /// payload limit) is served alone. Default 32 MiB.
    pub max_queued_reply_bytes: usize,
    /// Once stopped, how long requests already being served may take to finish (and their
    /// replies to go out) before the connections are closed; requests read but not started
    /// are dropped. Default 1 s.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 16,
            max_connections_per_export: 8,
            handshake_timeout: Duration::from_secs(10),
            max_queued_reply_bytes: 32 << 20,
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

pub(super) type Exports = Arc<Vec<(String, Arc<dyn Export>)>>;

/// State shared by the server, its stoppers and its connection threads.
pub(super) struct Shared {
    stopping: AtomicBool,
    /// Set when a connection thread panicked: `run` stops and reports it.
    panicked: Mutex<Option<String>>,
    pub(super) limits: Limits,
    /// Connections in transmission, per export (same order as the exports).
    per_export: Mutex<Vec<usize>>,
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

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stops accepting (see [`Stopper::stop`]).
    fn stop(&self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.listener),
                nix::sys::socket::Shutdown::Both,
            );
            let _ = UnixStream::connect(&self.path);
        }
    }

    /// Takes a transmission slot on export `idx`, or `None` when the export has
    /// [`Limits::max_connections_per_export`] connections already.
    pub(super) fn export_slot(self: &Arc<Self>, idx: usize) -> Option<ExportSlot> {
        let mut counts = lock(&self.per_export);
        let n = counts.get_mut(idx)?;
        if *n >= self.limits.max_connections_per_export {
            return None;
        }
        *n += 1;
        Some(ExportSlot {
            shared: self.clone(),
            idx,
        })
    }
}

/// A connection's place in the count of its export; given back on drop.
pub(super) struct ExportSlot {
    shared: Arc<Shared>,
    idx: usize,
}

impl Drop for ExportSlot {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.shared.per_export).get_mut(self.idx) {
            *n = n.saturating_sub(1);
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        self.shared.stop();
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
        Server::bind_with(socket, exports, Limits::default())
    }

    /// [`Server::bind`] with other [`Limits`] than the defaults. Limits of 0 connections
    /// or 0 bytes are raised to 1.
    pub fn bind_with(
        socket: &Path,
        exports: Vec<(String, Arc<dyn Export>)>,
        limits: Limits,
    ) -> Result<Server> {
        let limits = Limits {
            max_connections: limits.max_connections.max(1),
            max_connections_per_export: limits.max_connections_per_export.max(1),
            max_queued_reply_bytes: limits.max_queued_reply_bytes.max(1),
            ..limits
        };
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
        let nexports = exports.len();
        let listener = UnixListener::bind(socket).map_err(|e| Error::io(socket, "bind", e))?;
        let second = listener
            .try_clone()
            .map_err(|e| Error::io(socket, "dup", e))?;
        Ok(Server {
            listener,
            exports: Arc::new(exports),
            shared: Arc::new(Shared {
                stopping: AtomicBool::new(false),
                panicked: Mutex::new(None),
                limits,
                per_export: Mutex::new(vec![0; nexports]),
                path: socket.to_path_buf(),
                listener: second,
                conns: Mutex::new(Conns::default()),
                conn_ended: Condvar::new(),
            }),
            ident: socket_ident(socket),
        })
    }

    /// Serves one already connected stream to its end in this thread, as a connection
    /// thread of [`Server::run`] does (same limits, same exports): for a connection handed
    /// over by someone else, and for fuzzing the handshake and transmission phases.
    pub fn serve_stream(&self, stream: UnixStream) {
        serve_connection(stream, &self.exports, &self.shared);
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

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared.limits
    }

    /// Serves connections, each on its own thread, until [`Stopper::stop`]; then removes
    /// the socket file and ends the connections (see [`Stopper::stop`]) before returning.
    ///
    /// A connection beyond [`Limits::max_connections`] is closed at once. If a connection
    /// thread panics, the server stops as if stopped and `run` returns an error.
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
                if conns.open.len() >= self.shared.limits.max_connections {
                    // Refused before the greeting: the client sees the connection closed.
                    drop(conns);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    continue;
                }
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
        match lock(&self.shared.panicked).take() {
            Some(what) => Err(Error::io(
                &self.shared.path,
                "serve",
                io::Error::other(format!(
                    "a connection thread panicked ({what}); server stopped"
                )),
            )),
            None => Ok(()),
        }
    }

    /// Ends the reading side of every connection, waits up to [`Limits::shutdown_grace`]
    /// for the requests being served to be answered, then closes what remains.
    fn close_connections(&self) {
        let mut conns = self.shared.conns();
        for s in conns.open.values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
        let deadline = Instant::now() + self.shared.limits.shutdown_grace;
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

/// Removes a connection from [`Conns`] when its thread ends, however it ends; when it ends
/// by a panic, stops the server (a server with a dead part must not live on).
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            lock(&self.shared.panicked).get_or_insert_with(|| format!("connection {}", self.id));
            self.shared.stop();
        }
        self.shared.conns().open.remove(&self.id);
        self.shared.conn_ended.notify_all();
    }
}
