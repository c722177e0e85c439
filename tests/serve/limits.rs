//! Limits and stopping (issues #9 item 5 and #15).

use super::*;

/// A raw NBD client in transmission on `export` (simple replies).
fn transmission_client(sock: &Path, export: &str) -> UnixStream {
    use vmicache::nbd::proto;
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    let mut out = 3u32.to_be_bytes().to_vec();
    out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    out.extend_from_slice(&(export.len() as u32 + 6).to_be_bytes());
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&out).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut d).unwrap();
        assert_eq!(typ & proto::REP_ERR, 0, "GO refused");
        if typ == proto::REP_ACK {
            return s;
        }
    }
}

/// Sends `n` reads of the whole 16 MiB disk and never reads a reply.
fn hog(sock: &Path, n: u64) -> UnixStream {
    let mut s = transmission_client(sock, "vm1");
    let mut b = Vec::new();
    for i in 0..n {
        let r = vmicache::nbd::proto::Request {
            flags: 0,
            typ: vmicache::nbd::proto::CMD_READ,
            cookie: i,
            offset: 0,
            length: SIZE as u32,
        };
        b.extend_from_slice(&r.encode());
    }
    s.write_all(&b).unwrap();
    s
}

/// (VmHWM, VmRSS) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            << 10
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn sigterm(c: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// Waits for `c` to exit; its status and how long it took.
fn wait_exit(c: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return (st, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            panic!("still running {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const HOGS: usize = 6;

/// Serves with `--max-queued-reply-bytes budget` while HOGS clients queue 16 MiB reads and
/// never read replies and two clients stay silent; a well-behaved qemu-img compare must
/// succeed meanwhile. Then SIGTERM. Returns (peak RSS before, peak RSS with the hogs,
/// SIGTERM to exit).
fn misbehaving_clients(budget: &str) -> (u64, u64, Duration) {
    let s = setup("0");
    let mut srv = bin()
        .args(["serve", ps(&s.inst), "--socket", ps(&s.sock)])
        .args([
            "--max-queued-reply-bytes",
            budget,
            "--handshake-timeout",
            "2",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_socket(&s.sock, &mut srv);
    let compare = || compare_with_base(&uri(&s, "vm1"), &s);
    compare();
    let (before, _) = memory(srv.id());
    let silent: Vec<UnixStream> = (0..2)
        .map(|_| UnixStream::connect(&s.sock).unwrap())
        .collect();
    let hogs: Vec<UnixStream> = (0..HOGS).map(|_| hog(&s.sock, 64)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    compare();
    let (peak, _) = memory(srv.id());
    sigterm(&srv);
    let (st, took) = wait_exit(&mut srv, Duration::from_secs(30));
    assert!(st.success(), "serve: {st}");
    assert!(!s.sock.exists(), "socket left behind");
    check_clean(&s.inst);
    drop((silent, hogs));
    (before, peak, took)
}

#[test]
fn misbehaving_clients_cost_bounded_memory_and_sigterm_is_prompt() {
    const MIB: u64 = 1 << 20;
    let (before, peak, took) = misbehaving_clients("16M");
    let (u_before, u_peak, u_took) = misbehaving_clients("1G");
    eprintln!(
        "{HOGS} clients queueing 16 MiB reads: peak RSS {} -> {} MiB with 16 MiB per connection \
         (SIGTERM answered in {took:?}); {} -> {} MiB with 1 GiB (SIGTERM {u_took:?})",
        before / MIB,
        peak / MIB,
        u_before / MIB,
        u_peak / MIB
    );
    // One 16 MiB reply held per misbehaving connection, plus slack.
    let cap = HOGS as u64 * 16 * MIB + 48 * MIB;
    assert!(
        peak < before + cap,
        "peak RSS {} MiB over {} + {} MiB",
        peak / MIB,
        before / MIB,
        cap / MIB
    );
    // Without the limit (4 workers per connection) the same clients cost far more.
    assert!(u_peak - u_before > peak - before + 64 * MIB);
    assert!(
        took < Duration::from_secs(2),
        "SIGTERM answered in {took:?}"
    );
    assert!(
        u_took < Duration::from_secs(2),
        "SIGTERM answered in {u_took:?}"
    );
}

/// Start `cmd` with its output piped, read one byte of stderr and close both pipes: like a
/// log reader (`| head -c 1`) that went away.
fn spawn_then_lose_output(cmd: &mut std::process::Command) -> std::process::Child {
    let mut c = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = c.stderr.take().unwrap();
    let mut one = [0u8; 1];
    err.read_exact(&mut one).unwrap();
    drop(err);
    drop(c.stdout.take());
    c
}

/// #15: a server whose stdout and stderr readers went away still stops on SIGTERM, flushes
/// its instance and removes its socket.
#[test]
fn serve_with_closed_output_stops_on_sigterm() {
    let s = setup("0");
    let mut srv =
        spawn_then_lose_output(bin().args(["serve", ps(&s.inst), "--socket", ps(&s.sock)]));
    wait_socket(&s.sock, &mut srv);
    // Some writes, so that there is something to flush.
    run(tool("qemu-io").args(["-f", "raw", "-c", "write -P 7 1M 64k", &uri(&s, "vm1")]));
    sigterm(&srv);
    let (st, took) = wait_exit(&mut srv, Duration::from_secs(10));
    assert!(took < Duration::from_secs(1), "stopped after {took:?}");
    assert!(st.success(), "serve: {st}");
    assert!(!s.sock.exists(), "socket left behind");
    check_clean(&s.inst);
}

/// #15 for `warm --boot`: with its output gone, SIGTERM still stops it at once, the boot
/// command is killed and the temporary instance and socket are removed.
#[test]
fn warm_boot_with_closed_output_stops_on_sigterm() {
    let s = setup("0");
    let tmp = s.dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut w = spawn_then_lose_output(
        bin()
            .args(["warm", ps(&s.cache), "--boot", "--", "sleep", "30"])
            .env("TMPDIR", &tmp),
    );
    let boot_dir = tmp.join(format!("vmicache-boot-{}", w.id()));
    wait_socket(&boot_dir.join("nbd.sock"), &mut w);
    sigterm(&w);
    let (st, took) = wait_exit(&mut w, Duration::from_secs(10));
    assert!(took < Duration::from_secs(1), "stopped after {took:?}");
    assert!(!st.success(), "an interrupted warm --boot fails: {st}");
    assert!(!boot_dir.exists(), "{} left behind", boot_dir.display());
    check_clean(&s.cache);
}
