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

mod nbd_exports;
use nbd_exports::{flaky, Gathering, Hooked, BAD, GATHER_TIMEOUT};

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
// QEMU as the client
// ---------------------------------------------------------------------------

#[test]
fn qemu_img_info_and_qemu_io_write_read() {
    let m = Arc::new(MemExport::new(16 * MIB));
    let s = Served::start(vec![("disk", mem(&m))]);
    let uri = s.uri("disk");

    let info = run("qemu-img", &["info", "--output=json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 16 * MIB, "{info:#}");

    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "write -P 0x5a 12345 7777",
            "write -P 0xc3 15M 1M",
            "read -P 0xab 0 12345",
            "read -P 0x5a 12345 7777",
            "read -P 0xab 20122 45414",
            "read -P 0xc3 15M 1M",
            "read -P 0 64k 14M",
        ],
    );
    assert!(out.contains("read 7777/7777 bytes"), "{out}");

    let data = m.contents();
    assert!(data[..12345].iter().all(|&b| b == 0xab));
    assert!(data[12345..12345 + 7777].iter().all(|&b| b == 0x5a));
    assert!(data[12345 + 7777..64 * 1024].iter().all(|&b| b == 0xab));
    assert!(data[15 * MIB as usize..].iter().all(|&b| b == 0xc3));
}

#[test]
fn qemu_img_compare_and_convert() {
    let data = pattern(8 * MIB + 5 * KIB, 1);
    let m = Arc::new(MemExport::from_vec(data.clone()));
    let s = Served::start(vec![("img", mem(&m))]);
    let uri = s.uri("img");

    let raw = s.path("same.raw");
    std::fs::write(&raw, &data).unwrap();
    let raw_s = raw.to_str().unwrap();
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", raw_s, &uri],
    );

    let mut other = data.clone();
    other[3 * MIB as usize + 17] ^= 0xff;
    let diff = s.path("differs.raw");
    std::fs::write(&diff, &other).unwrap();
    let mut cmd = Command::new("qemu-img");
    cmd.args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        diff.to_str().unwrap(),
        &uri,
    ]);
    let out = output(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&cmd, &out));

    // QEMU sees the allocation through base:allocation block status.
    let map = run("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let map: serde_json::Value = serde_json::from_str(&map).expect("qemu-img map JSON");
    let seen: Vec<(u64, u64, bool)> = map
        .as_array()
        .expect("map is a list")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    let want: Vec<(u64, u64, bool)> = expected_map(&data)
        .into_iter()
        .map(|(o, l, t)| (o, l, t == 0))
        .collect();
    assert_eq!(seen, want);

    let conv = s.path("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            conv.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&conv).unwrap() == data, "convert differs");
}

#[test]
fn qemu_io_write_zeroes_discard_flush_fua() {
    let m = Arc::new(MemExport::from_vec(vec![0x11; 4 * MIB as usize]));
    let s = Served::start(vec![("", mem(&m))]);
    let uri = s.uri("");

    qemu_io(
        &uri,
        &[
            "write -z 64k 128k",
            "write -z -u 512k 256k",
            "discard 1M 256k",
            "write -f -P 0x22 2M 4k",
            "flush",
            "read -P 0 64k 128k",
            "read -P 0 512k 256k",
            "read -P 0x22 2M 4k",
            "read -P 0x11 3M 4k",
        ],
    );
    let data = m.contents();
    let zero = |a: u64, l: u64| data[a as usize..(a + l) as usize].iter().all(|&b| b == 0);
    assert!(zero(64 * KIB, 128 * KIB));
    assert!(zero(512 * KIB, 256 * KIB));
    assert!(zero(MIB, 256 * KIB), "whole blocks discarded");
    assert!(data[2 * MIB as usize..][..4096].iter().all(|&b| b == 0x22));
    assert!(m.flushes() >= 2, "flush and FUA reach the export");

    // write -z without -u keeps allocated zeroes; -u and discard leave holes.
    let map = nbd_map(&uri);
    let at = |off: u64| {
        map.iter()
            .find(|(o, l, _)| *o <= off && off < o + l)
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("offset {off} not in map {map:?}"))
    };
    assert_eq!(at(0), 0);
    assert_eq!(at(64 * KIB), STATE_ZERO);
    assert_eq!(at(512 * KIB), STATE_HOLE | STATE_ZERO);
    assert_eq!(at(MIB), STATE_HOLE | STATE_ZERO);
    assert_eq!(at(2 * MIB), 0);
}

