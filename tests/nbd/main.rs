//! The NBD server (`vmicache::nbd`) against real peers: qemu-img, qemu-io (QEMU's NBD client)
//! and libnbd's nbdinfo and nbdcopy, plus a small hand-written client for error paths that
//! the tools cannot provoke.
//!
//! CI must install the Debian package `libnbd-bin` (nbdinfo, nbdcopy) next to `qemu-utils`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmicache::nbd::client::{NbdStorage, Timeouts};
use vmicache::nbd::proto::{self, Request};
use vmicache::nbd::{
    Export, Limits, MemExport, Server, Stopper, MEM_BLOCK, STATE_HOLE, STATE_ZERO,
    WORKERS_PER_CONNECTION,
};

#[path = "../nbd_exports/mod.rs"]
mod nbd_exports;
use nbd_exports::{flaky, Gathering, Hooked, BAD, GATHER_TIMEOUT};

mod libnbd;
mod lifecycle;
mod protocol;
mod qemu;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

/// A server on a socket in a temporary directory, run on a background thread.
struct Served {
    dir: tempfile::TempDir,
    sock: PathBuf,
    stopper: Stopper,
    thread: Option<JoinHandle<vmicache::Result<()>>>,
}

impl Served {
    fn start(exports: Vec<(&str, Arc<dyn Export>)>) -> Served {
        Served::start_with(exports, Limits::default())
    }

    fn start_with(exports: Vec<(&str, Arc<dyn Export>)>, limits: Limits) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let exports = exports
            .into_iter()
            .map(|(n, e)| (n.to_string(), e))
            .collect();
        let server = Server::bind_with(&sock, exports, limits).expect("bind");
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.run());
        Served {
            dir,
            sock,
            stopper,
            thread: Some(thread),
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops the server and waits for `run` to return.
    fn stop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked").expect("run");
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mem(m: &Arc<MemExport>) -> Arc<dyn Export> {
    m.clone()
}

/// Deterministic test data of `size` bytes: pseudo-random 64 KiB blocks, every third block
/// all zero (so it is a hole in a [`MemExport::from_vec`]).
fn pattern(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(size as usize);
    for i in 0..size {
        if (i / MEM_BLOCK) % 3 == 1 {
            v.push(0);
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
    }
    v
}

// ---------------------------------------------------------------------------
// Running tools
// ---------------------------------------------------------------------------

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))
}

fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?} ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a tool that must succeed and print no error; returns its stdout.
fn run(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = output(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    let lower = stdout.to_ascii_lowercase();
    if !out.status.success()
        || ["fail", "error", "invalid"]
            .iter()
            .any(|w| lower.contains(w) || stderr.contains(w))
    {
        panic!("command failed: {}", describe(&cmd, &out));
    }
    stdout
}

/// Runs a tool that must fail (non-zero exit or an error message); returns stdout + stderr.
fn run_failing(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let out = output(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lower = text.to_ascii_lowercase();
    assert!(
        !out.status.success() || lower.contains("fail") || lower.contains("error"),
        "command unexpectedly succeeded: {}",
        describe(&cmd, &out)
    );
    text
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args)
}

/// `nbdinfo --map` output as (offset, length, type) triples.
fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

/// The expected map of `data` held in a [`MemExport::from_vec`]: zero blocks are holes.
fn expected_map(data: &[u8]) -> Vec<(u64, u64, u32)> {
    let mut map: Vec<(u64, u64, u32)> = Vec::new();
    for (i, b) in data.chunks(MEM_BLOCK as usize).enumerate() {
        let t = if b.iter().all(|&x| x == 0) {
            STATE_HOLE | STATE_ZERO
        } else {
            0
        };
        match map.last_mut() {
            Some(last) if last.2 == t => last.1 += b.len() as u64,
            _ => map.push((i as u64 * MEM_BLOCK, b.len() as u64, t)),
        }
    }
    map
}

// ---------------------------------------------------------------------------
// A hand-written client for error paths
// ---------------------------------------------------------------------------

struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects and reads the greeting; sends `client_flags`.
    fn connect(sock: &Path, client_flags: u32) -> Client {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(
            u64::from_be_bytes(g[0..8].try_into().unwrap()),
            proto::NBDMAGIC
        );
        assert_eq!(
            u64::from_be_bytes(g[8..16].try_into().unwrap()),
            proto::IHAVEOPT
        );
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        Client { s }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// One option reply: (type, data).
    fn option_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), proto::OPT_REPLY_MAGIC);
        assert_eq!(self.u32(), opt);
        let typ = self.u32();
        let len = self.u32() as usize;
        (typ, self.bytes(len))
    }

    fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            typ,
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
    }

    /// A structured reply chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), proto::STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let typ = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        (flags, typ, cookie, self.bytes(len))
    }

    /// A simple reply header: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), proto::SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }

    /// Whether the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

fn structured_error(chunk: &(u16, u16, u64, Vec<u8>)) -> u32 {
    assert_eq!(chunk.1, proto::REPLY_TYPE_ERROR, "{chunk:?}");
    assert_eq!(chunk.0 & proto::REPLY_FLAG_DONE, proto::REPLY_FLAG_DONE);
    u32::from_be_bytes(chunk.3[0..4].try_into().unwrap())
}

/// Option replies to `NBD_OPT_GO` on `name` until the final one; its type.
fn go(c: &mut Client, name: &str) -> u32 {
    let mut d = string(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(proto::OPT_GO, &d);
    loop {
        let (typ, _) = c.option_reply(proto::OPT_GO);
        if typ == proto::REP_ACK || typ & proto::REP_ERR != 0 {
            return typ;
        }
    }
}
