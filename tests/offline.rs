//! Offline and outage-proof caches (issue #11): a sealed cache never contacts its base for
//! verification, `inspect` works with the base down, `serve` of a sealed chain starts with the
//! base down, answers what the cache lacks with EIO at once during an outage, and reconnects
//! when the base comes back. The base is always nbdkit (not our code), whose log filter counts
//! what was read from it.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SIZE: u64 = 16 * MIB;

/// A raw base with data at 0..1M (0x11) and 8M..9M (0x22), served by nbdkit with its log
/// filter; a cache over the NBD base holding 0..1M, sealed.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> (Setup, Proc) {
        let s = Setup {
            dir: tempfile::tempdir().unwrap(),
        };
        let mut b = vec![0u8; SIZE as usize];
        b[..MIB as usize].fill(0x11);
        b[8 * MIB as usize..9 * MIB as usize].fill(0x22);
        std::fs::write(s.p("base.raw"), b).unwrap();
        let srv = s.nbdkit();
        let uri = s.base_uri();
        run(bin().args(["build", &uri, "-o", ps(&s.p("c.qcow2")), "-q"]));
        qemu_io(&s.p("c.qcow2"), &["-f", "qcow2", "-C"], &["read -q 0 1M"]);
        run(bin().args(["seal", ps(&s.p("c.qcow2")), "-q"]));
        (s, srv)
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn base_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.p("base.sock").display())
    }
    /// (Re)start the base's nbdkit with a fresh read log.
    fn nbdkit(&self) -> Proc {
        let _ = std::fs::remove_file(self.p("reads.log"));
        let log = format!("logfile={}", self.p("reads.log").display());
        nbdkit(
            &self.p("base.sock"),
            &["--filter=log"],
            &self.p("base.raw"),
            &[&log],
        )
    }
    /// Bytes nbdkit says were read from the base since it started.
    fn base_bytes_read(&self) -> u64 {
        let log = std::fs::read_to_string(self.p("reads.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains(" Read "))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("count="))
                    .and_then(|c| u64::from_str_radix(c.trim_start_matches("0x"), 16).ok())
            })
            .sum()
    }
}

fn nbd_read(sock: &Path, cmd: &str) -> (bool, Duration, String) {
    let t = Instant::now();
    let out = run_status(tool("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        cmd,
        &format!("nbd+unix:///?socket={}", sock.display()),
    ]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success()
        && !text.contains("failed")
        && !text.contains("Pattern verification failed");
    (ok, t.elapsed(), text)
}

fn serve(inst: &Path, sock: &Path) -> Proc {
    let mut c = bin()
        .args(["serve", ps(inst), "--socket", ps(sock), "-q"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(sock, &mut c, "vmicache serve");
    Proc(Some(c))
}

#[test]
fn sealed_caches_read_nothing_from_the_base_to_chain_and_serve() {
    let (s, base) = Setup::new();
    let before = s.base_bytes_read();
    run(bin().args(["chain", ps(&s.p("c.qcow2")), "-o", ps(&s.p("i.qcow2"))]));
    let srv = serve(&s.p("i.qcow2"), &s.p("vm.sock"));
    let (ok, _, text) = nbd_read(&s.p("vm.sock"), "read -P 0x11 0 1M");
    assert!(ok, "{text}");
    srv.stop();
    assert_eq!(s.base_bytes_read(), before, "chain/serve read the base");
    // (inspect does reach the base when it is up, to show its layers and coverage.)
    // --verify does read it (the fingerprint: about 1 MiB).
    run(bin().args([
        "chain",
        "--verify",
        ps(&s.p("c.qcow2")),
        "-o",
        ps(&s.p("i2.qcow2")),
    ]));
    assert!(s.base_bytes_read() > before);
    base.stop();
}

#[test]
fn inspect_and_serve_with_the_base_down() {
    let (s, base) = Setup::new();
    run(bin().args(["chain", ps(&s.p("c.qcow2")), "-o", ps(&s.p("i.qcow2"))]));
    run(bin().args(["build", &s.base_uri(), "-o", ps(&s.p("u.qcow2")), "-q"]));
    run(bin().args([
        "chain",
        ps(&s.p("u.qcow2")),
        "-o",
        ps(&s.p("u-i.qcow2")),
        "-q",
    ]));
    base.stop();
    let _ = std::fs::remove_file(s.p("base.sock"));
    // inspect: exit 0, the base unreachable, the identity check not done.
    let out = run(bin().args(["inspect", "--json", ps(&s.p("i.qcow2"))]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = j["layers"].as_array().unwrap();
    assert!(layers[2]["unreachable"].as_str().is_some(), "{j:#}");
    assert!(
        j["cache"]["base-check"]
            .as_str()
            .unwrap()
            .starts_with("not done"),
        "{j:#}"
    );
    assert_eq!(j["cache"]["cached-bytes"], MIB);
    let out = run(bin().args(["inspect", "--map", ps(&s.p("c.qcow2"))]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("base unreachable"));
    // A cache being filled still needs its base, and serving one says so.
    let out = run_status(bin().args([
        "serve",
        ps(&s.p("u-i.qcow2")),
        "--socket",
        ps(&s.p("u.sock")),
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("base.sock") && err.lines().count() == 1,
        "{err}"
    );
    // inspect of it works all the same.
    let out = run(bin().args(["inspect", ps(&s.p("u-i.qcow2"))]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unreachable"));
    // serve starts, cached reads work, an uncached read fails at once.
    let srv = serve(&s.p("i.qcow2"), &s.p("vm.sock"));
    let (ok, _, text) = nbd_read(&s.p("vm.sock"), "read -P 0x11 0 1M");
    assert!(ok, "{text}");
    let (ok, took, text) = nbd_read(&s.p("vm.sock"), "read 8M 4k");
    assert!(!ok && text.contains("Input/output error"), "{text}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    srv.stop();
}

#[test]
fn a_base_outage_under_a_running_server() {
    let (s, base) = Setup::new();
    run(bin().args(["chain", ps(&s.p("c.qcow2")), "-o", ps(&s.p("i.qcow2"))]));
    let srv = serve(&s.p("i.qcow2"), &s.p("vm.sock"));
    // Up: an uncached read goes to the base.
    let (ok, _, text) = nbd_read(&s.p("vm.sock"), "read -P 0x22 8M 4k");
    assert!(ok, "{text}");
    // Down (the storage node dies: SIGKILL; nbdkit waits for its clients on SIGTERM): it
    // fails, at once; what the cache holds still reads.
    drop(base);
    for _ in 0..3 {
        let (ok, took, text) = nbd_read(&s.p("vm.sock"), "read 8392704 4k");
        assert!(!ok && text.contains("Input/output error"), "{text}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
    let (ok, _, text) = nbd_read(&s.p("vm.sock"), "read -P 0x11 0 1M");
    assert!(ok, "{text}");
    // Back: reads of uncached ranges succeed again (after the backoff).
    let base = s.nbdkit();
    let t = Instant::now();
    loop {
        let (ok, _, text) = nbd_read(&s.p("vm.sock"), "read -P 0x22 8454144 4k");
        if ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "never reconnected: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    srv.stop();
    // Nothing was written to the sealed cache, and the instance is clean (qemu-img check
    // opens the chain: the base is up again).
    check_clean(&s.p("i.qcow2"));
    check_clean(&s.p("c.qcow2"));
    base.stop();
}
