//! The listening side of the server: binding the socket, the accept loop with one thread per
//! connection, and stopping. See the module documentation of [`crate::nbd`].

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::export::Export;
use super::proto::*;
use super::state::{lock, Conns, Exports, Limits, Shared};
use super::transmission::serve_connection;
use crate::{Error, Result};

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
            return Err(Error::refused(socket, "NBD server: no export to serve"));
        }
        for (i, (name, _)) in exports.iter().enumerate() {
            if name.len() > MAX_STRING || name.contains('\0') {
                return Err(Error::refused(socket, format!("bad export name {name:?}")));
            }
            if exports[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::refused(
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
