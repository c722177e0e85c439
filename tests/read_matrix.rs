//! Read matrix: images written by qemu-img / qemu-io in many shapes, read back
//! through vmicache and compared byte for byte with `qemu-img convert -O raw`.
//!
//! A few qcow2-only chains are also read with the independent qcow2-rs crate
//! as a sanity check of the reference itself.

mod common;

use std::path::Path;

use common::*;
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn tmpdir() -> TempDir {
    tempfile::tempdir().expect("create tempdir")
}

/// `qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F BACKING_FMT] PATH [SIZE]`.
fn create_qcow2(path: &Path, opts: &str, backing: Option<(&str, &str)>, size: Option<u64>) {
    let size = size.map(|s| s.to_string());
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    if let Some((file, fmt)) = backing {
        args.extend(["-b", file, "-F", fmt]);
    }
    args.push(ps(path));
    if let Some(size) = &size {
        args.push(size.as_str());
    }
    qemu_img(&args);
}

/// Writes `pattern(seed, len)` to a raw file at `path` and returns the data.
fn write_pattern(path: &Path, seed: u64, len: u64) -> Vec<u8> {
    let data = pattern(seed, usize::try_from(len).expect("size fits in usize"));
    std::fs::write(path, &data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    data
}

/// `qemu-img convert -f raw -O qcow2 [-c] -o OPTS SRC DST`.
fn convert_to_qcow2(src: &Path, dst: &Path, opts: &str, compress: bool) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
    if compress {
        args.push("-c");
    }
    args.extend(["-o", opts, ps(src), ps(dst)]);
    qemu_img(&args);
}

/// qemu-io command writing `len` bytes of `pat` at `off`.
fn w(pat: u8, off: u64, len: u64) -> String {
    format!("write -P {pat:#04x} {off} {len}")
}

/// qemu-io command writing `len` bytes of `pat` at `off` as compressed
/// clusters (`off` and `len` cluster-aligned; the clusters must be unallocated).
fn w_compressed(pat: u8, off: u64, len: u64) -> String {
    format!("write -c -P {pat:#04x} {off} {len}")
}

/// qemu-io command writing zeroes (`write -z`, `-u` to allow unmapping).
fn wz(off: u64, len: u64, unmap: bool) -> String {
    let flags = if unmap { "-z -u" } else { "-z" };
    format!("write {flags} {off} {len}")
}

/// Writes chosen to hit the interesting cases for cluster size `c`: a full
/// cluster, a write inside one cluster, one straddling a cluster boundary,
/// one covering a full cluster with partial clusters on both sides, one in
/// the middle of the image and one ending exactly at the end of the image.
fn mixed_writes(c: u64, size: u64, salt: u8) -> Vec<String> {
    assert!(
        size >= 8 * c,
        "image of {size} bytes too small for cluster size {c}"
    );
    vec![
        w(salt, 0, c),
        w(salt.wrapping_add(1), c + 100, c / 2),
        w(salt.wrapping_add(2), 3 * c - 300, 600),
        w(salt.wrapping_add(3), 5 * c + 1, 2 * c + 3),
        w(salt.wrapping_add(4), size / 2 + 12_345, 3 * 4096 + 7),
        w(salt.wrapping_add(5), size - 777, 777),
    ]
}

/// `count` pseudo-random writes at arbitrary byte offsets, each 1 byte to 3
/// clusters long.
fn random_writes(seed: u64, c: u64, size: u64, count: usize) -> Vec<String> {
    let mut rng = XorShift64::new(seed);
    (0..count)
        .map(|_| {
            let off = rng.below(size - 1);
            let len = rng.range(1, 3 * c).min(size - off);
            w(rng.next_u64() as u8, off, len)
        })
        .collect()
}

/// Asserts `qemu-img map` reports at least one entry satisfying `pred`.
fn assert_map_has(path: &Path, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let map = qemu_img_json(&["map", "--output=json", ps(path)]);
    let entries = map.as_array().expect("qemu-img map prints an array");
    assert!(
        entries.iter().any(pred),
        "{}: expected {what} in qemu-img map:\n{map:#}",
        path.display()
    );
}

