//! Internal snapshots.

use super::*;

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
