//! `vmicache inspect --map --json` and `vmicache check` against qemu-img on the same files:
//! maps of chains built with qemu-img/qemu-io (and vmicache build/chain), `check` numbers and
//! exit codes on clean and deliberately damaged images, and `check --repair leaks`.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------
// Maps
// ---------------------------------------------------------------------------

/// Asserts that `vmicache inspect IMG --map --json` and `qemu-img map --output=json IMG` print
/// the same JSON array (and, as the CLI promises, the same text). Returns the parsed map.
fn assert_map_eq(img: &Path) -> Vec<Value> {
    let theirs_text = qemu_img(&["map", "--output=json", ps(img)]);
    let ours_out = run(bin().args(["inspect", ps(img), "--map", "--json"]));
    let ours_text = String::from_utf8(ours_out.stdout).expect("vmicache printed non UTF-8");
    let theirs: Value = serde_json::from_str(&theirs_text)
        .unwrap_or_else(|e| panic!("qemu-img map: bad JSON ({e}):\n{theirs_text}"));
    let ours: Value = serde_json::from_str(&ours_text)
        .unwrap_or_else(|e| panic!("vmicache map: bad JSON ({e}):\n{ours_text}"));
    assert!(
        theirs.is_array(),
        "qemu-img map is not an array:\n{theirs_text}"
    );
    assert_eq!(
        ours,
        theirs,
        "map of {} differs\n--- vmicache inspect --map --json ---\n{ours_text}\n--- qemu-img map --output=json ---\n{theirs_text}",
        img.display()
    );
    assert_eq!(
        ours_text,
        theirs_text,
        "map of {}: same JSON, different text",
        img.display()
    );
    theirs.as_array().cloned().unwrap_or_default()
}

/// Whether some map entry has all the given (key, value) pairs; used to make sure a chain
/// really contains the kinds of extents its test is about.
fn has_entry(map: &[Value], want: &[(&str, Value)]) -> bool {
    map.iter()
        .any(|e| want.iter().all(|(k, v)| e.get(*k) == Some(v)))
}

fn assert_has(map: &[Value], what: &str, want: &[(&str, Value)]) {
    assert!(
        has_entry(map, want),
        "map has no {what} extent ({want:?}):\n{}",
        serde_json::to_string_pretty(map).unwrap()
    );
}

fn create_qcow2(path: &Path, size: &str, opts: &str, backing: Option<(&str, &str)>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((file, fmt)) = backing {
        args.extend(["-b", file, "-F", fmt]);
    }
    args.extend([ps(path), size]);
    qemu_img(&args);
}

/// A sparse raw file of `size` bytes (made with `set_len`, not by qemu-img), with `writes`
/// done by qemu-io. Offsets are 64 KiB aligned so the file system's block size does not matter.
fn sparse_raw(path: &Path, size: u64, writes: &[&str]) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    if !writes.is_empty() {
        qemu_io(path, &["-f", "raw"], writes);
    }
}

#[test]
fn map_qcow2_without_backing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.qcow2");
    create_qcow2(&img, "8M", "cluster_size=65536", None);
    qemu_io_qcow2(
        &img,
        &[
            "write -q -P 0xaa 0 128k",
            // Over data: the cluster stays allocated with the zero flag (zero-alloc).
            "write -q -z 64k 64k",
            // Over nothing: a plain zero cluster.
            "write -q -z 256k 64k",
            "write -q -c -P 0xcc 512k 64k",
            "write -q -c -P 0xcd 576k 64k",
            "write -q -P 0x11 1M 64k",
            "write -q -P 0x22 2M 192k",
            // Unmapping zero write over data: plain zero.
            "write -q -z -u 2112k 64k",
            "write -q -c -P 0x33 4M 128k",
            "write -q -P 0x44 7M 64k",
        ],
    );
    let m = assert_map_eq(&img);
    assert_has(
        &m,
        "data",
        &[("data", true.into()), ("compressed", false.into())],
    );
    assert_has(&m, "compressed", &[("compressed", true.into())]);
    let zero = |with_offset: bool| {
        m.iter().any(|e| {
            e["present"] == true && e["zero"] == true && e.get("offset").is_some() == with_offset
        })
    };
    assert!(zero(true), "no zero-alloc extent: {m:?}");
    assert!(zero(false), "no plain zero extent: {m:?}");
    assert_has(&m, "unallocated", &[("present", false.into())]);
}