fn flag(entry: &serde_json::Value, key: &str) -> bool {
    entry
        .get(key)
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

fn assert_has_compressed(path: &Path) {
    assert_map_has(path, "compressed clusters", |e| flag(e, "compressed"));
}

/// Asserts the image has clusters qemu reads as zeroes without data in the
/// layer (zero flag, or preallocated zero clusters).
fn assert_has_zero_clusters(path: &Path) {
    assert_map_has(path, "zero clusters in the top layer", |e| {
        flag(e, "zero")
            && flag(e, "present")
            && e.get("depth").and_then(serde_json::Value::as_u64) == Some(0)
    });
}

/// Checks the (qcow2) image at `top`, then compares vmicache's view of it
/// with qemu's. Returns qemu's view.
fn verify(label: &str, top: &Path) -> Vec<u8> {
    check_clean(top);
    let want = to_raw(top);
    let got = read_all_ours(top);
    assert_bytes_eq(
        &format!("{label}: vmicache vs qemu-img convert"),
        &got,
        &want,
    );
    want
}

/// `verify`, plus the same comparison for the independent qcow2-rs reader.
/// See `read_all_qcow2rs` for which chains qualify.
fn verify_with_qcow2rs(label: &str, top: &Path) {
    let want = verify(label, top);
    let other = read_all_qcow2rs(top);
    assert_bytes_eq(
        &format!("{label}: qcow2-rs vs qemu-img convert (second reader disagrees with qemu)"),
        &other,
        &want,
    );
}

/// Guest contents of `path` read through the qcow2-rs crate (0.1.x), an
/// independent qcow2 implementation.
///
/// qcow2-rs 0.1.6 limits, hence only some chains use it:
/// - every image in the chain must be qcow2 v3: it reads `header_length` and
///   `incompatible_features` at their v3 offsets, where a v2 image keeps its
///   header extensions, and rejects (or misparses) v2 images;
/// - no incompatible features at all, so no zstd compression;
/// - cluster size >= 4 KiB (it uses 4 KiB L2 slices; 512-byte clusters make
///   `cluster_bits - 12` underflow);
/// - raw backing files are not supported (every backing file is opened as
///   qcow2) and backing names are opened as-is, i.e. relative to the process
///   cwd, so chains must be created with absolute backing paths;
/// - a backing file smaller than its overlay is not handled reliably, and
///   reads must be 512-byte aligned and must not cross the end of the image.
///
/// Reads go one cluster at a time (its single-cluster path is the simplest).
fn read_all_qcow2rs(path: &Path) -> Vec<u8> {
    use qcow2_rs::dev::Qcow2DevParams;
    use qcow2_rs::utils::qcow2_setup_dev_sync;

    // 512-byte logical blocks (bits = 9), default refblock / L2 caches,
    // read-only, no O_DIRECT. Same as qcow2_rs::qcow2_default_params!(true, false).
    let params = Qcow2DevParams::new(9, None, None, true, false);
    let dev = qcow2_setup_dev_sync(path, &params)
        .unwrap_or_else(|e| panic!("qcow2-rs: open {}: {e}", path.display()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        // Loads L1 and refcount tables of the whole chain.
        dev.qcow2_prep_io()
            .await
            .unwrap_or_else(|e| panic!("qcow2-rs: prepare {}: {e}", path.display()));
        let size = usize::try_from(dev.info.virtual_size()).expect("virtual size fits in usize");
        let step = dev.info.cluster_size();
        let mut out = vec![0u8; size];
        let mut off = 0;
        while off < size {
            let end = (off + step).min(size);
            let n = dev
                .read_at(&mut out[off..end], off as u64)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "qcow2-rs: read {}+{} of {}: {e}",
                        off,
                        end - off,
                        path.display()
                    )
                });
            assert_eq!(
                n,
                end - off,
                "qcow2-rs: short read at {off} of {}",
                path.display()
            );
            off = end;
        }
        out
    })
}