#[test]
fn unknown_export_is_refused() {
    let m = Arc::new(MemExport::new(MIB));
    let s = Served::start(vec![("disk", mem(&m))]);
    run_failing("qemu-img", &["info", &s.uri("nope")]);
    // The server is still fine afterwards.
    run("qemu-img", &["info", &s.uri("disk")]);
}

#[test]
fn read_only_export_refuses_writes() {
    let m = Arc::new(MemExport::from_vec(vec![7; MIB as usize]).with_read_only(true));
    let s = Served::start(vec![("ro", mem(&m))]);
    let uri = s.uri("ro");
    run_failing("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 4k"]);
    run(
        "qemu-io",
        &["-r", "-f", "raw", &uri, "-c", "read -P 7 0 1M"],
    );
    assert!(m.contents().iter().all(|&b| b == 7));
}

#[test]
fn qemu_img_bench_queue_depth_16() {
    let m = Arc::new(MemExport::new(32 * MIB));
    let s = Served::start(vec![("bench", mem(&m))]);
    let uri = s.uri("bench");
    run(
        "qemu-img",
        &[
            "bench",
            "-f",
            "raw",
            "-w",
            "-d",
            "16",
            "-c",
            "2000",
            "-s",
            "4096",
            "-S",
            "8192",
            "--pattern=51",
            &uri,
        ],
    );
    run(
        "qemu-img",
        &[
            "bench", "-f", "raw", "-d", "16", "-c", "2000", "-s", "4096", &uri,
        ],
    );
    let data = m.contents();
    for i in 0..2000usize {
        let off = i * 8192;
        assert!(data[off..off + 4096].iter().all(|&b| b == 51), "block {i}");
        assert!(
            data[off + 4096..off + 8192].iter().all(|&b| b == 0),
            "gap {i}"
        );
    }
}

#[test]
fn requests_of_one_connection_run_in_parallel() {
    // Data everywhere, so that every read reaches the export (holes are answered from
    // block status alone).
    let export = Arc::new(Gathering::new(
        MemExport::from_vec(vec![1; MIB as usize]),
        WORKERS_PER_CONNECTION,
    ));
    let s = Served::start(vec![("slow", export.clone() as Arc<dyn Export>)]);
    let mut c = Client::connect(&s.sock, 3);
    // A server that serves one read at a time holds the first until the export gives up.
    c.s.set_read_timeout(Some(2 * GATHER_TIMEOUT)).unwrap();
    assert_eq!(go(&mut c, "slow"), proto::REP_ACK);
    // 16 reads sent at once over one connection: its workers serve them together, counted
    // by the export (not timed).
    let mut batch = Vec::new();
    for i in 0..16u64 {
        let r = Request {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: i,
            offset: i * 4096,
            length: 4096,
        };
        batch.extend_from_slice(&r.encode());
    }
    c.s.write_all(&batch).unwrap();
    let mut cookies = Vec::new();
    for _ in 0..16 {
        let (error, cookie) = c.simple();
        assert_eq!(error, 0, "read {cookie}");
        assert!(c.bytes(4096).iter().all(|&b| b == 1), "read {cookie}");
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..16).collect::<Vec<u64>>());
    assert_eq!(
        export.most_in_flight(),
        WORKERS_PER_CONNECTION,
        "reads of one connection in flight at once"
    );
}

// ---------------------------------------------------------------------------
// libnbd tools as the client
// ---------------------------------------------------------------------------

