//! Server lifecycle.

use super::*;

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
