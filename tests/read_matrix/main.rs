//! Read matrix: images written by qemu-img / qemu-io in many shapes, read back
//! through vmicache and compared byte for byte with `qemu-img convert -O raw`.
//!
//! A few qcow2-only chains are also read with the independent qcow2-rs crate
//! as a sanity check of the reference itself.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use tempfile::TempDir;

mod backing;
mod compressed;
mod snapshots;
mod versions;
mod zeros;

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