#[test]
fn nbdinfo_list_size_and_map() {
    let data = pattern(2 * MIB + 512, 2);
    let a = Arc::new(MemExport::from_vec(data.clone()));
    let b = Arc::new(MemExport::new(MIB));
    let s = Served::start(vec![("alpha", mem(&a)), ("beta", mem(&b))]);

    let list = run("nbdinfo", &["--list", &s.uri("")]);
    assert!(list.contains("export=\"alpha\""), "{list}");
    assert!(list.contains("export=\"beta\""), "{list}");
    assert!(list.contains("base:allocation"), "{list}");

    assert_eq!(
        run("nbdinfo", &["--size", &s.uri("alpha")]).trim(),
        (2 * MIB + 512).to_string()
    );
    // The empty name selects the first export.
    assert_eq!(
        run("nbdinfo", &["--size", &s.uri("")]).trim(),
        (2 * MIB + 512).to_string()
    );

    assert_eq!(nbd_map(&s.uri("alpha")), expected_map(&data));
    assert_eq!(
        nbd_map(&s.uri("beta")),
        vec![(0, MIB, STATE_HOLE | STATE_ZERO)]
    );

    let info = run("nbdinfo", &[&s.uri("beta")]);
    assert!(info.contains("is_read_only: false"), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("block_size_maximum: 33554432"), "{info}");
}

#[test]
fn nbdcopy_one_and_several_connections() {
    let data = pattern(12 * MIB + 4 * KIB, 3);
    let m = Arc::new(MemExport::from_vec(data.clone()));
    let target = Arc::new(MemExport::new(data.len() as u64));
    let s = Served::start(vec![("src", mem(&m)), ("dst", mem(&target))]);

    for (i, extra) in [
        vec![],
        vec!["--connections=1"],
        vec!["--connections=4", "--requests=16"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = s.path(&format!("out{i}.raw"));
        let uri = s.uri("src");
        let mut args: Vec<&str> = extra;
        args.extend([uri.as_str(), out.to_str().unwrap()]);
        run("nbdcopy", &args);
        assert!(
            std::fs::read(&out).unwrap() == data,
            "nbdcopy {args:?} differs"
        );
    }

    // Writing through NBD with several connections in parallel.
    let input = s.path("in.raw");
    std::fs::write(&input, &data).unwrap();
    let dst = s.uri("dst");
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            input.to_str().unwrap(),
            &dst,
        ],
    );
    assert!(target.contents() == data, "nbdcopy to NBD differs");
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

