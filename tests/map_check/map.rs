//! Maps: `inspect --map --json` against `qemu-img map --output=json`.

use super::*;

#[test]
fn map_qcow2_without_backing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("z.qcow2");
    create_qcow2(&img, "8M", "cluster_size=65536", None);
    qemu_io_qcow2(
        &img,
        &[
            "write -q -P 0xaa 0 128k",
            // Over data: the cluster stays allocated with the zero flag (zero-alloc).
            "write -q -z 64k 64k",
            // Over nothing: a plain zero cluster.
            "write -q -z 256k 64k",
            "write -q -c -P 0xcc 512k 64k",
            "write -q -c -P 0xcd 576k 64k",
            "write -q -P 0x11 1M 64k",
            "write -q -P 0x22 2M 192k",
            // Unmapping zero write over data: plain zero.
            "write -q -z -u 2112k 64k",
            "write -q -c -P 0x33 4M 128k",
            "write -q -P 0x44 7M 64k",
        ],
    );
    let m = assert_map_eq(&img);
    assert_has(
        &m,
        "data",
        &[("data", true.into()), ("compressed", false.into())],
    );
    assert_has(&m, "compressed", &[("compressed", true.into())]);
    let zero = |with_offset: bool| {
        m.iter().any(|e| {
            e["present"] == true && e["zero"] == true && e.get("offset").is_some() == with_offset
        })
    };
    assert!(zero(true), "no zero-alloc extent: {m:?}");
    assert!(zero(false), "no plain zero extent: {m:?}");
    assert_has(&m, "unallocated", &[("present", false.into())]);
}

#[test]
fn map_of_zero_sized_images() {
    // qemu-img map prints one zero-length entry (all flags false) for an image of size 0.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    assert_map_eq(&empty);
    let q = dir.path().join("zero.qcow2");
    create_qcow2(&q, "0", "", None);
    assert_map_eq(&q);
}

#[test]
fn map_qcow2_preallocation_metadata() {
    // Preallocated clusters are holes in the file: QEMU detects metadata preallocation and
    // reports them as zero (with data and an offset).
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.qcow2");
    create_qcow2(
        &img,
        "4M",
        "cluster_size=65536,preallocation=metadata",
        None,
    );
    qemu_io_qcow2(
        &img,
        &[
            "write -q -P 1 0 128k",
            "write -q -z 64k 64k",
            "write -q -P 2 1M 64k",
            "write -q -z 2M 128k",
        ],
    );
    assert_map_eq(&img);
}

#[test]
fn map_qcow2_over_sparse_raw() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(
        &base,
        4 * MIB,
        &[
            "write -q -P 1 0 64k",
            "write -q -P 2 1M 128k",
            "write -q -P 3 3M 64k",
        ],
    );
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, "6M", "cluster_size=65536", Some(("base.raw", "raw")));
    qemu_io_qcow2(
        &top,
        &[
            "write -q -P 9 64k 64k",
            "write -q -z 1M 64k",
            "write -q -P 8 2M 64k",
            "write -q -z 3M 64k",
            "write -q -P 7 5M 64k",
        ],
    );
    let m = assert_map_eq(&top);
    assert_has(
        &m,
        "backing data",
        &[("depth", 1.into()), ("data", true.into())],
    );
    assert_has(
        &m,
        "backing hole",
        &[("depth", 1.into()), ("zero", true.into())],
    );
    // The raw file alone too.
    assert_map_eq(&base);
}

#[test]
fn map_qcow2_over_raw_made_by_qemu_img() {
    // qemu-img create writes the raw file's first 4 KiB: it maps as data, the rest as holes.
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", ps(&base), "2M"]);
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, "2M", "", Some(("base.raw", "raw")));
    qemu_io_qcow2(&top, &["write -q -P 5 1M 64k"]);
    let m = assert_map_eq(&top);
    assert_has(
        &m,
        "first 4k of the raw file",
        &[
            ("start", 0.into()),
            ("length", 4096.into()),
            ("depth", 1.into()),
        ],
    );
}

#[test]
fn map_three_levels_of_different_sizes() {
    // raw (2M) <- mid.qcow2 (3M) <- top.qcow2 (4M), as in the notes, with 64k-aligned raw data.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    qemu_img(&["create", "-q", "-f", "raw", ps(&raw), "2M"]);
    qemu_io(
        &raw,
        &["-f", "raw"],
        &["write -q -P 0x11 0 64k", "write -q -P 0x12 1088k 64k"],
    );
    let mid = dir.path().join("mid.qcow2");
    create_qcow2(&mid, "3M", "", Some(("raw.img", "raw")));
    qemu_io_qcow2(
        &mid,
        &["write -q -P 0x21 64k 64k", "write -q -P 0x22 2560k 64k"],
    );
    let top = dir.path().join("top.qcow2");
    create_qcow2(&top, "4M", "", Some(("mid.qcow2", "qcow2")));
    qemu_io_qcow2(
        &top,
        &[
            "write -q -P 0x31 1M 64k",
            "write -q -z 1536k 64k",
            "write -q -P 0x32 3584k 64k",
        ],
    );
    let m = assert_map_eq(&top);
    assert_has(
        &m,
        "raw layer",
        &[("depth", 2.into()), ("data", true.into())],
    );
    assert_has(
        &m,
        "past the raw file",
        &[("depth", 1.into()), ("present", false.into())],
    );
    assert_has(
        &m,
        "past mid",
        &[("depth", 0.into()), ("present", false.into())],
    );
    assert_map_eq(&mid);
}

