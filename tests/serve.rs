//! `vmicache serve`: NBD over the chain with copy-on-read into the cache, checked with real
//! peers (qemu-img, qemu-io, nbdinfo). Needs libnbd-bin (tools/test.sh installs it).

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vmicache::engine::cor::Cor;
use vmicache::engine::{Image, OpenOptions};

const SIZE: usize = 16 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    base: PathBuf,
    cache: PathBuf,
    inst: PathBuf,
    sock: PathBuf,
}

fn setup(quota: &str) -> Setup {
    setup_with(quota, false)
}

/// A 16 MiB base with data in 0..6M and 10M..11M, zeros elsewhere (holes when `sparse`, else
/// written zeros), a cache over it with `quota`, and an instance over the cache.
fn setup_with(quota: &str, sparse: bool) -> Setup {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let base = dir.join("base.raw");
    let mut data = vec![0u8; SIZE];
    data[..6 << 20].copy_from_slice(&pattern(11, 6 << 20));
    data[10 << 20..11 << 20].copy_from_slice(&pattern(12, 1 << 20));
    if sparse {
        std::fs::File::create(&base)
            .unwrap()
            .set_len(SIZE as u64)
            .unwrap();
        write_at(&base, 0, &data[..6 << 20]);
        write_at(&base, 10 << 20, &data[10 << 20..11 << 20]);
    } else {
        std::fs::write(&base, data).unwrap();
    }
    let cache = dir.join("cache.qcow2");
    let inst = dir.join("vm1.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "--quota", quota]));
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    let sock = dir.join("nbd.sock");
    Setup {
        _dir: d,
        dir,
        base,
        cache,
        inst,
        sock,
    }
}

fn uri(s: &Setup, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", s.sock.display())
}

fn wait_socket(p: &Path, child: &mut Child) {
    let t = Instant::now();
    while !p.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("serve exited early: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(s: &Setup, extra: &[&str]) -> Child {
    let mut c = bin()
        .args(["serve", ps(&s.inst), "--socket", ps(&s.sock)])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_socket(&s.sock, &mut c);
    c
}

fn stop(c: Child) -> String {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "serve failed: {err}");
    err
}

/// (cluster, zero) allocated at depth 0 in `img` per qemu-img map.
fn depth0(img: &Path) -> Vec<(u64, bool)> {
    let m = qemu_img_json(&["map", "--output=json", "-U", ps(img)]);
    let mut v = Vec::new();
    for e in m.as_array().unwrap() {
        if e["depth"] == 0 && e["present"] == true {
            let (st, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for c in st / 65536..(st + l).div_ceil(65536) {
                v.push((c, e["zero"] == true));
            }
        }
    }
    v
}

#[test]
fn reads_fill_exactly_what_was_read_and_writes_stay_in_instance() {
    let s = setup("0");
    let srv = serve(&s, &[]);
    let u = uri(&s, "vm1");
    // Partial reads: clusters 0, 16..=17 (data) and 200 (zeros in the base).
    qemu_io(
        Path::new(&u),
        &["-f", "raw"],
        &[
            "read -q 0 65536",
            "read -q 1048576 100000",
            "read -q 13107200 512",
        ],
    );
    // A write lands in the instance only.
    qemu_io(
        Path::new(&u),
        &["-f", "raw"],
        &["write -q -P 0x5a 4194304 65536"],
    );
    let info = run(tool("nbdinfo").args(["--map", &u]));
    assert!(!info.stdout.is_empty());
    stop(srv);
    check_clean(&s.cache);
    check_clean(&s.inst);
    assert_eq!(
        depth0(&s.cache),
        vec![(0, false), (16, false), (17, false), (200, true)]
    );
    assert_eq!(depth0(&s.inst), vec![(64, false)]);
    // Content: the instance reads as the base with the one write.
    let mut want = std::fs::read(&s.base).unwrap();
    want[4 << 20..(4 << 20) + 65536].fill(0x5a);
    assert_bytes_eq("instance", &to_raw(&s.inst), &want);
    // Stats recorded in the cache.
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(&s.cache)])).stdout)
            .unwrap();
    assert_eq!(j["cache"]["state"], "warming");
}

