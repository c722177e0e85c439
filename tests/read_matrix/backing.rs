//! Backing chains.

use super::*;

fn qcow2_over_raw_case(label: &str, opts: &str, cluster: u64, size: u64) {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0xBA5E, size);
    create_qcow2(&top, opts, Some((ps(&base), "raw")), None);
    qemu_io_qcow2(&top, &mixed_writes(cluster, size, 0x20));
    qemu_io_qcow2(&top, &random_writes(0x0123 ^ cluster, cluster, size, 48));
    verify(label, &top);
}

#[test]
fn backing_qcow2_over_raw_v3() {
    qcow2_over_raw_case("backing_qcow2_over_raw_v3", "compat=1.1", 65536, 8 * MIB);
}

#[test]
fn backing_qcow2_over_raw_v2() {
    qcow2_over_raw_case("backing_qcow2_over_raw_v2", "compat=0.10", 65536, 8 * MIB);
}

#[test]
fn backing_qcow2_over_raw_cluster_512() {
    qcow2_over_raw_case(
        "backing_qcow2_over_raw_cluster_512",
        "compat=1.1,cluster_size=512",
        512,
        8 * MIB,
    );
}

#[test]
fn backing_qcow2_over_raw_cluster_2m() {
    qcow2_over_raw_case(
        "backing_qcow2_over_raw_cluster_2m",
        "compat=1.1,cluster_size=2M",
        2 * MIB,
        16 * MIB,
    );
}

/// raw <- qcow2 <- qcow2, with writes at both qcow2 levels.
#[test]
fn backing_three_levels_raw_base() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let size = 8 * MIB;
    write_pattern(&base, 3, size);
    create_qcow2(&mid, "compat=1.1", Some((ps(&base), "raw")), None);
    qemu_io_qcow2(&mid, &mixed_writes(65536, size, 0x80));
    qemu_io_qcow2(&mid, &random_writes(31, 65536, size, 24));
    check_clean(&mid);
    create_qcow2(
        &top,
        "compat=1.1,cluster_size=4096",
        Some((ps(&mid), "qcow2")),
        None,
    );
    qemu_io_qcow2(&top, &random_writes(32, 4096, size, 48));
    qemu_io_qcow2(
        &top,
        &[wz(0, 64 * KIB, false), wz(5 * MIB, 192 * KIB, true)],
    );
    verify("backing_three_levels_raw_base", &top);
}

/// qcow2 <- qcow2 (same cluster size, v3, absolute backing path) with mixed
/// and random (mostly unaligned) overlay writes; also read through qcow2-rs
/// when it can handle the cluster size.
fn overlay_unaligned_case(label: &str, cluster: u64, size: u64) {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let opts = format!("compat=1.1,cluster_size={cluster}");
    write_pattern(&src, 0xB0B ^ cluster, size);
    convert_to_qcow2(&src, &base, &opts, false);
    qemu_io_qcow2(&base, &random_writes(0xB0C ^ cluster, cluster, size, 16));
    check_clean(&base);

    create_qcow2(&top, &opts, Some((ps(&base), "qcow2")), None);
    qemu_io_qcow2(&top, &mixed_writes(cluster, size, 0x40));
    qemu_io_qcow2(&top, &random_writes(0xB0D ^ cluster, cluster, size, 64));
    if cluster >= 4096 {
        verify_with_qcow2rs(label, &top);
    } else {
        verify(label, &top);
    }
}

#[test]
fn overlay_unaligned_writes_cluster_512() {
    overlay_unaligned_case("overlay_unaligned_writes_cluster_512", 512, 4 * MIB);
}

#[test]
fn overlay_unaligned_writes_cluster_4k() {
    overlay_unaligned_case("overlay_unaligned_writes_cluster_4k", 4096, 8 * MIB);
}

#[test]
fn overlay_unaligned_writes_cluster_64k() {
    overlay_unaligned_case("overlay_unaligned_writes_cluster_64k", 65536, 8 * MIB);
}

#[test]
fn overlay_unaligned_writes_cluster_2m() {
    overlay_unaligned_case("overlay_unaligned_writes_cluster_2m", 2 * MIB, 16 * MIB);
}

/// qcow2 <- qcow2 <- qcow2, all v3 64k with absolute paths; also qcow2-rs.
#[test]
fn backing_three_levels_qcow2() {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let size = 8 * MIB;
    write_pattern(&src, 0x3333, size);
    convert_to_qcow2(&src, &base, "compat=1.1", false);
    check_clean(&base);
    create_qcow2(&mid, "compat=1.1", Some((ps(&base), "qcow2")), None);
    qemu_io_qcow2(&mid, &mixed_writes(65536, size, 0x90));
    qemu_io_qcow2(&mid, &[wz(2 * MIB, 128 * KIB, false)]);
    check_clean(&mid);
    create_qcow2(&top, "compat=1.1", Some((ps(&mid), "qcow2")), None);
    qemu_io_qcow2(&top, &random_writes(0x3334, 65536, size, 48));
    verify_with_qcow2rs("backing_three_levels_qcow2", &top);
}

#[test]
fn backing_qcow2_over_qcow2_v2() {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let size = 8 * MIB;
    write_pattern(&src, 0x2222, size);
    convert_to_qcow2(&src, &base, "compat=0.10", false);
    check_clean(&base);
    create_qcow2(&top, "compat=0.10", Some((ps(&base), "qcow2")), None);
    qemu_io_qcow2(&top, &mixed_writes(65536, size, 0xA0));
    qemu_io_qcow2(&top, &random_writes(0x2223, 65536, size, 48));
    verify("backing_qcow2_over_qcow2_v2", &top);
}