#[test]
fn protocol_options_and_errors() {
    let data = pattern(2 * MIB, 4);
    let flaky: Arc<dyn Export> = Arc::new(flaky(data.clone()));
    let s = Served::start(vec![("flaky", flaky)]);
    let mut c = Client::connect(&s.sock, 3);

    // Unknown options, including extended headers, are refused and negotiation goes on.
    for opt in [proto::OPT_EXTENDED_HEADERS, 4242] {
        c.option(opt, &[]);
        assert_eq!(c.option_reply(opt).0, proto::REP_ERR_UNSUP);
    }
    // Meta contexts need structured replies first.
    let mut q = string("flaky");
    q.extend_from_slice(&0u32.to_be_bytes());
    c.option(proto::OPT_LIST_META_CONTEXT, &q);
    assert_eq!(
        c.option_reply(proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ERR_INVALID
    );
    c.option(proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.option_reply(proto::OPT_STRUCTURED_REPLY).0,
        proto::REP_ACK
    );
    // An empty LIST query lists everything.
    c.option(proto::OPT_LIST_META_CONTEXT, &q);
    let (t, d) = c.option_reply(proto::OPT_LIST_META_CONTEXT);
    assert_eq!(t, proto::REP_META_CONTEXT);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(
        c.option_reply(proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ACK
    );
    // A query of another namespace finds nothing.
    let mut q2 = string("flaky");
    q2.extend_from_slice(&1u32.to_be_bytes());
    q2.extend_from_slice(&string("qemu:dirty-bitmap:x"));
    c.option(proto::OPT_LIST_META_CONTEXT, &q2);
    assert_eq!(
        c.option_reply(proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ACK
    );
    // Select base:allocation.
    let mut q3 = string("");
    q3.extend_from_slice(&1u32.to_be_bytes());
    q3.extend_from_slice(&string("base:allocation"));
    c.option(proto::OPT_SET_META_CONTEXT, &q3);
    let (t, d) = c.option_reply(proto::OPT_SET_META_CONTEXT);
    assert_eq!(t, proto::REP_META_CONTEXT);
    let ctx = u32::from_be_bytes(d[0..4].try_into().unwrap());
    assert_ne!(ctx, 0);
    assert_eq!(
        c.option_reply(proto::OPT_SET_META_CONTEXT).0,
        proto::REP_ACK
    );
    // Unknown export names are refused.
    let mut info = string("nope");
    info.extend_from_slice(&0u16.to_be_bytes());
    c.option(proto::OPT_INFO, &info);
    assert_eq!(c.option_reply(proto::OPT_INFO).0, proto::REP_ERR_UNKNOWN);
    // GO on the default export, asking for the name, the description and something unknown.
    let mut go = string("");
    go.extend_from_slice(&3u16.to_be_bytes());
    for i in [proto::INFO_NAME, proto::INFO_DESCRIPTION, 77] {
        go.extend_from_slice(&i.to_be_bytes());
    }
    c.option(proto::OPT_GO, &go);
    let mut flags = 0;
    let mut seen = Vec::new();
    loop {
        let (t, d) = c.option_reply(proto::OPT_GO);
        if t == proto::REP_ACK {
            break;
        }
        assert_eq!(t, proto::REP_INFO);
        let it = u16::from_be_bytes([d[0], d[1]]);
        seen.push(it);
        match it {
            proto::INFO_EXPORT => {
                assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 2 * MIB);
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            proto::INFO_NAME => assert_eq!(&d[2..], b"flaky"),
            proto::INFO_BLOCK_SIZE => {
                assert_eq!(u32::from_be_bytes(d[2..6].try_into().unwrap()), 1);
                assert_eq!(u32::from_be_bytes(d[10..14].try_into().unwrap()), 32 << 20);
            }
            _ => {}
        }
    }
    assert!(seen.contains(&proto::INFO_EXPORT) && seen.contains(&proto::INFO_BLOCK_SIZE));
    assert!(seen.contains(&proto::INFO_NAME), "{seen:?}");
    assert_ne!(flags & proto::FLAG_READ_ONLY, 0);
    assert_ne!(flags & proto::FLAG_SEND_DF, 0);

    // A good read: one final OFFSET_DATA chunk.
    c.request(proto::CMD_READ, proto::CMD_FLAG_DF, 1, 4096, 8192);
    let (f, t, cookie, p) = c.chunk();
    assert_eq!(
        (f, t, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), 4096);
    assert!(p[8..] == data[4096..4096 + 8192]);
    // A failing read is an EIO error chunk; the connection stays up.
    c.request(proto::CMD_READ, 0, 2, BAD - 512, 1024);
    assert_eq!(structured_error(&c.chunk()), proto::EIO);
    // Out of range, bad flags, unknown command, writes to a read-only export.
    c.request(proto::CMD_READ, 0, 3, 2 * MIB - 512, 1024);
    assert_eq!(structured_error(&c.chunk()), proto::EINVAL);
    c.request(proto::CMD_READ, proto::CMD_FLAG_REQ_ONE, 4, 0, 512);
    assert_eq!(structured_error(&c.chunk()), proto::EINVAL);
    c.request(99, 0, 5, 0, 512);
    assert_eq!(structured_error(&c.chunk()), proto::EINVAL);
    c.request(proto::CMD_WRITE, 0, 6, 0, 3);
    c.s.write_all(b"abc").unwrap();
    assert_eq!(structured_error(&c.chunk()), proto::EPERM);
    c.request(proto::CMD_READ, proto::CMD_FLAG_DF, 7, 0, 33 << 20);
    assert_eq!(structured_error(&c.chunk()), proto::EOVERFLOW);
    // Block status, whole and REQ_ONE.
    c.request(proto::CMD_BLOCK_STATUS, 0, 8, 0, 4 * MEM_BLOCK as u32);
    let (f, t, cookie, p) = c.chunk();
    assert_eq!(
        (f, t, cookie),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, 8)
    );
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), ctx);
    let ext: Vec<(u32, u32)> = p[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[0..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let b = MEM_BLOCK as u32;
    assert_eq!(ext, vec![(b, 0), (b, 3), (2 * b, 0)]);
    c.request(
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        9,
        100,
        4 * b,
    );
    let (_, _, _, p) = c.chunk();
    assert_eq!(p.len(), 12, "one descriptor");
    assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), b - 100);
    // Without DF, what the export knows to be zero goes as hole chunks, in offset order,
    // the last chunk flagged done.
    c.request(proto::CMD_READ, 0, 11, 0, 4 * b);
    let want = [
        (proto::REPLY_TYPE_OFFSET_DATA, 0u64, b as usize),
        (proto::REPLY_TYPE_OFFSET_HOLE, u64::from(b), b as usize),
        (
            proto::REPLY_TYPE_OFFSET_DATA,
            2 * u64::from(b),
            2 * b as usize,
        ),
    ];
    for (i, (typ, off, len)) in want.into_iter().enumerate() {
        let (f, t, cookie, p) = c.chunk();
        let done = if i == 2 { proto::REPLY_FLAG_DONE } else { 0 };
        assert_eq!((f, t, cookie), (done, typ, 11), "chunk {i}");
        assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), off);
        if typ == proto::REPLY_TYPE_OFFSET_HOLE {
            assert_eq!(p.len(), 12);
            assert_eq!(
                u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize,
                len
            );
        } else {
            assert!(p[8..] == data[off as usize..off as usize + len]);
        }
    }
    // A read inside a hole is one final hole chunk; with DF it is data (zeroes).
    c.request(proto::CMD_READ, 0, 12, u64::from(b) + 512, 4096);
    let (f, t, _, p) = c.chunk();
    assert_eq!(
        (f, t),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_HOLE)
    );
    assert_eq!(
        u64::from_be_bytes(p[0..8].try_into().unwrap()),
        u64::from(b) + 512
    );
    assert_eq!(u32::from_be_bytes(p[8..12].try_into().unwrap()), 4096);
    c.request(
        proto::CMD_READ,
        proto::CMD_FLAG_DF,
        13,
        u64::from(b) + 512,
        4096,
    );
    let (f, t, _, p) = c.chunk();
    assert_eq!(
        (f, t),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA)
    );
    assert!(p[8..].iter().all(|&x| x == 0) && p.len() == 8 + 4096);
    // Still alive after all those errors.
    c.request(proto::CMD_READ, 0, 10, 0, 512);
    let (_, t, cookie, p) = c.chunk();
    assert_eq!((t, cookie), (proto::REPLY_TYPE_OFFSET_DATA, 10));
    assert!(p[8..] == data[..512]);
    // A bad magic is a protocol violation: the server hangs up.
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());
}