/// Removes the backing-format header extension from a qcow2 image, leaving
/// an image whose backing file format must be probed. (qemu-img refuses to
/// create such images nowadays but still opens them.)
fn strip_backing_format(path: &Path) {
    const BACKING_FORMAT_EXT: u32 = 0xE279_2ACA;

    fn be32(data: &[u8], off: usize) -> u32 {
        u32::from_be_bytes(data[off..off + 4].try_into().expect("4 bytes"))
    }

    let mut data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let version = be32(&data, 4);
    let header_len = if version >= 3 {
        be32(&data, 100) as usize
    } else {
        72
    };

    // Walk the extension list (type, length, data padded to 8 bytes; type 0 ends it).
    let mut off = header_len;
    let mut kept = Vec::new();
    let mut found = false;
    loop {
        let ty = be32(&data, off);
        if ty == 0 {
            break;
        }
        let padded = (be32(&data, off + 4) as usize).next_multiple_of(8);
        if ty == BACKING_FORMAT_EXT {
            found = true;
        } else {
            kept.extend_from_slice(&data[off..off + 8 + padded]);
        }
        off += 8 + padded;
    }
    assert!(found, "{}: no backing format extension", path.display());

    // Rewrite the list in place; the end marker and zero padding fill the
    // freed space. The backing file name lies after the old list and stays put.
    let end = off + 8;
    kept.resize(end - header_len, 0);
    data[header_len..end].copy_from_slice(&kept);
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));

    let info = qemu_img_json(&["info", "--output=json", ps(path)]);
    assert!(
        info.get("backing-filename").is_some() && info.get("backing-filename-format").is_none(),
        "{}: backing format still recorded after stripping:\n{info:#}",
        path.display()
    );
}

// ---------------------------------------------------------------------------
// Versions and cluster sizes
// ---------------------------------------------------------------------------

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
// Compressed clusters
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Zero clusters
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Backing chains
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Internal snapshots
// ---------------------------------------------------------------------------

/// Writes, snapshot, overwrites (COW of clusters shared with the snapshot),
/// second snapshot, more writes: the active layer must read right.
fn snapshot_case(label: &str, compat: &str) {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    create_qcow2(&img, &format!("compat={compat}"), None, Some(size));
    qemu_io_qcow2(&img, &mixed_writes(65536, size, 0x01));
    qemu_io_qcow2(&img, &[w(0x0a, MIB, 2 * MIB)]);
    qemu_img(&["snapshot", "-c", "snap1", ps(&img)]);
    qemu_io_qcow2(&img, &random_writes(0x5AA1, 65536, size, 32));
    qemu_io_qcow2(
        &img,
        &[
            wz(MIB + 64 * KIB, 128 * KIB, false),
            w(0x0b, MIB + 300, 300),
        ],
    );
    qemu_img(&["snapshot", "-c", "snap2", ps(&img)]);
    qemu_io_qcow2(&img, &mixed_writes(65536, size, 0x60));

    let list = qemu_img(&["snapshot", "-l", ps(&img)]);
    assert!(
        list.contains("snap1") && list.contains("snap2"),
        "snapshots missing:\n{list}"
    );
    verify(label, &img);
}

#[test]
fn internal_snapshot_v3() {
    snapshot_case("internal_snapshot_v3", "1.1");
}

#[test]
fn internal_snapshot_v2() {
    snapshot_case("internal_snapshot_v2", "0.10");
}

/// Snapshot, overwrite, revert to the snapshot (`snapshot -a`), write again.
#[test]
fn internal_snapshot_applied() {
    let dir = tmpdir();
    let img = dir.path().join("img.qcow2");
    let size = 8 * MIB;
    create_qcow2(&img, "compat=1.1", None, Some(size));
    qemu_io_qcow2(&img, &mixed_writes(65536, size, 0x01));
    qemu_img(&["snapshot", "-c", "snap1", ps(&img)]);
    qemu_io_qcow2(&img, &[w(0xee, 0, 4 * MIB)]);
    qemu_img(&["snapshot", "-a", "snap1", ps(&img)]);
    qemu_io_qcow2(&img, &random_writes(0xA991, 65536, size, 16));
    verify("internal_snapshot_applied", &img);
}

/// Snapshot in an overlay over a raw base.
#[test]
fn internal_snapshot_in_overlay() {
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let size = 8 * MIB;
    write_pattern(&base, 0x5B, size);
    create_qcow2(&top, "compat=1.1", Some((ps(&base), "raw")), None);
    qemu_io_qcow2(&top, &mixed_writes(65536, size, 0x71));
    qemu_img(&["snapshot", "-c", "snap1", ps(&top)]);
    qemu_io_qcow2(&top, &random_writes(0x5C, 65536, size, 32));
    verify("internal_snapshot_in_overlay", &top);
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