#[test]
fn map_of_zero_sized_images() {
    // qemu-img map prints one zero-length entry (all flags false) for an image of size 0.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    assert_map_eq(&empty);
    let q = dir.path().join("zero.qcow2");
    create_qcow2(&q, "0", "", None);
    assert_map_eq(&q);
}

#[test]
fn map_qcow2_preallocation_metadata() {
    // Preallocated clusters are holes in the file: QEMU detects metadata preallocation and
    // reports them as zero (with data and an offset).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    create_qcow2(
        &img,
        "4M",
        "cluster_size=65536,preallocation=metadata",
        None,
    );
    qemu_io_qcow2(
        &img,
        &[
            "write -q -P 1 0 128k",
            "write -q -z 64k 64k",
            "write -q -P 2 1M 64k",
            "write -q -z 2M 128k",
        ],
    );
    assert_map_eq(&img);
}

#[test]
fn map_qcow2_over_sparse_raw() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(
        &base,
        4 * MIB,
        &[
            "write -q -P 1 0 64k",
            "write -q -P 2 1M 128k",
            "write -q -P 3 3M 64k",
        ],
    );
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, "6M", "cluster_size=65536", Some(("base.raw", "raw")));
    qemu_io_qcow2(
        &top,
        &[
            "write -q -P 9 64k 64k",
            "write -q -z 1M 64k",
            "write -q -P 8 2M 64k",
            "write -q -z 3M 64k",
            "write -q -P 7 5M 64k",
        ],
    );
    let m = assert_map_eq(&top);
    assert_has(
        &m,
        "backing data",
        &[("depth", 1.into()), ("data", true.into())],
    );
    assert_has(
        &m,
        "backing hole",
        &[("depth", 1.into()), ("zero", true.into())],
    );
    // The raw file alone too.
    assert_map_eq(&base);
}

#[test]
fn map_qcow2_over_raw_made_by_qemu_img() {
    // qemu-img create writes the raw file's first 4 KiB: it maps as data, the rest as holes.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", ps(&base), "2M"]);
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, "2M", "", Some(("base.raw", "raw")));
    qemu_io_qcow2(&top, &["write -q -P 5 1M 64k"]);
    let m = assert_map_eq(&top);
    assert_has(
        &m,
        "first 4k of the raw file",
        &[
            ("start", 0.into()),
            ("length", 4096.into()),
            ("depth", 1.into()),
        ],
    );
}

#[test]
fn map_three_levels_of_different_sizes() {
    // raw (2M) <- mid.qcow2 (3M) <- top.qcow2 (4M), as in the notes, with 64k-aligned raw data.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    qemu_img(&["create", "-q", "-f", "raw", ps(&raw), "2M"]);
    qemu_io(
        &raw,
        &["-f", "raw"],
        &["write -q -P 0x11 0 64k", "write -q -P 0x12 1088k 64k"],
    );
    let mid = dir.path().join("mid.qcow2");
    create_qcow2(&mid, "3M", "", Some(("raw.img", "raw")));
    qemu_io_qcow2(
        &mid,
        &["write -q -P 0x21 64k 64k", "write -q -P 0x22 2560k 64k"],
    );
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, "4M", "", Some(("mid.qcow2", "qcow2")));
    qemu_io_qcow2(
        &top,
        &[
            "write -q -P 0x31 1M 64k",
            "write -q -z 1536k 64k",
            "write -q -P 0x32 3584k 64k",
        ],
    );
    let m = assert_map_eq(&top);
    assert_has(
        &m,
        "raw layer",
        &[("depth", 2.into()), ("data", true.into())],
    );
    assert_has(
        &m,
        "past the raw file",
        &[("depth", 1.into()), ("present", false.into())],
    );
    assert_has(
        &m,
        "past mid",
        &[("depth", 0.into()), ("present", false.into())],
    );
    assert_map_eq(&mid);
}

