//! `vmicache warm`: replaying a trace stores exactly the traced clusters (data as data, zeros as
//! zero clusters), reads nothing twice, respects the quota, and never touches a sealed cache.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vmicache::chain::trace::Trace;
use vmicache::engine::{Image, OpenOptions};

const SIZE: usize = 32 << 20;

fn setup(dir: &Path, quota: &str) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let mut d = vec![0u8; SIZE];
    d[..8 << 20].copy_from_slice(&pattern(5, 8 << 20));
    d[20 << 20..21 << 20].copy_from_slice(&pattern(6, 1 << 20));
    std::fs::write(&base, d).unwrap();
    let cache = dir.join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "--quota", quota]));
    (base, cache)
}

fn trace_for(cache: &Path, reads: Vec<(u64, u64)>) -> PathBuf {
    let img = Image::open(cache, &OpenOptions::read_only()).unwrap();
    let id = img
        .as_qcow2()
        .unwrap()
        .cache_meta()
        .unwrap()
        .unwrap()
        .base
        .unwrap();
    let t = Trace {
        base_size: id.virtual_size,
        base_fingerprint: id.fingerprint,
        reads,
    };
    let p = cache.with_extension("trace");
    t.save(&p).unwrap();
    p
}

fn warm_json(cache: &Path, trace: &Path) -> serde_json::Value {
    let out = run(bin().args(["warm", ps(cache), "--trace", ps(trace), "--json"]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Clusters (64 KiB) allocated at depth 0 according to qemu-img map, with their zero flag.
fn cached_clusters(cache: &Path) -> Vec<(u64, bool)> {
    let m = qemu_img_json(&["map", "--output=json", ps(cache)]);
    let mut v = Vec::new();
    for e in m.as_array().unwrap() {
        if e["depth"] == 0 && e["present"] == true {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for c in (s / 65536)..(s + l).div_ceil(65536) {
                v.push((c, e["zero"] == true));
            }
        }
    }
    v
}

#[test]
fn replay_stores_exactly_the_traced_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cache) = setup(dir.path(), "0");
    let reads = vec![
        (0, 4096),
        ((1 << 20) + 100, 200 << 10),
        (20 << 20, 65536),
        (30 << 20, 512),
    ];
    let trace = trace_for(&cache, reads);
    let st = warm_json(&cache, &trace);
    check_clean(&cache);
    // cluster 0; 1 MiB+100 .. +200 KiB covers clusters 16..=19; 20 MiB is cluster 320 (data);
    // 30 MiB is cluster 480, zeros in the base: recorded as a zero cluster.
    let want: Vec<(u64, bool)> = vec![
        (0, false),
        (16, false),
        (17, false),
        (18, false),
        (19, false),
        (320, false),
        (480, true),
    ];
    assert_eq!(cached_clusters(&cache), want);
    assert_eq!(st["data-clusters"], 6);
    assert_eq!(st["zero-clusters"], 1);
    // The cache reads through to the same content as its base.
    run(tool("qemu-img").args(["compare", ps(&cache), ps(&base)]));
    // A second replay reads nothing from the base.
    let st2 = warm_json(&cache, &trace);
    assert_eq!(st2["base-bytes-read"], 0, "{st2}");
    // A fresh cache warmed from the same trace holds the same clusters.
    let cache2 = dir.path().join("cache2.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache2)]));
    warm_json(&cache2, &trace);
    assert_eq!(cached_clusters(&cache2), want);
}

#[test]
fn quota_bounds_stored_data() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cache) = setup(dir.path(), "256K");
    let trace = trace_for(&cache, vec![(0, 8 << 20)]);
    let st = warm_json(&cache, &trace);
    assert_eq!(st["data-clusters"], 4, "{st}");
    check_clean(&cache);
    let img = Image::open(&cache, &OpenOptions::read_only()).unwrap();
    let s = img.as_qcow2().unwrap().allocated_clusters().unwrap();
    assert!(s.data * 65536 <= 256 << 10);
    drop(img);
    run(tool("qemu-img").args(["compare", ps(&cache), ps(&base)]));
}

#[test]
fn full_copy_then_seal_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, cache) = setup(dir.path(), "0");
    let out = run(bin().args(["warm", ps(&cache), "--full", "--json"]));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["data-clusters"], 144, "{st}"); // 8 MiB + 1 MiB of data
    check_clean(&cache);
    run(tool("qemu-img").args(["compare", ps(&cache), ps(&base)]));
    run(bin().args(["seal", ps(&cache)]));
    let before = std::fs::read(&cache).unwrap();
    let out = run_status(bin().args(["warm", ps(&cache), "--full"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sealed"));
    assert_eq!(before, std::fs::read(&cache).unwrap());
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(&cache)])).stdout).unwrap();
    assert_eq!(j["cache"]["state"], "sealed");
    assert_eq!(j["cache"]["coverage"], 1.0);
}

#[test]
fn trace_of_another_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cache) = setup(dir.path(), "0");
    let t = Trace {
        base_size: SIZE as u64,
        base_fingerprint: [9; 32],
        reads: vec![(0, 4096)],
    };
    let p = dir.path().join("other.trace");
    t.save(&p).unwrap();
    let out = run_status(bin().args(["warm", ps(&cache), "--trace", ps(&p)]));
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("another base") && e.lines().count() == 1, "{e}");
}

#[test]
fn base_served_over_nbd() {
    // The base lives on a "storage node": qemu-nbd serves it; the cache names it by URI and our
    // NBD client reads it.
    let dir = tempfile::tempdir().unwrap();
    let (base, cache) = setup(dir.path(), "0");
    let sock = dir.path().join("base.sock");
    let mut nbd = tool("qemu-nbd")
        .args(["-t", "-r", "-f", "raw", "-k", ps(&sock), ps(&base)])
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_img(&["rebase", "-u", "-b", &uri, "-F", "raw", ps(&cache)]);
    let out = run(bin().args(["warm", ps(&cache), "--full", "--json"]));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st["base-bytes-read"].as_u64().unwrap() >= 9 << 20, "{st}");
    check_clean(&cache);
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(&cache)])).stdout).unwrap();
    assert_eq!(j["layers"][1]["path"], uri.as_str());
    assert_eq!(j["cache"]["base-check"], "ok");
    let _ = nbd.kill();
    let _ = nbd.wait();
    // Everything is in the cache now: with the storage node gone, reading it still works
    // where it is complete (zero and data clusters everywhere).
    let img = Image::open(
        &cache,
        &OpenOptions {
            backing: false,
            ..OpenOptions::read_only()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; SIZE];
    img.read_at(&mut buf, 0).unwrap();
    assert_bytes_eq("cache alone", &buf, &std::fs::read(&base).unwrap());
}
