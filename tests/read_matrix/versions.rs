//! Versions and cluster sizes.

use super::*;

/// A single qcow2 image (no backing) with mixed and random writes.
fn single_image_case(label: &str, opts: &str, cluster: u64, size: u64) {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    create_qcow2(&img, opts, None, Some(size));
    qemu_io_qcow2(&img, &mixed_writes(cluster, size, 0x10));
    qemu_io_qcow2(&img, &random_writes(cluster ^ size, cluster, size, 32));
    verify(label, &img);
}

#[test]
fn v2_cluster_512() {
    single_image_case(
        "v2_cluster_512",
        "compat=0.10,cluster_size=512",
        512,
        8 * MIB,
    );
}

#[test]
fn v2_cluster_4k() {
    single_image_case(
        "v2_cluster_4k",
        "compat=0.10,cluster_size=4096",
        4096,
        8 * MIB,
    );
}

#[test]
fn v2_cluster_64k() {
    single_image_case(
        "v2_cluster_64k",
        "compat=0.10,cluster_size=65536",
        65536,
        8 * MIB,
    );
}

#[test]
fn v2_cluster_2m() {
    single_image_case(
        "v2_cluster_2m",
        "compat=0.10,cluster_size=2M",
        2 * MIB,
        16 * MIB,
    );
}

#[test]
fn v3_cluster_512() {
    single_image_case(
        "v3_cluster_512",
        "compat=1.1,cluster_size=512",
        512,
        8 * MIB,
    );
}

#[test]
fn v3_cluster_4k() {
    single_image_case(
        "v3_cluster_4k",
        "compat=1.1,cluster_size=4096",
        4096,
        8 * MIB,
    );
}

#[test]
fn v3_cluster_64k() {
    single_image_case(
        "v3_cluster_64k",
        "compat=1.1,cluster_size=65536",
        65536,
        8 * MIB,
    );
}

#[test]
fn v3_cluster_2m() {
    single_image_case(
        "v3_cluster_2m",
        "compat=1.1,cluster_size=2M",
        2 * MIB,
        16 * MIB,
    );
}

#[test]
fn v3_lazy_refcounts() {
    single_image_case(
        "v3_lazy_refcounts",
        "compat=1.1,lazy_refcounts=on",
        65536,
        8 * MIB,
    );
}

/// An image whose size is not a multiple of the cluster size (nor of 1 MiB,
/// so the last chunk read is short).
#[test]
fn v3_size_not_cluster_aligned() {
    let size = 8 * MIB + 5 * 512;
    single_image_case("v3_size_not_cluster_aligned", "compat=1.1", 65536, size);
}

// ---------------------------------------------------------------------------
// Refcount widths (v3 only)
// ---------------------------------------------------------------------------

fn refcount_case(bits: u32) {
    let label = format!("refcount_bits_{bits}");
    let opts = format!("compat=1.1,cluster_size=4096,refcount_bits={bits}");
    single_image_case(&label, &opts, 4096, 8 * MIB);
}

#[test]
fn refcount_bits_1() {
    refcount_case(1);
}

#[test]
fn refcount_bits_2() {
    refcount_case(2);
}

#[test]
fn refcount_bits_4() {
    refcount_case(4);
}

#[test]
fn refcount_bits_8() {
    refcount_case(8);
}

#[test]
fn refcount_bits_16() {
    refcount_case(16);
}

#[test]
fn refcount_bits_32() {
    refcount_case(32);
}

#[test]
fn refcount_bits_64() {
    refcount_case(64);
}

// ---------------------------------------------------------------------------
// Formats qemu writes that are not (yet) required
// ---------------------------------------------------------------------------

#[test]
#[ignore = "extended L2 entries (subclusters) are not required yet"]
fn extended_l2() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    write_pattern(&base, 0xE2, 8 * MIB);
    create_qcow2(
        &top,
        "compat=1.1,extended_l2=on,cluster_size=65536",
        Some((ps(&base), "raw")),
        None,
    );
    qemu_io_qcow2(&top, &mixed_writes(65536, 8 * MIB, 0x15));
    qemu_io_qcow2(
        &top,
        &[wz(2 * MIB + 2048, 4096, false), wz(3 * MIB, 2048, true)],
    );
    verify("extended_l2", &top);
}

#[test]
#[ignore = "external data files are not required yet"]
fn external_data_file() {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    let data = dir.path().join("img.data");
    let opts = format!("compat=1.1,data_file={}", ps(&data));
    create_qcow2(&img, &opts, None, Some(8 * MIB));
    qemu_io_qcow2(&img, &mixed_writes(65536, 8 * MIB, 0x25));
    verify("external_data_file", &img);
}
