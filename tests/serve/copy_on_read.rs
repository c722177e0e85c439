//! Copy-on-read through NBD: what reads fill, concurrent readers, quota, locks, traces,
//! kill -9, pass-through.

use super::*;

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
    compare_with_base(&u, &s);
    compare_with_base(&u, &s);
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
    compare_with_base(&uri(&s, "vm1"), &s);
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
        let _ = srv.take().wait_with_output();
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
    let c = Served::spawn(
        bin()
            .args([
                "serve",
                ps(&inst2),
                "--socket",
                ps(&sock2),
                "--pass-through-if-busy",
            ])
            .stderr(Stdio::piped()),
        &sock2,
    );
    let before = std::fs::read(&s.cache).unwrap();
    let u2 = format!("nbd+unix:///vm2?socket={}", sock2.display());
    compare_with_base(&u2, &s);
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
