//! Writes through our engine against the same writes done by qemu-io on a twin image:
//! `qemu-img check` must be clean and `qemu-img compare` must find them identical.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vmicache::engine::create::{create, CreateOptions};
use vmicache::engine::{Image, OpenOptions};

/// A raw base with data in some places and holes elsewhere.
fn make_base(dir: &Path, size: u64) -> PathBuf {
    let base = dir.join("base.raw");
    let mut data = vec![0u8; size as usize];
    let p = pattern(7, (size / 2) as usize);
    data[(size / 4) as usize..(size / 4 * 3) as usize].copy_from_slice(&p);
    std::fs::write(&base, &data).unwrap();
    base
}

/// Seeded random writes: (offset, length, pattern byte), unaligned, some overlapping.
fn writes(seed: u64, size: u64, n: usize, max_len: u64) -> Vec<(u64, u64, u8)> {
    let mut r = XorShift64::new(seed);
    (0..n)
        .map(|_| {
            let len = r.range(1, max_len);
            let off = r.below(size - len);
            (off, len, r.range(1, 255) as u8)
        })
        .collect()
}

fn apply_ours(img: &Path, w: &[(u64, u64, u8)]) {
    let im = Image::open(img, &OpenOptions::read_write()).unwrap();
    for &(off, len, p) in w {
        im.write_at(&vec![p; len as usize], off)
            .unwrap_or_else(|e| panic!("write {off:#x}+{len:#x}: {e}"));
    }
    im.flush(true).unwrap();
}

fn apply_qemu(img: &Path, w: &[(u64, u64, u8)]) {
    let cmds: Vec<String> = w
        .iter()
        .map(|(off, len, p)| format!("write -q -P {p} {off} {len}"))
        .collect();
    for chunk in cmds.chunks(100) {
        qemu_io_qcow2(img, chunk);
    }
}

fn compare(a: &Path, b: &Path) {
    let out =
        run_status(tool("qemu-img").args(["compare", "-f", "qcow2", "-F", "qcow2", ps(a), ps(b)]));
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn overlay_case(cluster: u64, refcount_bits: u32, nwrites: usize, max_len: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let _base = make_base(dir.path(), size);
    let ours = dir.path().join("ours.qcow2");
    let twin = dir.path().join("twin.qcow2");
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster;
    o.refcount_bits = refcount_bits;
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some("raw".into());
    create(&ours, &o).unwrap();
    check_clean(&ours);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster},refcount_bits={refcount_bits}"),
        "-b",
        "base.raw",
        "-F",
        "raw",
        ps(&twin),
    ]);
    let w = writes(cluster ^ u64::from(refcount_bits), size, nwrites, max_len);
    apply_ours(&ours, &w);
    apply_qemu(&twin, &w);
    check_clean(&ours);
    compare(&ours, &twin);
    // Our own reader agrees with QEMU's on what we wrote.
    assert_bytes_eq(
        "ours vs qemu-img convert",
        &read_all_ours(&ours),
        &to_raw(&ours),
    );
}

#[test]
fn overlay_64k_refcount16() {
    overlay_case(64 * KIB, 16, 300, 300 * KIB);
}

#[test]
fn overlay_4k_refcount1() {
    overlay_case(4 * KIB, 1, 300, 64 * KIB);
}

#[test]
fn overlay_512_refcount64_grows_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and one table
    // cluster 2 MiB, so these writes grow the refcount table several times.
    overlay_case(512, 64, 400, 64 * KIB);
}

#[test]
fn overlay_2m_refcount8() {
    overlay_case(2 * MIB, 8, 100, 3 * MIB);
}

#[test]
fn cache_with_backing_written_then_chained() {
    // A cache built by vmicache over a raw base, written through the engine, then an instance
    // over it: QEMU sees the chain we meant and the same bytes as a qemu-io twin.
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let base = make_base(dir.path(), size);
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    let twin = dir.path().join("twin.qcow2");
    qemu_overlay(&twin, "base.raw", "raw");
    let w = writes(99, size, 200, 200 * KIB);
    apply_ours(&cache, &w);
    apply_qemu(&twin, &w);
    check_clean(&cache);
    compare(&cache, &twin);
    let inst = dir.path().join("inst.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    check_clean(&inst);
    let info = qemu_img_json(&["info", "--backing-chain", "--output=json", ps(&inst)]);
    let names: Vec<&str> = info
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names[1].ends_with("cache.qcow2") && names[2].ends_with("base.raw"),
        "{names:?}"
    );
    // Writes into the instance land there only; the cache is untouched.
    let before = std::fs::read(&cache).unwrap();
    apply_ours(&inst, &writes(5, size, 50, 100 * KIB));
    check_clean(&inst);
    assert_eq!(
        before,
        std::fs::read(&cache).unwrap(),
        "instance writes changed the cache file"
    );
}

#[test]
fn overwrite_compressed_and_zero_clusters() {
    // Writes over compressed clusters and zero clusters made by QEMU free the old clusters
    // in the right order: check stays clean (no leaks).
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, pattern(3, (8 * MIB) as usize)).unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", ps(&raw), ps(&img)]);
    let twin = dir.path().join("t.qcow2");
    std::fs::copy(&img, &twin).unwrap();
    let z = ["write -q -z 1M 256k", "write -q -z 3M 64k"];
    qemu_io_qcow2(&img, &z);
    qemu_io_qcow2(&twin, &z);
    let w = writes(11, 8 * MIB, 120, 150 * KIB);
    apply_ours(&img, &w);
    apply_qemu(&twin, &w);
    check_clean(&img);
    compare(&img, &twin);
}