#[test]
fn old_clients_simple_replies() {
    let data = pattern(2 * MIB, 5);
    let flaky: Arc<dyn Export> = Arc::new(flaky(data.clone()));
    let s = Served::start(vec![("flaky", flaky)]);

    // Fixed newstyle without NO_ZEROES: EXPORT_NAME is answered with 124 zero bytes.
    let mut c = Client::connect(&s.sock, 1);
    c.option(proto::OPT_EXPORT_NAME, b"flaky");
    assert_eq!(c.u64(), 2 * MIB);
    let flags = c.u16();
    assert_eq!(
        flags & proto::FLAG_SEND_DF,
        0,
        "no DF without structured replies"
    );
    assert_eq!(c.bytes(124), vec![0u8; 124]);
    // A failed read: error, no payload; the next read works.
    c.request(proto::CMD_READ, 0, 1, BAD, 512);
    assert_eq!(c.simple(), (proto::EIO, 1));
    c.request(proto::CMD_READ, 0, 2, 512, 512);
    assert_eq!(c.simple(), (0, 2));
    assert!(c.bytes(512) == data[512..1024]);
    c.request(proto::CMD_FLUSH, 0, 3, 0, 0);
    assert_eq!(c.simple(), (0, 3));
    c.request(proto::CMD_DISC, 0, 4, 0, 0);
    assert!(c.closed());

    // Plain (not fixed) newstyle: an unknown export name just closes the connection.
    let mut c = Client::connect(&s.sock, 0);
    c.option(proto::OPT_EXPORT_NAME, b"nope");
    assert!(c.closed());
    // ABORT is acknowledged.
    let mut c = Client::connect(&s.sock, 3);
    c.option(proto::OPT_ABORT, &[]);
    assert_eq!(c.option_reply(proto::OPT_ABORT).0, proto::REP_ACK);
    assert!(c.closed());
    // Unknown client flags close the connection.
    let mut c = Client::connect(&s.sock, 0x80);
    assert!(c.closed());
}

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

