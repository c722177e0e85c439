//! `vmicache seal --compact`: identical clusters shared, clusters compressed (zstd, zlib) or not,
//! zeros as zero clusters; qemu-img is the referee (check clean, compare equal, same map), and
//! our engine, an instance over the compacted cache and `vmicache serve` read the same bytes.
//! A kill -9 at any moment leaves the old cache or the new one.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Guest clusters of the test disk: 0..256 four patterns 64 times each, 256..320 zeros,
/// 320..336 unique random clusters, the rest zeros.
const CLUSTERS: u64 = 512;
const REPEATED: u64 = 256;
const UNIQUE: u64 = 16;

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    cache: PathBuf,
    /// A copy of the sealed cache before compaction (same directory, same backing name).
    before: PathBuf,
}

fn patterns(cs: usize) -> Vec<Vec<u8>> {
    let mut random = vec![0u8; cs];
    XorShift64::new(7).fill(&mut random);
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy cache cluster "
        .iter()
        .copied()
        .cycle()
        .take(cs)
        .collect();
    let fill = vec![0x11u8; cs];
    let ramp: Vec<u8> = (0..cs).map(|i| (i % 251) as u8).collect();
    vec![random, text, fill, ramp]
}

/// A sealed cache (cluster size `cs`) fully warmed from a base with many identical clusters,
/// plus one data cluster of zeros written into it before sealing.
fn setup(cs: u64) -> Setup {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let base = dir.join("base.raw");
    let pats = patterns(cs as usize);
    let mut data = vec![0u8; (CLUSTERS * cs) as usize];
    for i in 0..REPEATED {
        let at = (i * cs) as usize;
        data[at..at + cs as usize].copy_from_slice(&pats[(i % 4) as usize]);
    }
    let mut rng = XorShift64::new(99);
    for i in 320..320 + UNIQUE {
        let at = (i * cs) as usize;
        rng.fill(&mut data[at..at + cs as usize]);
    }
    std::fs::write(&base, data).unwrap();
    let cache = dir.join("cache.qcow2");
    let cs_arg = format!("{}K", cs >> 10);
    run(bin().args([
        "build",
        ps(&base),
        "-o",
        ps(&cache),
        "--cluster-size",
        &cs_arg,
    ]));
    run(bin().args(["warm", ps(&cache), "--full"]));
    // A data cluster holding zeros (cluster 400 reads as zeros in the base too).
    qemu_io_qcow2(&cache, &[format!("write -P 0 {} {}", 400 * cs, cs)]);
    run(bin().args(["seal", ps(&cache)]));
    let before = dir.join("before.qcow2");
    std::fs::copy(&cache, &before).unwrap();
    Setup {
        _dir: d,
        dir,
        cache,
        before,
    }
}