#[test]
fn map_cache_and_instance() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(
        &base,
        8 * MIB,
        &[
            "write -q -P 1 0 256k",
            "write -q -P 2 1M 64k",
            "write -q -P 3 3M 512k",
            "write -q -P 4 7M 64k",
        ],
    );
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    assert_map_eq(&cache);
    // Fill part of the cache the way a boot would (same bytes as the base).
    qemu_io_qcow2(&cache, &["write -q -P 1 0 128k", "write -q -P 3 3M 128k"]);
    let inst = dir.path().join("inst.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    qemu_io_qcow2(
        &inst,
        &[
            "write -q -P 0x55 64k 64k",
            "write -q -z 3M 64k",
            "write -q -P 0x56 5M 100k",
            "write -q -P 0x57 8000k 3k",
        ],
    );
    assert_check_agrees(&cache, 0);
    assert_check_agrees(&inst, 0);
    let m = assert_map_eq(&inst);
    for depth in 0..3 {
        assert_has(
            &m,
            "data at each depth",
            &[("depth", depth.into()), ("data", true.into())],
        );
    }
    assert_map_eq(&cache);
    // Sealed, the cache reaches its base lazily; `inspect` opens it (to show it) and the map
    // still names the base at depth 1 under the cache, 2 under the instance.
    run(bin().args(["seal", ps(&cache)]));
    let m = assert_map_eq(&cache);
    assert_has(
        &m,
        "the base at depth 1",
        &[("depth", 1.into()), ("data", true.into())],
    );
    let m = assert_map_eq(&inst);
    assert_has(
        &m,
        "the base at depth 2",
        &[("depth", 2.into()), ("data", true.into())],
    );
}

/// A qcow2 of `size` with `cluster` clusters over a sparse raw file, written at seeded random
/// places with data, zeros and (whole clusters) compressed data.
fn scattered_case(cluster: u64, size: u64, nwrites: usize, max_len: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let raw_size = size / 2;
    let raw_writes: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "write -q -P {} {} 64k",
                i + 1,
                (raw_size / 8 * i) & !(64 * KIB - 1)
            )
        })
        .collect();
    let raw_writes: Vec<&str> = raw_writes.iter().map(String::as_str).collect();
    sparse_raw(&base, raw_size, &raw_writes);
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        &size.to_string(),
        &format!("cluster_size={cluster}"),
        Some(("base.raw", "raw")),
    );
    let mut r = XorShift64::new(seed);
    // Compressed writes first: QEMU only compresses into clusters not yet allocated.
    let clusters = size / cluster;
    let mut used = vec![false; clusters as usize];
    let mut cmds = Vec::new();
    for _ in 0..nwrites / 5 {
        let n = r.range(1, 4);
        let first = r.below(clusters - n);
        let range = first as usize..(first + n) as usize;
        if used[range.clone()].iter().any(|&u| u) {
            continue;
        }
        used[range].fill(true);
        cmds.push(format!(
            "write -q -c -P {} {} {}",
            r.range(1, 255),
            first * cluster,
            n * cluster
        ));
    }
    for _ in 0..nwrites {
        let len = r.range(1, max_len / 512) * 512;
        let off = r.below((size - len) / 512) * 512;
        let kind = r.below(8);
        if kind < 2 {
            cmds.push(format!("write -q -z {off} {len}"));
        } else if kind == 2 {
            cmds.push(format!("discard -q {off} {len}"));
        } else {
            cmds.push(format!("write -q -P {} {off} {len}", r.range(1, 255)));
        }
    }
    for chunk in cmds.chunks(100) {
        qemu_io_qcow2(&top, chunk);
    }
    let m = assert_map_eq(&top);
    assert!(m.len() > 10, "suspiciously short map: {m:?}");
    assert_check_agrees(&top, 0);
}

#[test]
fn map_cluster_512() {
    for seed in 0..3 {
        scattered_case(512, 4 * MIB, 200, 8 * KIB, 512 + seed);
    }
}

#[test]
fn map_cluster_4k() {
    for seed in 0..3 {
        scattered_case(4 * KIB, 16 * MIB, 200, 40 * KIB, 4096 + seed);
    }
}

#[test]
fn map_cluster_2m() {
    for seed in 0..2 {
        scattered_case(2 * MIB, 64 * MIB, 40, 3 * MIB, 2 + seed);
    }
}

#[test]
fn map_1g_scattered() {
    scattered_case(64 * KIB, 1024 * MIB, 120, 256 * KIB, 1 << 30);
}

#[test]
fn map_top_smaller_than_backing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    sparse_raw(
        &base,
        4 * MIB,
        &["write -q -P 1 0 64k", "write -q -P 2 1M 1M"],
    );
    let top = dir.path().join("top.qcow2");
    create_qcow2(
        &top,
        "1536K",
        "cluster_size=65536",
        Some(("base.raw", "raw")),
    );
    qemu_io_qcow2(&top, &["write -q -P 3 1088k 64k", "write -q -z 1216k 64k"]);
    assert_map_eq(&top);
}
