//! A client sending arbitrary bytes to the NBD server, through the handshake into
//! transmission, over a socket pair: errors and dropped connections are fine; a panic (of the
//! connection or of one of its workers), a hang or unbounded memory is not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use vmicache::nbd::{Export, Limits, MemExport, Server};

static SERVER: OnceLock<Server> = OnceLock::new();

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vmicache-fuzz-nbd-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let exports: Vec<(String, Arc<dyn Export>)> = vec![
            (String::new(), Arc::new(MemExport::new(1 << 20))),
            (
                "ro".into(),
                Arc::new(MemExport::new(64 << 10).with_read_only(true)),
            ),
        ];
        let limits = Limits {
            handshake_timeout: Duration::from_secs(2),
            max_queued_reply_bytes: 4 << 20,
            ..Limits::default()
        };
        Server::bind_with(&dir.join("s.sock"), exports, limits).expect("bind")
    })
}

fuzz_target!(|data: &[u8]| {
    let srv = server();
    let (client, conn) = UnixStream::pair().expect("socketpair");
    let mut rd = client.try_clone().expect("dup");
    let input = data.to_vec();
    // Write and read on separate threads: a client that only writes would block the server
    // on its replies, which is the server's right.
    let w = std::thread::spawn(move || {
        let mut client = client;
        let _ = client.write_all(&input);
        let _ = client.shutdown(std::net::Shutdown::Write);
    });
    let r = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = rd.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
    });
    srv.serve_stream(conn);
    let _ = w.join();
    let _ = r.join();
});