#[test]
fn bind_stop_and_stale_sockets() {
    let m: Arc<dyn Export> = Arc::new(MemExport::new(MIB));
    let mut s = Served::start(vec![("x", m.clone())]);

    // A second server on a live socket is refused.
    assert!(Server::bind(&s.sock, vec![("y".into(), m.clone())]).is_err());

    // An idle client in transmission does not keep the server from stopping.
    let mut c = Client::connect(&s.sock, 3);
    let mut go = string("x");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(proto::OPT_GO, &go);
    while c.option_reply(proto::OPT_GO).0 != proto::REP_ACK {}
    let t0 = Instant::now();
    s.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "stop took {:?}",
        t0.elapsed()
    );
    assert!(!s.sock.exists(), "socket file removed");
    assert!(c.closed());

    // A stale socket file (nobody listening) is replaced.
    let stale = s.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = Server::bind(&stale, vec![("x".into(), m.clone())]).expect("bind over stale");
    drop(server);
    assert!(!stale.exists(), "dropping the server removes its socket");

    // A regular file is not replaced.
    let file = s.path("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(Server::bind(&file, vec![("x".into(), m)]).is_err());
}

// ---------------------------------------------------------------------------
// Limits (issue #9 item 5) and the client's timeouts (item 6)
// ---------------------------------------------------------------------------

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

/// Waits until the server closes `s` (a read returns 0 or fails); how long it took, or
/// `None` if it was still open after `limit`.
fn closed_within(s: &mut UnixStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 256];
    while t0.elapsed() < limit {
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    None
}

/// A simple-reply read of 4 KiB at `offset` on a client in transmission: its data.
fn read4k(c: &mut Client, cookie: u64, offset: u64) -> Vec<u8> {
    c.request(proto::CMD_READ, 0, cookie, offset, 4096);
    assert_eq!(c.simple(), (0, cookie));
    c.bytes(4096)
}

