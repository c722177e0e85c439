//! Zero clusters.

use super::*;

/// Zero writes on a standalone image: over data (aligned, with and without
/// unmap), on unallocated clusters, and unaligned (partial clusters).
fn zero_writes_cmds() -> Vec<String> {
    vec![
        w(0x5a, 0, 2 * MIB),
        w(0x5b, 4 * MIB, MIB),
        wz(64 * KIB, 128 * KIB, false),
        wz(512 * KIB, 128 * KIB, true),
        wz(3 * MIB, 256 * KIB, false),
        wz(6 * MIB, 256 * KIB, true),
        wz(1000, 3000, false),
        wz(MIB + 100, 200 * KIB, false),
        wz(4 * MIB + 4096 + 7, 70_000, true),
        // Data written back into part of a zeroed range.
        w(0x5c, 64 * KIB + 512, 1024),
    ]
}

#[test]
fn zero_v3_flag() {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    create_qcow2(&img, "compat=1.1", None, Some(8 * MIB));
    qemu_io_qcow2(&img, &zero_writes_cmds());
    assert_has_zero_clusters(&img);
    verify("zero_v3_flag", &img);
}

#[test]
fn zero_v3_flag_cluster_4k() {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    create_qcow2(&img, "compat=1.1,cluster_size=4096", None, Some(8 * MIB));
    qemu_io_qcow2(&img, &zero_writes_cmds());
    assert_has_zero_clusters(&img);
    verify("zero_v3_flag_cluster_4k", &img);
}

#[test]
fn zero_v2() {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    create_qcow2(&img, "compat=0.10", None, Some(8 * MIB));
    qemu_io_qcow2(&img, &zero_writes_cmds());
    verify("zero_v2", &img);
}

/// Zero writes in an overlay must hide the backing data (zero flag in v3,
/// explicit zero data in v2).
fn zero_over_backing_case(label: &str, compat: &str) {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0x2E40, 8 * MIB);
    create_qcow2(
        &top,
        &format!("compat={compat}"),
        Some((ps(&base), "raw")),
        None,
    );
    qemu_io_qcow2(
        &top,
        &[
            wz(0, 64 * KIB, false),
            wz(128 * KIB, 256 * KIB, true),
            wz(MIB + 3, 70_000, false),
            w(0x61, 2 * MIB, 128 * KIB),
            wz(2 * MIB + 64 * KIB, 64 * KIB, true),
            wz(2 * MIB + 1000, 1000, false),
            wz(8 * MIB - 64 * KIB, 64 * KIB, false),
        ],
    );
    if compat == "1.1" {
        assert_has_zero_clusters(&top);
    }
    verify(label, &top);
}

#[test]
fn zero_v3_over_backing() {
    zero_over_backing_case("zero_v3_over_backing", "1.1");
}

#[test]
fn zero_v2_over_backing() {
    zero_over_backing_case("zero_v2_over_backing", "0.10");
}

/// Preallocated images: clusters allocated up front (reading as zeroes),
/// then data writes and zero writes with and without unmap.
fn prealloc_case(mode: &str) {
    let label = format!("zero_prealloc_{mode}");
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    create_qcow2(
        &img,
        &format!("compat=1.1,preallocation={mode}"),
        None,
        Some(8 * MIB),
    );
    qemu_io_qcow2(&img, &zero_writes_cmds());
    qemu_io_qcow2(&img, &mixed_writes(65536, 8 * MIB, 0x70));
    verify(&label, &img);
}

#[test]
fn zero_prealloc_metadata() {
    prealloc_case("metadata");
}

#[test]
fn zero_prealloc_falloc() {
    prealloc_case("falloc");
}

#[test]
fn zero_prealloc_full() {
    prealloc_case("full");
}

#[test]
fn zero_prealloc_metadata_v2() {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    create_qcow2(
        &img,
        "compat=0.10,preallocation=metadata",
        None,
        Some(8 * MIB),
    );
    qemu_io_qcow2(&img, &zero_writes_cmds());
    verify("zero_prealloc_metadata_v2", &img);
}