#[test]
fn compare_through_nbd_and_full_read_fills_cache() {
    // The base file fully written (no holes): all of it is read once, and every cluster is
    // now in the cache: data where the base has data, zero clusters elsewhere.
    let (s, err) = compare_twice(false);
    assert!(err.contains("read 16 MiB from the base"), "{err}");
    let c = depth0(&s.cache);
    assert_eq!(c.len(), SIZE / 65536);
    assert_eq!(c.iter().filter(|x| !x.1).count(), 96 + 16);
}

#[test]
fn compare_through_nbd_fills_the_data_of_a_sparse_base() {
    // qemu-img compare asks block status first and skips what both sides report as zero:
    // the base's holes are never read, so only its 7 MiB of data is fetched and cached.
    let (s, err) = compare_twice(true);
    assert!(err.contains("read 7 MiB from the base"), "{err}");
    assert_eq!(
        depth0(&s.cache),
        (0..96)
            .chain(160..176)
            .map(|c| (c, false))
            .collect::<Vec<_>>()
    );
}

/// Two `qemu-img compare` passes through NBD against the base, then the same between the
/// cache and the base; both images clean. Returns serve's log.
fn compare_twice(sparse: bool) -> (Setup, String) {
    let s = setup_with("0", sparse);
    let srv = serve(&s, &[]);
    let u = uri(&s, "vm1");
    run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &u, ps(&s.base)]));
    run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &u, ps(&s.base)]));
    let err = stop(srv);
    check_clean(&s.cache);
    check_clean(&s.inst);
    run(tool("qemu-img").args(["compare", ps(&s.cache), ps(&s.base)]));
    (s, err)
}

#[test]
fn concurrent_readers_copy_each_cluster_once() {
    let s = setup("0");
    let cache = std::sync::Arc::new(Image::open(&s.cache, &OpenOptions::read_write()).unwrap());
    let q = cache.as_qcow2().unwrap();
    Cor::enable(&cache, 0, false).unwrap();
    let want = std::fs::read(&s.base).unwrap();
    std::thread::scope(|sc| {
        for t in 0..8u64 {
            let (cache, want) = (&cache, &want);
            sc.spawn(move || {
                for k in 0..40u64 {
                    let off = ((k * 7 + t) % 64) * 32768 + (t * 512);
                    let mut b = vec![0u8; 100_000];
                    cache.read_at(&mut b, off).unwrap();
                    assert_eq!(&b[..], &want[off as usize..off as usize + b.len()]);
                }
            });
        }
    });
    let st = &Cor::of(&cache).unwrap().stats;
    let data = st.data_clusters.load(std::sync::atomic::Ordering::Relaxed);
    let base = st.base_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let alloc = q.allocated_clusters().unwrap();
    assert_eq!(data, alloc.data, "each cluster stored once");
    assert_eq!(
        base,
        (alloc.data + alloc.zero) * 65536,
        "each cluster read from the base once"
    );
    drop(cache);
    check_clean(&s.cache);
}

#[test]
fn quota_passes_reads_through() {
    let s = setup("256K");
    let srv = serve(&s, &[]);
    run(tool("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        &uri(&s, "vm1"),
        ps(&s.base),
    ]));
    stop(srv);
    check_clean(&s.cache);
    let img = Image::open(&s.cache, &OpenOptions::read_only()).unwrap();
    let a = img.as_qcow2().unwrap().allocated_clusters().unwrap();
    assert!(a.data * 65536 <= 256 << 10, "{a:?}");
}

#[test]
fn locks_refuse_second_writer() {
    let s = setup("0");
    let srv = serve(&s, &[]);
    // A second server over the same cache.
    let inst2 = s.dir.join("vm2.qcow2");
    run(bin().args(["chain", ps(&s.cache), "-o", ps(&inst2)]));
    let out = run_status(bin().args(["serve", ps(&inst2), "--socket", ps(&s.dir.join("b.sock"))]));
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("lock") && e.lines().count() == 1, "{e}");
    // QEMU refuses to open the cache for writing.
    let out = run_status(tool("qemu-io").args(["-f", "qcow2", "-c", "write 0 512", ps(&s.cache)]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
    // Our own writers respect the lock too: warm, seal and leak repair of a served cache.
    for args in [
        vec!["warm", ps(&s.cache), "--full"],
        vec!["seal", ps(&s.cache)],
        vec!["check", "--repair", "leaks", ps(&s.cache)],
    ] {
        let out = run_status(bin().args(&args));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("lock"),
            "{args:?}"
        );
    }
    // ... but inspecting with -U works, and so does our inspect.
    qemu_img(&["info", "-U", ps(&s.cache)]);
    run(bin().args(["inspect", ps(&s.cache)]));
    stop(srv);
}

