//! `vmicache inspect --map --json` and `vmicache check` against qemu-img on the same files:
//! maps of chains built with qemu-img/qemu-io (and vmicache build/chain), `check` numbers and
//! exit codes on clean and deliberately damaged images, and `check --repair leaks`.

#[path = "../common/mod.rs"]
mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

mod check;
mod map;
mod repair;

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