/// Overlay of 16 MiB over an 8 MiB raw base: beyond the end of the backing
/// file the guest reads zeroes; writes below, across and above the boundary.
#[test]
fn backing_smaller_than_overlay() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0x5A11, 8 * MIB);
    create_qcow2(&top, "compat=1.1", Some((ps(&base), "raw")), Some(16 * MIB));
    qemu_io_qcow2(
        &top,
        &[
            w(0x11, MIB + 100, 1000),
            w(0x12, 8 * MIB - 1000, 3000),
            w(0x13, 12 * MIB + 7, 5000),
            w(0x14, 16 * MIB - 512, 512),
        ],
    );
    verify("backing_smaller_than_overlay", &top);
}

/// Same with a qcow2 base (of a smaller virtual size).
#[test]
fn backing_qcow2_smaller_than_overlay() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create_qcow2(&base, "compat=1.1", None, Some(8 * MIB));
    qemu_io_qcow2(&base, &[w(0x21, 0, 8 * MIB), wz(MIB, 64 * KIB, false)]);
    check_clean(&base);
    create_qcow2(
        &top,
        "compat=1.1",
        Some((ps(&base), "qcow2")),
        Some(16 * MIB),
    );
    qemu_io_qcow2(
        &top,
        &[w(0x22, 8 * MIB - 1000, 3000), w(0x23, 9 * MIB + 5, 5)],
    );
    verify("backing_qcow2_smaller_than_overlay", &top);
}

/// A raw base whose size is a multiple of 512 but not of the overlay's
/// cluster size, so the last overlay cluster is partly backed.
#[test]
fn backing_raw_size_not_cluster_aligned() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0x0DD, 8 * MIB - 1536);
    create_qcow2(&top, "compat=1.1", Some((ps(&base), "raw")), Some(8 * MIB));
    qemu_io_qcow2(
        &top,
        &[w(0x31, 8 * MIB - 64 * KIB + 100, 100), w(0x32, 100, 100)],
    );
    verify("backing_raw_size_not_cluster_aligned", &top);
}

/// Overlay smaller than its backing file: only the overlay's size is visible.
#[test]
fn backing_larger_than_overlay() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0x1A26E, 16 * MIB);
    create_qcow2(&top, "compat=1.1", Some((ps(&base), "raw")), Some(8 * MIB));
    qemu_io_qcow2(&top, &mixed_writes(65536, 8 * MIB, 0xB0));
    verify("backing_larger_than_overlay", &top);
}

/// Relative backing names are resolved against the directory of the image
/// that names them, never the process cwd (which for tests is the package
/// root): dir/base.raw <- dir/a/mid.qcow2 ("../base.raw") <- dir/a/b/top.qcow2
/// ("../mid.qcow2").
#[test]
fn backing_relative_path() {
    let dir = tmpdir();
    let a = dir.path().join("a");
    let b = a.join("b");
    std::fs::create_dir_all(&b).expect("mkdir");
    let base = dir.path().join("base.raw");
    let mid = a.join("mid.qcow2");
    let top = b.join("top.qcow2");
    write_pattern(&base, 0x4E1, 8 * MIB);
    create_qcow2(&mid, "compat=1.1", Some(("../base.raw", "raw")), None);
    qemu_io_qcow2(&mid, &mixed_writes(65536, 8 * MIB, 0xC0));
    check_clean(&mid);
    create_qcow2(&top, "compat=1.1", Some(("../mid.qcow2", "qcow2")), None);
    qemu_io_qcow2(&top, &random_writes(0x4E2, 65536, 8 * MIB, 32));

    let info = qemu_img_json(&["info", "--output=json", ps(&top)]);
    assert_eq!(
        info["backing-filename"], "../mid.qcow2",
        "relative name recorded:\n{info:#}"
    );
    assert!(
        !Path::new("../mid.qcow2").exists() && !Path::new("../base.raw").exists(),
        "cwd-relative backing names must not resolve for this test to mean anything"
    );
    // Backing files above the overlay's directory must be allowed (process-wide).
    vmicache::engine::open::allow_backing_in(dir.path()).unwrap();
    verify("backing_relative_path", &top);
}

/// Backing file without a recorded format (the format must be probed).
#[test]
fn backing_no_format_raw() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0xF0, 8 * MIB);
    create_qcow2(&top, "compat=1.1", Some((ps(&base), "raw")), None);
    qemu_io_qcow2(&top, &mixed_writes(65536, 8 * MIB, 0xD0));
    strip_backing_format(&top);
    verify("backing_no_format_raw", &top);
}

#[test]
fn backing_no_format_qcow2() {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    write_pattern(&src, 0xF1, 8 * MIB);
    convert_to_qcow2(&src, &base, "compat=1.1", false);
    create_qcow2(&top, "compat=1.1", Some((ps(&base), "qcow2")), None);
    qemu_io_qcow2(&top, &mixed_writes(65536, 8 * MIB, 0xE0));
    strip_backing_format(&top);
    verify_with_qcow2rs("backing_no_format_qcow2", &top);
}

#[test]
fn backing_no_format_v2() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0xF2, 8 * MIB);
    create_qcow2(&top, "compat=0.10", Some((ps(&base), "raw")), None);
    qemu_io_qcow2(&top, &mixed_writes(65536, 8 * MIB, 0xF0));
    strip_backing_format(&top);
    verify("backing_no_format_v2", &top);
}
