//! The layer API on its own: what one layer says it holds at a range (`Layer::map`), for
//! images QEMU made, and the chain walker's sparse reads built on it.

mod common;
use common::*;
use vmicache::engine::image::SparseRun;
use vmicache::engine::layer::{MapMode, Mapping, Run};
use vmicache::engine::{Image, OpenOptions};

const K64: u64 = 65536;

fn top_only() -> OpenOptions {
    OpenOptions {
        backing: false,
        ..OpenOptions::read_only()
    }
}

/// A qcow2 image QEMU wrote: data, a zero cluster, two contiguous data clusters, a hole, two
/// compressed clusters, then nothing.
fn qemu_image(dir: &std::path::Path) -> std::path::PathBuf {
    let img = dir.join("l.qcow2");
    qemu_create(&img, Some("1M"), &["-o", "cluster_size=65536"]);
    qemu_io_qcow2(
        &img,
        &[
            "write -q -P 1 0 64k",
            "write -q -z 64k 64k",
            "write -q -P 2 128k 128k",
            "write -q -c -P 3 320k 64k",
            "write -q -c -P 4 384k 64k",
        ],
    );
    img
}

#[test]
fn qcow2_layer_maps_each_kind() {
    let d = tempfile::tempdir().unwrap();
    let img = Image::open(&qemu_image(d.path()), &top_only()).unwrap();
    let l = img.layer();
    let runs = l.map(0, 1 << 20, MapMode::READ).unwrap().runs;
    let kinds: Vec<(u64, u64, &str)> = runs
        .iter()
        .map(|r| {
            let k = match r.map {
                Mapping::Data { .. } => "data",
                Mapping::Zero { .. } => "zero",
                Mapping::Compressed { .. } => "compressed",
                Mapping::Stored => "stored",
                Mapping::Unallocated => "unallocated",
            };
            (r.off, r.len, k)
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (0, K64, "data"),
            (K64, K64, "zero"),
            (2 * K64, 2 * K64, "data"),
            (4 * K64, K64, "unallocated"),
            (5 * K64, K64, "compressed"),
            (6 * K64, K64, "compressed"),
            (7 * K64, 9 * K64, "unallocated"),
        ],
        "{runs:?}"
    );
    // A run starting inside a cluster maps the host offset of its first byte.
    let r = l.map(2 * K64 + 100, 10, MapMode::READ).unwrap().runs;
    match (r[0].map, runs[2].map) {
        (Mapping::Data { host }, Mapping::Data { host: h0 }) => assert_eq!(host, h0 + 100),
        other => panic!("{other:?}"),
    }
    // Block status: one run, compressed clusters merged into one.
    let s = l.map(5 * K64, 11 * K64, MapMode::STATUS).unwrap().runs;
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].off, s[0].len), (5 * K64, 2 * K64));
    assert!(matches!(s[0].map, Mapping::Compressed { .. }));
    // What each run reads back, by the layer alone.
    for (run, byte) in [(runs[0], 1u8), (runs[1], 0), (runs[2], 2), (runs[4], 3)] {
        let mut b = vec![9u8; run.len as usize];
        l.read_run(&mut b, &run).unwrap();
        assert!(b.iter().all(|&x| x == byte), "{run:?}");
    }
    // Out of range is refused, never a panic.
    assert!(l.map(1 << 20, 1, MapMode::READ).is_err());
    assert!(l.map(u64::MAX, 2, MapMode::READ).is_err());
}

#[test]
fn raw_layer_holes_only_when_asked() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(4 * K64).unwrap();
    drop(f);
    write_at(&p, K64, &vec![5u8; K64 as usize]);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let l = img.layer();
    let read = l.map(0, 4 * K64, MapMode::READ).unwrap().runs;
    assert_eq!(
        read,
        vec![Run {
            off: 0,
            len: 4 * K64,
            map: Mapping::Data { host: 0 }
        }]
    );
    let sparse = l.map(0, 4 * K64, MapMode::SPARSE).unwrap().runs;
    let data: Vec<(u64, u64)> = sparse
        .iter()
        .filter(|r| matches!(r.map, Mapping::Data { .. }))
        .map(|r| (r.off, r.len))
        .collect();
    assert_eq!(data, vec![(K64, K64)], "{sparse:?}");
}

/// The walker: a sparse read through an overlay over a raw base with holes says which runs are
/// zero (the overlay's zero cluster, the base's holes) and reads the rest.
#[test]
fn sparse_reads_walk_the_chain_once() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("b.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(4 * K64).unwrap();
    drop(f);
    write_at(&base, 3 * K64, &vec![7u8; K64 as usize]);
    let top = d.path().join("t.qcow2");
    qemu_overlay(&top, "b.raw", "raw");
    qemu_io_qcow2(&top, &["write -q -P 1 0 64k", "write -q -z 64k 64k"]);
    let img = Image::open(&top, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0xeeu8; 4 * K64 as usize];
    let runs = img.read_sparse(&mut buf, 0).unwrap();
    let r = |len, zero| SparseRun { len, zero };
    assert_eq!(runs, vec![r(K64, false), r(2 * K64, true), r(K64, false)]);
    assert!(buf[..K64 as usize].iter().all(|&x| x == 1));
    assert!(buf[K64 as usize..3 * K64 as usize]
        .iter()
        .all(|&x| x == 0xee));
    assert!(buf[3 * K64 as usize..].iter().all(|&x| x == 7));
}
