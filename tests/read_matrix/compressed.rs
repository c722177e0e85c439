//! Compressed clusters.

use super::*;

/// `qemu-img convert -c` of pattern data, then new compressed clusters
/// (`write -c`) and partial overwrites of compressed clusters.
fn compressed_case(label: &str, opts: &str, cluster: u64, size: u64) {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    let img = dir.path().join("img.qcow2");

    // qemu only writes compressed clusters into unallocated ones, so leave
    // clusters 2..4 and the last one all-zero: `convert` does not allocate them.
    let mut data = pattern(
        cluster ^ 0xC0,
        usize::try_from(size).expect("size fits in usize"),
    );
    let c = usize::try_from(cluster).expect("cluster fits in usize");
    let len = data.len();
    data[2 * c..4 * c].fill(0);
    data[len - c..].fill(0);
    std::fs::write(&src, &data).unwrap_or_else(|e| panic!("write {}: {e}", src.display()));

    convert_to_qcow2(&src, &img, opts, true);
    assert_has_compressed(&img);
    let want = verify(&format!("{label} (as converted)"), &img);
    assert_bytes_eq(
        &format!("{label}: qemu-img convert vs source data"),
        &want,
        &data,
    );

    // New compressed clusters, then partial writes into compressed clusters
    // (qemu decompresses, merges and rewrites them uncompressed).
    qemu_io_qcow2(
        &img,
        &[
            w_compressed(0x77, 2 * cluster, 2 * cluster),
            w_compressed(0x78, size - cluster, cluster),
        ],
    );
    qemu_io_qcow2(&img, &mixed_writes(cluster, size, 0x30));
    // (With 2 MiB clusters these writes touch every cluster, so no compressed
    // cluster need be left; the point is reading the merged results.)
    verify(&format!("{label} (after rewrites)"), &img);
}

#[test]
fn compressed_zlib_4k() {
    let opts = "compat=1.1,cluster_size=4096,compression_type=zlib";
    compressed_case("compressed_zlib_4k", opts, 4096, 8 * MIB);
}

#[test]
fn compressed_zlib_64k() {
    let opts = "compat=1.1,cluster_size=65536,compression_type=zlib";
    compressed_case("compressed_zlib_64k", opts, 65536, 8 * MIB);
}

#[test]
fn compressed_zlib_2m() {
    let opts = "compat=1.1,cluster_size=2M,compression_type=zlib";
    compressed_case("compressed_zlib_2m", opts, 2 * MIB, 16 * MIB);
}

#[test]
fn compressed_zstd_4k() {
    let opts = "compat=1.1,cluster_size=4096,compression_type=zstd";
    compressed_case("compressed_zstd_4k", opts, 4096, 8 * MIB);
}

#[test]
fn compressed_zstd_64k() {
    let opts = "compat=1.1,cluster_size=65536,compression_type=zstd";
    compressed_case("compressed_zstd_64k", opts, 65536, 8 * MIB);
}

#[test]
fn compressed_zstd_2m() {
    let opts = "compat=1.1,cluster_size=2M,compression_type=zstd";
    compressed_case("compressed_zstd_2m", opts, 2 * MIB, 16 * MIB);
}

#[test]
fn compressed_v2_64k() {
    compressed_case(
        "compressed_v2_64k",
        "compat=0.10,cluster_size=65536",
        65536,
        8 * MIB,
    );
}

#[test]
fn compressed_v2_512() {
    compressed_case(
        "compressed_v2_512",
        "compat=0.10,cluster_size=512",
        512,
        8 * MIB,
    );
}

/// A qcow2 overlay (partial writes) over a zlib-compressed qcow2 base; also
/// read through qcow2-rs.
fn compressed_base_overlay_case(label: &str, cluster: u64, size: u64) {
    let dir = tmpdir();
    let src = dir.path().join("src.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    write_pattern(&src, 0xBA5E ^ cluster, size);
    let opts = format!("compat=1.1,cluster_size={cluster},compression_type=zlib");
    convert_to_qcow2(&src, &base, &opts, true);
    assert_has_compressed(&base);
    check_clean(&base);

    create_qcow2(
        &top,
        &format!("compat=1.1,cluster_size={cluster}"),
        Some((ps(&base), "qcow2")),
        None,
    );
    qemu_io_qcow2(&top, &mixed_writes(cluster, size, 0x50));
    qemu_io_qcow2(&top, &random_writes(0x0C0F ^ cluster, cluster, size, 32));
    verify_with_qcow2rs(label, &top);
}

#[test]
fn compressed_base_overlay_4k() {
    compressed_base_overlay_case("compressed_base_overlay_4k", 4096, 8 * MIB);
}

#[test]
fn compressed_base_overlay_64k() {
    compressed_base_overlay_case("compressed_base_overlay_64k", 65536, 8 * MIB);
}

#[test]
fn compressed_base_overlay_2m() {
    compressed_base_overlay_case("compressed_base_overlay_2m", 2 * MIB, 16 * MIB);
}
