//! State shared by the server, its stoppers and its connection threads: the limits, the
//! exports, the open connections and the per-export counts. See the module documentation of
//! [`crate::nbd`].

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::export::Export;

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
    pub(super) stopping: AtomicBool,
    /// Set when a connection thread panicked: `run` stops and reports it.
    pub(super) panicked: Mutex<Option<String>>,
    pub(super) limits: Limits,
    /// Connections in transmission, per export (same order as the exports).
    pub(super) per_export: Mutex<Vec<usize>>,
    pub(super) path: PathBuf,
    /// A second handle on the listening socket: shutting it down wakes `accept()` even when
    /// the socket file is gone (so stop never depends on the path).
    pub(super) listener: UnixListener,
    pub(super) conns: Mutex<Conns>,
    /// Signalled whenever a connection ends.
    pub(super) conn_ended: Condvar,
}

/// Open connections, kept so that a stop can shut their sockets down.
#[derive(Default)]
pub(super) struct Conns {
    pub(super) next_id: u64,
    pub(super) open: HashMap<u64, UnixStream>,
}

impl Shared {
    pub(super) fn conns(&self) -> MutexGuard<'_, Conns> {
        lock(&self.conns)
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stops accepting (see [`Stopper::stop`]).
    pub(super) fn stop(&self) {
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
