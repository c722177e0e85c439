//! An NBD (Network Block Device) server over a Unix socket.
//!
//! vmicache serves images to QEMU, `qemu-img` and libnbd tools (`nbdinfo`, `nbdcopy`) through
//! this module. What is served is anything that implements [`Export`]; the rest of vmicache
//! implements it over qcow2 chains, and [`MemExport`] is an in-memory export for tests.
//!
//! # Protocol subset
//!
//! The wire format is the one of the NBD protocol document (`doc/proto.md` of
//! NetworkBlockDevice/nbd); [`proto`] holds its constants and encoders. This server speaks:
//!
//! - **Handshake**: fixed newstyle only. The server offers `NBD_FLAG_FIXED_NEWSTYLE |
//!   NBD_FLAG_NO_ZEROES`; the client's flags are honoured (no 124 zero bytes after
//!   `NBD_OPT_EXPORT_NAME` when it sets `NBD_FLAG_C_NO_ZEROES`; a client without
//!   `NBD_FLAG_C_FIXED_NEWSTYLE` may only send `NBD_OPT_EXPORT_NAME`) and unknown client flags
//!   close the connection. No oldstyle negotiation, no TLS.
//! - **Options**:
//!   - `EXPORT_NAME` (old clients; an unknown name closes the connection, as the protocol
//!     leaves no way to report it);
//!   - `INFO` and `GO`, answering `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` always (minimum 1,
//!     preferred [`Export::preferred_block_size`], maximum [`proto::MAX_PAYLOAD`] = 32 MiB),
//!     `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION` when asked, and ignoring unknown info
//!     requests; an unknown export name is refused with `NBD_REP_ERR_UNKNOWN`;
//!   - `LIST` (one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`), `ABORT`;
//!   - `STRUCTURED_REPLY`;
//!   - `LIST_META_CONTEXT` and `SET_META_CONTEXT` with the single context `base:allocation`
//!     (an empty `LIST` query lists all contexts; `base:` lists every `base:` context);
//!   - everything else (`STARTTLS`, `EXTENDED_HEADERS`, ...) gets `NBD_REP_ERR_UNSUP` and the
//!     negotiation goes on.
//!
//!   An empty export name selects the default export: the one named `""` if there is one,
//!   otherwise the first export.
//! - **Transmission**: `READ` (simple replies; with structured replies, `OFFSET_DATA` chunks
//!   for data and `OFFSET_HOLE` chunks for what [`Export::read_sparse`] knows to read as zeroes,
//!   or one `OFFSET_DATA` chunk with `DF`, supported up to 32 MiB), `WRITE` (+`FUA`), `FLUSH`,
//!   `TRIM`, `WRITE_ZEROES` (+`NO_HOLE`; `FAST_ZERO` is not offered), `DISC` and
//!   `BLOCK_STATUS` for `base:allocation` (+`REQ_ONE`). Transmission flags: `HAS_FLAGS`,
//!   `SEND_FLUSH`, `SEND_FUA`, `SEND_DF` (with structured replies), `CAN_MULTI_CONN`, and
//!   `SEND_TRIM`, `SEND_WRITE_ZEROES` for writable exports or `READ_ONLY` for read-only ones.
//!   No extended headers, no `CACHE`, no `RESIZE`.
//!
//! Errors are reported with the protocol's error numbers: `EPERM` for writes to a read-only
//! export, `ENOSPC` for writes past the end (and out-of-space errors of the export), `EINVAL`
//! for other requests out of range, unknown commands or flags, `EOVERFLOW` for a `DF` read
//! larger than 32 MiB. Errors of the export map by kind: [`crate::Error::OutOfRange`] and
//! [`crate::Error::Refused`] to `EINVAL`, [`crate::Error::ReadOnly`] and
//! [`crate::Error::Locked`] to `EPERM`, I/O errors by their cause (`EPERM`, `ENOSPC`,
//! `EINVAL`), and everything else to `EIO`. A failed request leaves
//! the connection open; a protocol violation (bad request magic, a truncated request) closes it.
//!
//! # Concurrency
//!
//! Every connection has its own thread, which performs the handshake and then reads requests
//! (and write payloads) and hands them to a small pool of worker threads of that connection
//! ([`WORKERS_PER_CONNECTION`]), so that a client keeping 16 requests in flight gets parallel
//! I/O. Each reply is encoded whole and written under a mutex on the socket, so replies of
//! different requests never interleave. Replies may therefore arrive out of order, as the
//! protocol allows. `CAN_MULTI_CONN` is always advertised: an export is shared by all
//! connections, so its `flush` must make every completed write durable, whichever connection
//! sent it.
//!
//! # Limits
//!
//! Every connection costs a thread (plus its workers), a descriptor and buffers, so a
//! [`Limits`] bounds them all ([`Server::bind_with`]; [`Server::bind`] takes the defaults):
//! a total number of connections (excess ones are closed as soon as they are accepted) and a
//! number per export (`NBD_OPT_GO` beyond it gets `NBD_REP_ERR_POLICY`), a handshake timeout
//! (a client still haggling after it is dropped, however it trickles its bytes), and the
//! bytes of replies and write payloads one connection may hold: when they are reached the
//! server stops reading that connection's requests until the client reads its replies. A
//! connection thus holds at most about twice `max(max_queued_reply_bytes, 32 MiB)` while
//! building replies and `max_queued_reply_bytes` while waiting for a client to read them,
//! plus the kernel's send buffer of the socket (4 MiB asked for, which the kernel counts as up
//! to 8 MiB; beyond `net.core.wmem_max` only for a server with `CAP_NET_ADMIN`).
//! When a reply cannot be written (the client went away), the requests of that connection
//! not yet started are dropped.
//!
//! # Shutdown
//!
//! [`Stopper::stop`] makes [`Server::run`] stop accepting, remove the socket file, end every
//! connection's reading side and drop the requests read but not started; requests being
//! served may finish during [`Limits::shutdown_grace`] (1 s by default), then the remaining
//! connections are closed. If a connection thread panics, the server stops the same way and
//! `run` returns an error.

pub mod client;
mod export;
mod handshake;
mod listener;
mod opener;
pub mod proto;
mod reply;
mod state;
mod transmission;

pub use export::{Export, MemExport, MEM_BLOCK, STATE_HOLE, STATE_ZERO};
pub use listener::{Server, Stopper};
pub use opener::register;
pub use state::Limits;
pub use transmission::WORKERS_PER_CONNECTION;