fn compact(cache: &Path, codec: &str) -> Value {
    let out = run(bin().args([
        "seal",
        "--compact",
        "--compress",
        codec,
        "--json",
        ps(cache),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// `vmicache inspect --map --json` prints what `qemu-img map --output=json` prints.
fn assert_map_eq(img: &Path) {
    let theirs = qemu_img(&["map", "--output=json", ps(img)]);
    let ours = run(bin().args(["inspect", ps(img), "--map", "--json"])).stdout;
    let ours = String::from_utf8(ours).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&ours).unwrap(),
        serde_json::from_str::<Value>(&theirs).unwrap(),
        "map of {}\n--- ours ---\n{ours}\n--- qemu-img ---\n{theirs}",
        img.display()
    );
}

/// The compacted cache is a valid image with the same content as before, by every reader.
fn assert_same_content(s: &Setup) {
    check_clean(&s.cache);
    run(tool("qemu-img").args(["compare", ps(&s.before), ps(&s.cache)]));
    assert_bytes_eq(
        "engine read of the compacted cache",
        &read_all_ours(&s.cache),
        &read_all_ours(&s.before),
    );
    let ours = run_status(bin().args(["check", ps(&s.cache)]));
    assert!(ours.status.success(), "{ours:?}");
    assert_map_eq(&s.cache);
}

fn round_trip(cs: u64, codec: &str) {
    let s = setup(cs);
    let st = compact(&s.cache, codec);
    eprintln!(
        "compact {codec:>4}, {:>2} KiB clusters: {} -> {} bytes ({} stored contents, {} shared, {} compressed in {} host clusters)",
        cs >> 10,
        n(&st, "bytes-before"),
        n(&st, "bytes-after"),
        n(&st, "stored-contents"),
        n(&st, "shared-clusters"),
        n(&st, "compressed-clusters"),
        n(&st, "compressed-host-clusters"),
    );
    let file_len = std::fs::metadata(&s.cache).unwrap().len();
    assert_eq!(
        n(&st, "bytes-before"),
        std::fs::metadata(&s.before).unwrap().len()
    );
    assert_eq!(n(&st, "bytes-after"), file_len);
    assert_eq!(
        n(&st, "data-clusters-before"),
        REPEATED + UNIQUE + 1,
        "{st}"
    );
    assert_eq!(n(&st, "zeroed-clusters"), 1, "{st}");
    assert_eq!(n(&st, "data-clusters-after"), REPEATED + UNIQUE, "{st}");
    assert_eq!(
        n(&st, "zero-clusters"),
        CLUSTERS - REPEATED - UNIQUE,
        "{st}"
    );
    assert_eq!(n(&st, "stored-contents"), 4 + UNIQUE, "{st}");
    assert_eq!(n(&st, "shared-clusters"), REPEATED, "{st}");
    // Header, L1, one L2 table, refcount table and block: 5 clusters of metadata.
    let (compressed, plain) = if codec == "none" {
        (0, 4 + UNIQUE)
    } else {
        (3 * REPEATED / 4, 1 + UNIQUE)
    };
    assert_eq!(n(&st, "compressed-clusters"), compressed, "{st}");
    assert_eq!(n(&st, "plain-host-clusters"), plain, "{st}");
    let packed = n(&st, "compressed-host-clusters");
    assert!(packed <= 2, "{st}");
    assert_eq!(file_len, (5 + plain + packed) * cs, "{st}");
    assert!(file_len * 8 < n(&st, "bytes-before"), "{st}");

    let info = qemu_img_json(&["info", "--output=json", ps(&s.cache)]);
    let spec = &info["format-specific"]["data"];
    let want_type = if codec == "zstd" { "zstd" } else { "zlib" };
    assert_eq!(spec["compression-type"], want_type, "{info}");
    let was = qemu_img_json(&["info", "--output=json", ps(&s.before)]);
    assert_eq!(info["backing-filename"], was["backing-filename"], "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    assert_same_content(&s);

    // The vmicache extension is kept: still a sealed cache over the same base.
    let ins = run(bin().args(["inspect", ps(&s.cache), "--json"])).stdout;
    let ins: Value = serde_json::from_slice(&ins).unwrap();
    assert_eq!(ins["cache"]["state"], "sealed", "{ins}");
    assert_eq!(ins["cache"]["base-check"], "ok", "{ins}");
    let l0 = &ins["layers"][0];
    assert_eq!(n(l0, "shared-clusters"), REPEATED, "{ins}");
    assert_eq!(n(l0, "compressed-clusters"), compressed, "{ins}");
    assert!(n(l0, "saved-bytes") >= (REPEATED - 4) * cs, "{ins}");

    // Twice: nothing changes.
    let first = std::fs::read(&s.cache).unwrap();
    let st2 = compact(&s.cache, codec);
    assert_eq!(n(&st2, "bytes-after"), n(&st, "bytes-after"));
    assert!(
        std::fs::read(&s.cache).unwrap() == first,
        "second compaction changed the file"
    );
    check_clean(&s.cache);
    // No temporary file left behind.
    let names: Vec<String> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".compact-")), "{names:?}");
}

#[test]
fn compact_4k_zstd() {
    round_trip(4096, "zstd");
}
#[test]
fn compact_4k_zlib() {
    round_trip(4096, "zlib");
}
#[test]
fn compact_4k_none() {
    round_trip(4096, "none");
}
#[test]
fn compact_64k_zstd() {
    round_trip(65536, "zstd");
}
#[test]
fn compact_64k_zlib() {
    round_trip(65536, "zlib");
}
#[test]
fn compact_64k_none() {
    round_trip(65536, "none");
}

#[test]
fn refcount_width_kept_or_widened_to_16_bits() {
    for (bits, want) in [(8, 8), (64, 64), (1, 16)] {
        let s = setup(4096);
        qemu_img(&[
            "amend",
            "-o",
            &format!("refcount_bits={bits}"),
            ps(&s.cache),
        ]);
        std::fs::copy(&s.cache, &s.before).unwrap();
        let st = compact(&s.cache, "zlib");
        assert_eq!(n(&st, "refcount-bits"), want, "{st}");
        let info = qemu_img_json(&["info", "--output=json", ps(&s.cache)]);
        assert_eq!(
            info["format-specific"]["data"]["refcount-bits"], want,
            "{info}"
        );
        assert_same_content(&s);
    }
}

