//! Check agreement on damaged images.

use super::*;

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