#[test]
fn map_cache_and_instance() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(
        &base,
        8 * MIB,
        &[
            "write -q -P 1 0 256k",
            "write -q -P 2 1M 64k",
            "write -q -P 3 3M 512k",
            "write -q -P 4 7M 64k",
        ],
    );
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    assert_map_eq(&cache);
    // Fill part of the cache the way a boot would (same bytes as the base).
    qemu_io_qcow2(&cache, &["write -q -P 1 0 128k", "write -q -P 3 3M 128k"]);
    let inst = dir.path().join("inst.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    qemu_io_qcow2(
        &inst,
        &[
            "write -q -P 0x55 64k 64k",
            "write -q -z 3M 64k",
            "write -q -P 0x56 5M 100k",
            "write -q -P 0x57 8000k 3k",
        ],
    );
    assert_check_agrees(&cache, 0);
    assert_check_agrees(&inst, 0);
    let m = assert_map_eq(&inst);
    for depth in 0..3 {
        assert_has(
            &m,
            "data at each depth",
            &[("depth", depth.into()), ("data", true.into())],
        );
    }
    assert_map_eq(&cache);
    // Sealed, the cache reaches its base lazily; `inspect` opens it (to show it) and the map
    // still names the base at depth 1 under the cache, 2 under the instance.
    run(bin().args(["seal", ps(&cache)]));
    let m = assert_map_eq(&cache);
    assert_has(
        &m,
        "the base at depth 1",
        &[("depth", 1.into()), ("data", true.into())],
    );
    let m = assert_map_eq(&inst);
    assert_has(
        &m,
        "the base at depth 2",
        &[("depth", 2.into()), ("data", true.into())],
    );
}

/// A qcow2 of `size` with `cluster` clusters over a sparse raw file, written at seeded random
/// places with data, zeros and (whole clusters) compressed data.
fn scattered_case(cluster: u64, size: u64, nwrites: usize, max_len: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let raw_size = size / 2;
    let raw_writes: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "write -q -P {} {} 64k",
                i + 1,
                (raw_size / 8 * i) & !(64 * KIB - 1)
            )
        })
        .collect();
    let raw_writes: Vec<&str> = raw_writes.iter().map(String::as_str).collect();
    sparse_raw(&base, raw_size, &raw_writes);
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        &size.to_string(),
        &format!("cluster_size={cluster}"),
        Some(("base.raw", "raw")),
    );
    let mut r = XorShift64::new(seed);
    // Compressed writes first: QEMU only compresses into clusters not yet allocated.
    let clusters = size / cluster;
    let mut used = vec![false; clusters as usize];
    let mut cmds = Vec::new();
    for _ in 0..nwrites / 5 {
        let n = r.range(1, 4);
        let first = r.below(clusters - n);
        let range = first as usize..(first + n) as usize;
        if used[range.clone()].iter().any(|&u| u) {
            continue;
        }
        used[range].fill(true);
        cmds.push(format!(
            "write -q -c -P {} {} {}",
            r.range(1, 255),
            first * cluster,
            n * cluster
        ));
    }
    for _ in 0..nwrites {
        let len = r.range(1, max_len / 512) * 512;
        let off = r.below((size - len) / 512) * 512;
        let kind = r.below(8);
        if kind < 2 {
            cmds.push(format!("write -q -z {off} {len}"));
        } else if kind == 2 {
            cmds.push(format!("discard -q {off} {len}"));
        } else {
            cmds.push(format!("write -q -P {} {off} {len}", r.range(1, 255)));
        }
    }
    for chunk in cmds.chunks(100) {
        qemu_io_qcow2(&top, chunk);
    }
    let m = assert_map_eq(&top);
    assert!(m.len() > 10, "suspiciously short map: {m:?}");
    assert_check_agrees(&top, 0);
}

#[test]
fn map_cluster_512() {
    for seed in 0..3 {
        scattered_case(512, 4 * MIB, 200, 8 * KIB, 512 + seed);
    }
}

#[test]
fn map_cluster_4k() {
    for seed in 0..3 {
        scattered_case(4 * KIB, 16 * MIB, 200, 40 * KIB, 4096 + seed);
    }
}

#[test]
fn map_cluster_2m() {
    for seed in 0..2 {
        scattered_case(2 * MIB, 64 * MIB, 40, 3 * MIB, 2 + seed);
    }
}