#[test]
fn unsealed_cache_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(3, 1 << 20)).unwrap();
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    run(bin().args(["warm", ps(&cache), "--full"]));
    let before = std::fs::read(&cache).unwrap();
    let out = run_status(bin().args(["seal", "--compact", ps(&cache)]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not sealed"), "{err}");
    assert!(std::fs::read(&cache).unwrap() == before);
    // Held open for writing by another process: refused too.
    run(bin().args(["seal", ps(&cache)]));
    let mut qio = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", ps(&cache)])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let out = run_status(bin().args(["seal", "--compact", ps(&cache)]));
    let err = String::from_utf8_lossy(&out.stderr);
    drop(qio.stdin.take());
    let _ = qio.wait();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("lock"), "{err}");
    check_clean(&cache);
}

#[test]
fn instance_and_server_over_a_compacted_cache_read_the_same() {
    let s = setup(4096);
    compact(&s.cache, "zstd");
    let inst = s.dir.join("vm1.qcow2");
    run(bin().args(["chain", ps(&s.cache), "-o", ps(&inst)]));
    run(tool("qemu-img").args(["compare", ps(&inst), ps(&s.before)]));
    let sock = s.dir.join("nbd.sock");
    let mut c: Child = bin()
        .args(["serve", ps(&inst), "--socket", ps(&sock)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock, &mut c, "vmicache serve");
    let srv = Proc(Some(c));
    let uri = format!("nbd+unix:///vm1?socket={}", sock.display());
    run(tool("qemu-img").args(["compare", "-f", "raw", &uri, ps(&s.before)]));
    srv.stop();
    check_clean(&inst);
    check_clean(&s.cache);
}

/// kill -9 of `seal --compact` at random moments: the cache is always the old image or the
/// new one, and clean.
#[test]
fn kill_9_leaves_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(11, 24 << 20)).unwrap();
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "--cluster-size", "4K"]));
    run(bin().args(["warm", ps(&cache), "--full"]));
    run(bin().args(["seal", ps(&cache)]));
    let old = std::fs::read(&cache).unwrap();
    let t = Instant::now();
    compact(&cache, "zstd");
    let took = t.elapsed();
    let new = std::fs::read(&cache).unwrap();
    assert!(new.len() < old.len());
    eprintln!(
        "kill -9 test: compaction of {} bytes -> {} takes {took:?}",
        old.len(),
        new.len()
    );
    let mut rng = XorShift64::new(5);
    let (mut olds, mut news) = (0, 0);
    let span = took.as_micros() as u64 * 5 / 4 + 1;
    for round in 0..20 {
        std::fs::write(&cache, &old).unwrap();
        let mut c = bin()
            .args(["seal", "--compact", "--compress", "zstd", "-q", ps(&cache)])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(rng.below(span)));
        let _ = c.kill();
        let _ = c.wait();
        let now = std::fs::read(&cache).unwrap();
        if now == old {
            olds += 1;
        } else {
            assert!(
                now == new,
                "round {round}: neither the old nor the new image"
            );
            news += 1;
        }
        check_clean(&cache);
    }
    eprintln!("kill -9 test: {olds} rounds left the old image, {news} the new one");
    run(tool("qemu-img").args(["compare", ps(&cache), ps(&base)]));
    // A later compaction removes what killed ones left behind.
    compact(&cache, "zstd");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".compact-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The minimal guest's cache (images/build.sh minimal; tools/test.sh builds it).
#[test]
fn minimal_guest_cache() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/images/minimal/base.raw");
    assert!(
        base.exists(),
        "{} missing: build the minimal guest (images/build.sh minimal; tools/test.sh does)",
        base.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let allow = base.parent().unwrap();
    let cache = dir.path().join("cache.qcow2");
    let v = |args: &[&str]| {
        run(bin().args(["--allow-backing", ps(allow)]).args(args));
    };
    v(&["build", ps(&base), "-o", ps(&cache), "--quota", "64M"]);
    v(&["warm", ps(&cache), "--full"]);
    v(&["seal", ps(&cache)]);
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&cache, &before).unwrap();
    for codec in ["zstd", "zlib"] {
        std::fs::copy(&before, &cache).unwrap();
        let out = run(bin()
            .args(["--allow-backing", ps(allow), "seal", "--compact", "--json"])
            .args(["--compress", codec, ps(&cache)]));
        let st: Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!(
            "minimal guest cache, {codec}: {} -> {} bytes ({} data clusters, {} shared, {} compressed, {:.2} s)",
            n(&st, "bytes-before"),
            n(&st, "bytes-after"),
            n(&st, "data-clusters-after"),
            n(&st, "shared-clusters"),
            n(&st, "compressed-clusters"),
            st["seconds"].as_f64().unwrap_or(0.0)
        );
        assert!(n(&st, "bytes-after") < n(&st, "bytes-before"), "{st}");
        check_clean(&cache);
        run(tool("qemu-img").args(["compare", ps(&before), ps(&cache)]));
    }
}