/// Serves with `--record`, runs the qemu-io `cmds` through NBD, then replays the trace into a
/// fresh cache: both caches hold the same clusters (returned) and are clean.
fn record_and_replay(s: &Setup, cmds: &[&str]) -> Vec<(u64, bool)> {
    let trace = s.dir.join("boot.trace");
    let srv = serve(s, &["--record", ps(&trace)]);
    qemu_io(Path::new(&uri(s, "vm1")), &["-f", "raw"], cmds);
    stop(srv);
    check_clean(&s.cache);
    let recorded = depth0(&s.cache);
    let cache2 = s.dir.join("cache2.qcow2");
    run(bin().args(["build", ps(&s.base), "-o", ps(&cache2)]));
    run(bin().args(["warm", ps(&cache2), "--trace", ps(&trace)]));
    assert_eq!(depth0(&cache2), recorded);
    check_clean(&cache2);
    recorded
}

/// Reads of holes of the base while the cache fills: QEMU gets them as hole chunks from the
/// cache's zero clusters, not from the base's metadata, so the cache stores zero clusters there
/// and the trace records the reads (a replay caches the same).
#[test]
fn base_holes_read_while_filling_become_zero_clusters_and_are_traced() {
    let s = setup_with("0", true);
    let cmds = ["read -q -P 0 13107200 65536", "read -q 0 65536"];
    assert_eq!(record_and_replay(&s, &cmds), vec![(0, false), (200, true)]);
}

#[test]
fn recorded_trace_replays_to_the_same_cache() {
    let s = setup("0");
    let cmds = [
        "read -q 0 300000",
        "read -q 10485760 8192",
        "write -q -P 1 2097152 1000",
        "read -q 15000000 70000",
    ];
    assert!(!record_and_replay(&s, &cmds).is_empty());
}

#[test]
fn kill_9_during_copy_on_read_leaves_consistent_images() {
    for round in 0..6u64 {
        let s = setup("0");
        let srv = serve(&s, &[]);
        let u = uri(&s, "vm1");
        let mut client = tool("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &u,
                ps(&s.dir.join("out.raw")),
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20 + round * 37));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(srv.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = client.wait();
        let _ = srv.wait_with_output();
        for img in [&s.cache, &s.inst] {
            let out = run_status(tool("qemu-img").args(["check", "--output=json", ps(img)]));
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                j.get("corruptions").and_then(|v| v.as_u64()).unwrap_or(0),
                0,
                "round {round}: {j}"
            );
            if j.get("leaks").and_then(|v| v.as_u64()).unwrap_or(0) > 0 {
                run(bin().args(["check", "--repair", "leaks", ps(img)]));
            }
            check_clean(img);
        }
        // Whatever the cache holds is right.
        let _ = std::fs::remove_file(&s.sock);
        run(tool("qemu-img").args(["compare", ps(&s.cache), ps(&s.base)]));
    }
}

#[test]
fn second_server_passes_through_when_asked() {
    let s = setup("0");
    let srv = serve(&s, &[]);
    let inst2 = s.dir.join("vm2.qcow2");
    run(bin().args(["chain", ps(&s.cache), "-o", ps(&inst2)]));
    let sock2 = s.dir.join("b.sock");
    let mut c = bin()
        .args([
            "serve",
            ps(&inst2),
            "--socket",
            ps(&sock2),
            "--pass-through-if-busy",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_socket(&sock2, &mut c);
    let before = std::fs::read(&s.cache).unwrap();
    let u2 = format!("nbd+unix:///vm2?socket={}", sock2.display());
    run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &u2, ps(&s.base)]));
    let err = stop(c);
    assert!(err.contains("pass through"), "{err}");
    assert_eq!(
        before,
        std::fs::read(&s.cache).unwrap(),
        "the busy cache was touched"
    );
    stop(srv);
    check_clean(&s.cache);
    check_clean(&inst2);
}

// ---------------------------------------------------------------------------
// Limits and stopping (issues #9 item 5 and #15)
// ---------------------------------------------------------------------------

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
    let compare = || {
        run(tool("qemu-img").args([
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri(&s, "vm1"),
            ps(&s.base),
        ]))
    };
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