#[test]
fn handshake_timeout_drops_silent_and_trickling_clients() {
    let m: Arc<dyn Export> = Arc::new(MemExport::from_vec(pattern(MIB, 9)));
    let limits = Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let s = Served::start_with(vec![("x", m)], limits);

    // In transmission, the handshake timeout no longer applies.
    let mut ok = Client::connect(&s.sock, 3);
    assert_eq!(go(&mut ok, "x"), proto::REP_ACK);

    // Silent after the greeting.
    let mut silent = Client::connect(&s.sock, 3);
    // Trickling: a byte of option header every 100 ms, never a whole option.
    let mut trickle = Client::connect(&s.sock, 3);
    let t0 = Instant::now();
    let trickler = std::thread::spawn(move || {
        for b in proto::IHAVEOPT.to_be_bytes().iter().cycle().take(30) {
            if trickle.s.write_all(&[*b]).is_err() {
                return t0.elapsed();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        closed_within(&mut trickle.s, Duration::ZERO).map_or(Duration::MAX, |_| t0.elapsed())
    });
    let took = closed_within(&mut silent.s, Duration::from_secs(5))
        .expect("a silent client is dropped after the handshake timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "silent client dropped after {took:?}"
    );
    let trickled = trickler.join().unwrap();
    assert!(
        trickled < Duration::from_millis(1500),
        "trickling client dropped after {trickled:?}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read4k(&mut ok, 1, 0), pattern(MIB, 9)[..4096]);
}

#[test]
fn connection_limits_refuse_excess_and_keep_established() {
    let data = pattern(MIB, 10);
    let m: Arc<dyn Export> = Arc::new(MemExport::from_vec(data.clone()));
    let limits = Limits {
        max_connections: 3,
        max_connections_per_export: 2,
        ..Limits::default()
    };
    let s = Served::start_with(vec![("x", m.clone()), ("y", m)], limits);
    let mut a = Client::connect(&s.sock, 3);
    assert_eq!(go(&mut a, "x"), proto::REP_ACK);
    let mut b = Client::connect(&s.sock, 3);
    assert_eq!(go(&mut b, "x"), proto::REP_ACK);
    // A third on "x" is refused, cleanly: the negotiation goes on, "y" is still open.
    let mut c = Client::connect(&s.sock, 3);
    assert_eq!(go(&mut c, "x"), proto::REP_ERR_POLICY);

    // Beyond the total: closed at once, before the greeting; many of them.
    for _ in 0..50 {
        let mut d = UnixStream::connect(&s.sock).expect("connect");
        let took = closed_within(&mut d, Duration::from_secs(2)).expect("closed");
        assert!(
            took < Duration::from_millis(500),
            "excess closed after {took:?}"
        );
    }
    // The established clients are served all along.
    assert_eq!(read4k(&mut a, 1, 8192), data[8192..12288]);
    assert_eq!(read4k(&mut b, 2, 0), data[..4096]);

    // A slot freed on "x" is taken by the client still haggling.
    drop(b);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(go(&mut c, "x"), proto::REP_ACK);
    assert_eq!(read4k(&mut c, 3, 4096), data[4096..8192]);
    assert_eq!(read4k(&mut a, 4, 4096), data[4096..8192]);
}

static SLOW_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[test]
fn queued_work_is_dropped_when_the_client_goes_away() {
    use std::sync::atomic::Ordering::SeqCst;
    let slow: Arc<dyn Export> = Arc::new(Hooked(MemExport::new(16 * MIB), |_, _| {
        SLOW_READS.fetch_add(1, SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        Ok(())
    }));
    let s = Served::start(vec![("slow", slow)]);
    let mut c = Client::connect(&s.sock, 3);
    assert_eq!(go(&mut c, "slow"), proto::REP_ACK);
    // 2,000 reads (10 s of work on 4 workers), then the client leaves.
    let mut batch = Vec::new();
    for i in 0..2000u64 {
        let r = Request {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: i,
            offset: (i % 256) * 64 * KIB,
            length: 64 * KIB as u32,
        };
        batch.extend_from_slice(&r.encode());
    }
    c.s.write_all(&batch).unwrap();
    drop(c);
    let t0 = Instant::now();
    let mut last = SLOW_READS.load(SeqCst);
    let idle = loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = SLOW_READS.load(SeqCst);
        if now == last {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "never idle");
        last = now;
    };
    eprintln!("served {last} of 2000 queued reads; idle after {idle:?}");
    assert!(last < 100, "{last} reads served for a client that left");
    assert!(idle < Duration::from_millis(1000), "idle after {idle:?}");
}

#[test]
fn a_panicking_connection_stops_the_server_with_an_error() {
    let bomb: Arc<dyn Export> = Arc::new(Hooked(MemExport::new(MIB), |_, _| {
        panic!("export bug (expected by the test)")
    }));
    let mut s = Served::start(vec![("bomb", bomb)]);
    let mut c = Client::connect(&s.sock, 3);
    assert_eq!(go(&mut c, "bomb"), proto::REP_ACK);
    c.request(proto::CMD_READ, 0, 1, 0, 4096);
    assert!(c.closed());
    let t0 = Instant::now();
    let ran = s.thread.take().unwrap().join().expect("run returns");
    let err = ran.expect_err("run reports the panic");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(!s.sock.exists(), "socket file removed");
}

#[test]
fn client_times_out_on_a_dead_storage_node() {
    let dir = tempfile::tempdir().unwrap();
    // A node that accepts and never answers.
    let sock = dir.path().join("dead.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let uri = format!("nbd+unix:///base?socket={}", sock.display());
    let short = Timeouts {
        connect: Duration::from_millis(500),
        io: Duration::from_millis(500),
    };
    let t0 = Instant::now();
    assert!(NbdStorage::connect_with(&uri, short).is_err());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "handshake gave up after {took:?}"
    );
    // The defaults give up within a few seconds too.
    let t0 = Instant::now();
    assert!(NbdStorage::connect(&uri).is_err());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "default gave up after {took:?}"
    );

    // A node that answers the handshake, then hangs on a read.
    let hang: Arc<dyn Export> = Arc::new(Hooked(
        MemExport::from_vec(pattern(2 * MIB, 3)),
        |off, _| {
            if off >= MIB {
                std::thread::sleep(Duration::from_secs(3));
            }
            Ok(())
        },
    ));
    let s = Served::start(vec![("hang", hang)]);
    let st = NbdStorage::connect_with(&s.uri("hang"), short).expect("connect");
    use vmicache::engine::storage::Storage;
    let mut buf = vec![0u8; 4096];
    st.read_at(&mut buf, 0).expect("a quick read");
    assert_eq!(buf, pattern(2 * MIB, 3)[..4096]);
    let t0 = Instant::now();
    assert!(st.read_at(&mut buf, MIB).is_err());
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "read gave up after {took:?}"
    );
}