#[test]
fn map_1g_scattered() {
    scattered_case(64 * KIB, 1024 * MIB, 120, 256 * KIB, 1 << 30);
}

#[test]
fn map_top_smaller_than_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(
        &base,
        4 * MIB,
        &["write -q -P 1 0 64k", "write -q -P 2 1M 1M"],
    );
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        "1536K",
        "cluster_size=65536",
        Some(("base.raw", "raw")),
    );
    qemu_io_qcow2(&top, &["write -q -P 3 1088k 64k", "write -q -z 1216k 64k"]);
    assert_map_eq(&top);
}

// ---------------------------------------------------------------------------
// Check agreement on damaged images
// ---------------------------------------------------------------------------

fn read_u32(f: &std::fs::File, off: u64) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).expect("read u32");
    u32::from_be_bytes(b)
}

fn read_u64(f: &std::fs::File, off: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).expect("read u64");
    u64::from_be_bytes(b)
}

/// Where the damage helpers poke, read from the header (refcount_bits = 16 only).
struct Layout {
    cluster_size: u64,
    l1: u64,
    rt: u64,
    rb0: u64,
    l2: u64,
}

impl Layout {
    fn of(path: &Path) -> Layout {
        let f = std::fs::File::open(path).unwrap();
        let cb = read_u32(&f, 20);
        let l1 = read_u64(&f, 40);
        let rt = read_u64(&f, 48);
        let refcount_order = read_u32(&f, 96);
        assert_eq!(refcount_order, 4, "damage helpers need 16-bit refcounts");
        Layout {
            cluster_size: 1 << cb,
            l1,
            rt,
            rb0: read_u64(&f, rt) & 0x00ff_ffff_ffff_fe00,
            l2: read_u64(&f, l1) & 0x00ff_ffff_ffff_fe00,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Poke {
    /// Refcount of a host cluster.
    SetRef(u64, u16),
    /// Raw entry of the first L2 table.
    SetL2(u64, u64),
    /// Raw active L1 entry.
    SetL1(u64, u64),
    /// Raw refcount table entry.
    SetRT(u64, u64),
    /// Append zeroed clusters to the file.
    Append(u64),
    /// Truncate the file.
    Truncate(u64),
    /// Add to the first snapshot's L1 table offset.
    ShiftSnapshotL1(u64),
}

fn poke(path: &Path, p: Poke) {
    let l = Layout::of(path);
    match p {
        Poke::SetRef(c, rc) => write_at(path, l.rb0 + 2 * c, &rc.to_be_bytes()),
        Poke::SetL2(i, e) => write_at(path, l.l2 + 8 * i, &e.to_be_bytes()),
        Poke::SetL1(i, e) => write_at(path, l.l1 + 8 * i, &e.to_be_bytes()),
        Poke::SetRT(i, e) => write_at(path, l.rt + 8 * i, &e.to_be_bytes()),
        Poke::Append(n) => {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let len = f.metadata().unwrap().len();
            f.set_len(len + n * l.cluster_size).unwrap();
            // Write the bytes so the cluster is really there (not a hole).
            write_at(path, len, &vec![0u8; (n * l.cluster_size) as usize]);
        }
        Poke::Truncate(len) => {
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.set_len(len).unwrap();
        }
        Poke::ShiftSnapshotL1(by) => {
            let f = std::fs::File::open(path).unwrap();
            let snaps = read_u64(&f, 64);
            assert_ne!(snaps, 0, "no snapshot table");
            let l1 = read_u64(&f, snaps);
            write_at(path, snaps, &(l1 + by).to_be_bytes());
        }
    }
}

/// The base of the damage tests (see the notes): 64k clusters, 8M, data at 0..128k and 1M.
/// Layout: 0 header, 1 reftable, 2 refblock, 3 L1, 4 L2, 5,6 data 0..128k, 7 data at 1M.
fn damage_base(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    create_qcow2(&base, "8M", "cluster_size=65536", None);
    qemu_io_qcow2(
        &base,
        &["write -q -P 0xaa 0 128k", "write -q -P 0xbb 1M 64k"],
    );
    let l = Layout::of(&base);
    assert_eq!(
        (l.rt, l.rb0, l.l1, l.l2),
        (0x10000, 0x20000, 0x30000, 0x40000),
        "unexpected layout of the base image"
    );
    base
}

const FIELDS: &[&str] = &[
    "corruptions",
    "leaks",
    "check-errors",
    "allocated-clusters",
    "fragmented-clusters",
    "image-end-offset",
    "total-clusters",
    "compressed-clusters",
];

fn count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

struct CheckRun {
    code: i32,
    json: Value,
    stderr: String,
}

fn qemu_check(img: &Path, extra: &[&str]) -> CheckRun {
    let out = run_status(
        tool("qemu-img")
            .arg("check")
            .args(extra)
            .args(["--output=json", ps(img)]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    CheckRun {
        code: out.status.code().expect("qemu-img killed by a signal"),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn our_check(img: &Path, extra: &[&str]) -> CheckRun {
    let out = run_status(bin().arg("check").args(extra).args(["--json", ps(img)]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "vmicache check panicked:\n{stderr}"
    );
    CheckRun {
        code: out.status.code().expect("vmicache killed by a signal"),
        json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stderr,
    }
}

/// Runs both checkers on `img`: same exit code, same counts and the same finding lines on
/// stderr. `qemu_code` is what the notes say qemu-img returns (guards against the image not
/// being damaged as intended).
fn assert_check_agrees(img: &Path, qemu_code: i32) -> Value {
    check_agreement(img, qemu_code, true)
}

/// `assert_check_agrees`; `lines` false compares exit codes and counts only (for cases where
/// qemu-img's stderr has more than findings, e.g. its corruption-event messages).
fn check_agreement(img: &Path, qemu_code: i32, lines: bool) -> Value {
    let theirs = qemu_check(img, &[]);
    assert_eq!(
        theirs.code,
        qemu_code,
        "qemu-img check {}: unexpected exit code\n{:#}\n{}",
        img.display(),
        theirs.json,
        theirs.stderr
    );
    let ours = our_check(img, &[]);
    let diff: Vec<String> = FIELDS
        .iter()
        .filter(|k| count(&ours.json, k) != count(&theirs.json, k))
        .map(|k| {
            format!(
                "{k}: vmicache {} qemu-img {}",
                count(&ours.json, k),
                count(&theirs.json, k)
            )
        })
        .collect();
    assert!(
        diff.is_empty() && ours.code == theirs.code && (ours.json.is_object() || !lines),
        "check of {} differs: {diff:?}, exit vmicache {} qemu-img {}\n--- vmicache ---\n{:#}\n{}\n--- qemu-img ---\n{:#}\n{}",
        img.display(),
        ours.code,
        theirs.code,
        ours.json,
        ours.stderr,
        theirs.json,
        theirs.stderr
    );
    if lines {
        assert_eq!(
            ours.stderr.lines().collect::<Vec<_>>(),
            theirs.stderr.lines().collect::<Vec<_>>(),
            "check of {}: findings on stderr differ (left vmicache, right qemu-img)",
            img.display()
        );
    }
    ours.json
}

/// A damaged copy of the base: `name` in `dir`.
fn damaged(dir: &Path, base: &Path, name: &str, pokes: &[Poke]) -> PathBuf {
    let img = dir.join(format!("{name}.qcow2"));
    std::fs::copy(base, &img).unwrap();
    for &p in pokes {
        poke(&img, p);
    }
    img
}

#[test]
fn check_agrees_on_damaged_images() {
    use Poke::*;
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let clean = assert_check_agrees(&base, 0);
    assert_eq!(count(&clean, "allocated-clusters"), 3);
    assert_eq!(count(&clean, "image-end-offset"), 0x80000);

    let cases: &[(&str, &[Poke], i32)] = &[
        ("leak", &[Append(1), SetRef(8, 1)], 3),
        // (A count past the end of the file is a leak to us, not to qemu-img: see
        // counts_past_the_end_of_the_file_are_leaks_and_repaired.)
        ("refcount_too_low", &[SetRef(5, 0)], 2),
        ("refcount_too_high", &[SetRef(5, 2)], 2),
        ("l2_refcount_zero", &[SetRef(4, 0)], 2),
        ("l2_past_eof", &[SetL2(2, 0x8000_0000_0010_0000)], 2),
        ("l2_exactly_at_eof", &[SetL2(2, 0x8000_0000_0008_0000)], 2),
        ("l2_past_eof_not_copied", &[SetL2(2, 0x10_0000)], 2),
        ("l2_at_l1_cluster", &[SetL2(2, 0x8000_0000_0003_0000)], 2),
        (
            "l1_at_refcount_table",
            &[SetL1(0, 0x8000_0000_0001_0000)],
            2,
        ),
        ("unaligned_data", &[SetL2(2, 0x8000_0000_0005_8000)], 2),
        (
            "unaligned_zero_alloc",
            &[SetL2(2, 0x8000_0000_0005_8001)],
            2,
        ),
        ("l2_reserved_bit", &[SetL2(2, 0x8000_0000_0007_0100)], 2),
        ("l1_reserved_bit", &[SetL1(0, 0x8000_0000_0004_0001)], 2),
        ("unaligned_l2_table", &[SetL1(0, 0x8000_0000_0004_0200)], 2),
        ("data_without_copied", &[SetL2(0, 0x5_0000)], 2),
        ("l1_without_copied", &[SetL1(0, 0x4_0000)], 2),
        (
            "two_l2_entries_one_cluster",
            &[SetL2(16, 0x8000_0000_0005_0000)],
            2,
        ),
        ("refblock_outside_image", &[SetRT(1, 0x10_0000)], 2),
        ("refblock_at_l2", &[SetRT(0, 0x4_0000)], 2),
    ];
    let mut failures = Vec::new();
    for (name, pokes, qemu_code) in cases {
        let img = damaged(dir.path(), &base, name, pokes);
        // Collect every disagreement instead of stopping at the first one.
        let r = std::panic::catch_unwind(|| {
            assert_check_agrees(&img, *qemu_code);
        });
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("[{name}] {msg}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) disagree:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn check_agrees_when_the_l2_table_lies_past_eof() {
    // The file is cut right before its L2 table (0x40000). qemu-img reports only the reference
    // past EOF: its COPIED check reads the L2 cluster's refcount (still 1) from the refcount
    // block, even though the cluster is beyond the end of the file.
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let img = damaged(dir.path(), &base, "cut", &[Poke::Truncate(0x40000)]);
    assert_check_agrees(&img, 2);
}

#[test]
fn check_agrees_on_refcount_table_entry_with_reserved_bits() {
    // qemu-img reports the entry, skips counting the refblock (so its cluster leaks), and still
    // reads refcounts through it: qcow2_get_refcount masks the entry with REFT_OFFSET_MASK.
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let img = damaged(
        dir.path(),
        &base,
        "rt_reserved",
        &[Poke::SetRT(0, 0x2_0001)],
    );
    assert_check_agrees(&img, 2);
}

#[test]
fn check_agrees_on_unaligned_refcount_block() {
    // qemu-img cannot read any refcount through an unaligned refblock: one
    // `Can't get refcount for cluster N: Input/output error` per cluster, check-errors 8, and
    // exit 1 (`qemu-img: Check failed`), with the JSON still printed.
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let img = damaged(
        dir.path(),
        &base,
        "rb_unaligned",
        &[Poke::SetRT(0, 0x2_0200)],
    );
    check_agreement(&img, 1, false);
}

#[test]
fn check_agrees_on_compressed_image() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Data in the first half; the second half stays unallocated after convert.
    let mut data = pattern(21, (4 * MIB) as usize);
    data.resize((8 * MIB) as usize, 0);
    std::fs::write(&raw, data).unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", ps(&raw), ps(&img)]);
    // Plus compressed writes by qemu-io (small ones share host clusters) and plain data.
    qemu_io_qcow2(
        &img,
        &[
            "write -q -c -P 1 5M 64k",
            "write -q -c -P 2 5184k 64k",
            "write -q -P 3 6M 64k",
        ],
    );
    let r = assert_check_agrees(&img, 0);
    assert!(count(&r, "compressed-clusters") > 0, "{r:#}");
    assert_map_eq(&img);
}

#[test]
fn check_agrees_with_internal_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    qemu_img(&["snapshot", "-c", "s1", ps(&base)]);
    qemu_io_qcow2(
        &base,
        &[
            "write -q -P 0x11 64k 64k",
            "write -q -P 0x12 3M 128k",
            "write -q -z 1M 64k",
        ],
    );
    qemu_img(&["snapshot", "-c", "s2", ps(&base)]);
    qemu_io_qcow2(
        &base,
        &["write -q -P 0x13 0 32k", "write -q -c -P 0x14 5M 64k"],
    );
    assert_check_agrees(&base, 0);
    assert_map_eq(&base);
    // A damaged snapshot table entry: the snapshot's clusters then show up as leaks.
    let bad = damaged(
        dir.path(),
        &base,
        "snap_l1_unaligned",
        &[Poke::ShiftSnapshotL1(0x200)],
    );
    assert_check_agrees(&bad, 2);
}

#[test]
fn check_agrees_on_clean_geometries() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "cluster_size=512",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4096,refcount_bits=64",
        "cluster_size=2M,refcount_bits=8",
        "compat=0.10",
    ]
    .iter()
    .enumerate()
    {
        let img = dir.path().join(format!("g{i}.qcow2"));
        create_qcow2(&img, "16M", opts, None);
        qemu_io_qcow2(
            &img,
            &[
                "write -q -P 1 0 100k",
                "write -q -P 2 5M 1M",
                "write -q -P 3 15M 64k",
            ],
        );
        qemu_io_qcow2(
            &img,
            &[
                "write -q -z 64k 64k",
                "write -q -z 7M 64k",
                "discard -q 5M 64k",
            ],
        );
        assert_check_agrees(&img, 0);
        assert_map_eq(&img);
    }
}

// ---------------------------------------------------------------------------
// Repair
// ---------------------------------------------------------------------------

#[test]
fn repair_leaks_fixes_a_leak() {
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let img = damaged(
        dir.path(),
        &base,
        "leak",
        &[Poke::Append(1), Poke::SetRef(8, 1)],
    );
    let r = our_check(&img, &["--repair", "leaks"]);
    assert_eq!(r.code, 0, "{:#}\n{}", r.json, r.stderr);
    assert_eq!(count(&r.json, "leaks-fixed"), 1, "{:#}", r.json);
    assert_eq!(count(&r.json, "leaks"), 0, "{:#}", r.json);
    check_clean(&img);
    assert_bytes_eq("guest data after repair", &to_raw(&img), &to_raw(&base));
}

/// `check --repair leaks` on a damaged copy of the base must refuse as qemu-img does (its
/// `ERROR need to rebuild refcount structures`, exit 1, nothing written): exit 1, the last
/// stderr line `vmicache: ...`, and the file byte-identical.
fn assert_repair_refused(name: &str, pokes: &[Poke]) {
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let img = damaged(dir.path(), &base, name, pokes);
    let before = std::fs::read(&img).unwrap();
    let twin = dir.path().join(format!("{name}-twin.qcow2"));
    std::fs::write(&twin, &before).unwrap();
    let theirs = qemu_check(&twin, &["-r", "leaks"]);
    assert_eq!(theirs.code, 1, "qemu-img: {}", theirs.stderr);
    assert!(
        theirs
            .stderr
            .contains("need to rebuild refcount structures"),
        "{}",
        theirs.stderr
    );
    assert!(
        std::fs::read(&twin).unwrap() == before,
        "qemu-img changed the file"
    );

    let out = run_status(bin().args(["check", "--repair", "leaks", ps(&img)]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!(
        "vmicache check --repair leaks ({name}): exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "file changed\n{ctx}"
    );
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("vmicache: ")),
        "{ctx}"
    );
}

#[test]
fn repair_leaks_refuses_a_refcount_below_its_references() {
    // Data cluster 5 with refcount 0 (no leak anywhere).
    assert_repair_refused("low", &[Poke::SetRef(5, 0)]);
}

#[test]
fn repair_leaks_refuses_a_zero_refcount_next_to_a_leak() {
    assert_repair_refused("low_and_leak", &[Poke::SetRef(5, 0), Poke::SetRef(7, 2)]);
}

#[test]
fn repair_leaks_refuses_when_a_refblock_is_referenced_twice() {
    // The L1 entry points at the refcount table: `ERROR refcount block 0 refcount=2` flags a
    // rebuild, and the real L2 and data clusters (4..7) show up as "leaked". Lowering their
    // refcounts would free live metadata and data; qemu-img refuses.
    assert_repair_refused("l1_at_reftable", &[Poke::SetL1(0, 0x8000_0000_0001_0000)]);
}

#[test]
fn repair_leaks_matches_qemu_img() {
    // Both tools repair a copy: same exit code, same report, byte-identical files, and the
    // same lines on stderr (qemu-img prints the first pass's `Leaked cluster` lines, then the
    // `Repairing cluster` lines).
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    let cases: &[(&str, &[Poke])] = &[
        ("leak", &[Poke::Append(1), Poke::SetRef(8, 1)]),
        ("too_high", &[Poke::SetRef(5, 2)]),
        (
            "two_leaks",
            &[Poke::Append(2), Poke::SetRef(8, 1), Poke::SetRef(9, 3)],
        ),
    ];
    for (name, pokes) in cases {
        let ours_img = damaged(dir.path(), &base, &format!("{name}-ours"), pokes);
        let theirs_img = damaged(dir.path(), &base, &format!("{name}-theirs"), pokes);
        let theirs = qemu_check(&theirs_img, &["-r", "leaks"]);
        let ours = our_check(&ours_img, &["--repair", "leaks"]);
        let strip = |v: &Value| {
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("filename");
            }
            v
        };
        let ctx = format!(
            "{name}\n--- vmicache ---\n{:#}\n{}\n--- qemu-img ---\n{:#}\n{}",
            ours.json, ours.stderr, theirs.json, theirs.stderr
        );
        assert_eq!(theirs.code, 0, "{ctx}");
        assert_eq!(ours.code, theirs.code, "{ctx}");
        assert_eq!(strip(&ours.json), strip(&theirs.json), "{ctx}");
        assert!(
            std::fs::read(&ours_img).unwrap() == std::fs::read(&theirs_img).unwrap(),
            "repaired files differ\n{ctx}"
        );
        check_clean(&ours_img);
        assert_eq!(
            ours.stderr.lines().collect::<Vec<_>>(),
            theirs.stderr.lines().collect::<Vec<_>>(),
            "stderr differs (left vmicache, right qemu-img)\n{ctx}"
        );
    }
}

/// Issue #9 item 7: a crash after clusters were counted and before their data was written
/// leaves refcounts above zero past the end of the file. qemu-img check does not look there,
/// so such an image "checks clean", yet an allocator that trusts the counts skips those
/// clusters and, once the file grows past them, they are leaks no earlier repair reclaimed.
/// `check` reports them as leaks (exit 3) and `--repair leaks` reclaims them; writes after
/// the repair leave an image qemu-img check calls clean.
#[test]
fn counts_past_the_end_of_the_file_are_leaks_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let base = damage_base(dir.path());
    // The file holds clusters 0..=7; clusters 12 and 13 counted, as a crash leaves them.
    let img = damaged(
        dir.path(),
        &base,
        "past_eof",
        &[Poke::SetRef(12, 1), Poke::SetRef(13, 1)],
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 16);
    assert_eq!(qemu_check(&img, &[]).code, 0, "qemu-img does not see them");
    let out = run_status(bin().args(["check", ps(&img)]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("Leaked clusters past the end of the image: 2 between 12 and 13"),
        "{text}"
    );
    run(bin().args(["check", "--repair", "leaks", ps(&img)]));
    run(bin().args(["check", ps(&img)]));
    // Grow the file well past cluster 13 through our engine: nothing leaks.
    let w =
        vmicache::engine::Image::open(&img, &vmicache::engine::OpenOptions::read_write()).unwrap();
    w.write_at(&vec![0x5a; 1 << 20], 2 << 20).unwrap();
    w.flush(true).unwrap();
    drop(w);
    assert_eq!(qemu_check(&img, &[]).code, 0);
    assert!(std::fs::metadata(&img).unwrap().len() > 14 << 16);
}
