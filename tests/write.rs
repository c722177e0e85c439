//! Writes through our engine against the same writes done by qemu-io on a twin image:
//! `qemu-img check` must be clean and `qemu-img compare` must find them identical.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vmicache::engine::create::{create, CreateOptions};
use vmicache::engine::{Image, OpenOptions};

/// A raw base with data in some places and holes elsewhere.
fn make_base(dir: &Path, size: u64) -> PathBuf {
    let base = dir.join("base.raw");
    let mut data = vec![0u8; size as usize];
    let p = pattern(7, (size / 2) as usize);
    data[(size / 4) as usize..(size / 4 * 3) as usize].copy_from_slice(&p);
    std::fs::write(&base, &data).unwrap();
    base
}

/// Seeded random writes: (offset, length, pattern byte), unaligned, some overlapping.
fn writes(seed: u64, size: u64, n: usize, max_len: u64) -> Vec<(u64, u64, u8)> {
    let mut r = XorShift64::new(seed);
    (0..n)
        .map(|_| {
            let len = r.range(1, max_len);
            let off = r.below(size - len);
            (off, len, r.range(1, 255) as u8)
        })
        .collect()
}

/// A qcow2 image made by our engine, with `cluster`-byte clusters, over `base.raw` next to it
/// when `over_base`.
fn create_ours(img: &Path, size: u64, cluster: u64, over_base: bool) {
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster;
    if over_base {
        o.backing_file = Some("base.raw".into());
        o.backing_format = Some("raw".into());
    }
    create(img, &o).unwrap();
}

fn apply_ours(img: &Path, w: &[(u64, u64, u8)]) {
    let im = Image::open(img, &OpenOptions::read_write()).unwrap();
    for &(off, len, p) in w {
        im.write_at(&vec![p; len as usize], off)
            .unwrap_or_else(|e| panic!("write {off:#x}+{len:#x}: {e}"));
    }
    im.flush(true).unwrap();
}

fn apply_qemu(img: &Path, w: &[(u64, u64, u8)]) {
    let cmds: Vec<String> = w
        .iter()
        .map(|(off, len, p)| format!("write -q -P {p} {off} {len}"))
        .collect();
    for chunk in cmds.chunks(100) {
        qemu_io_qcow2(img, chunk);
    }
}

fn compare(a: &Path, b: &Path) {
    compare_images(a, b, &["-f", "qcow2", "-F", "qcow2"]);
}

/// Where the header of `img` puts the refcount table: `refcount_table_offset` (bytes 48..56)
/// and `refcount_table_clusters` (bytes 56..60), big-endian, read from the file itself.
fn refcount_table(img: &Path) -> (u64, u32) {
    use std::io::Read;
    let mut h = [0u8; 60];
    std::fs::File::open(img)
        .and_then(|mut f| f.read_exact(&mut h))
        .unwrap_or_else(|e| panic!("{}: header: {e}", img.display()));
    (
        u64::from_be_bytes(h[48..56].try_into().unwrap()),
        u32::from_be_bytes(h[56..60].try_into().unwrap()),
    )
}

/// Writes the same random runs into an overlay of ours and a twin made by QEMU and compares
/// them; returns our overlay's refcount table ([`refcount_table`]) before and after the writes.
fn overlay_case(
    cluster: u64,
    refcount_bits: u32,
    nwrites: usize,
    max_len: u64,
) -> ((u64, u32), (u64, u32)) {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let _base = make_base(dir.path(), size);
    let ours = dir.path().join("ours.qcow2");
    let twin = dir.path().join("twin.qcow2");
    let mut o = CreateOptions::new(size);
    o.cluster_size = cluster;
    o.refcount_bits = refcount_bits;
    o.backing_file = Some("base.raw".into());
    o.backing_format = Some("raw".into());
    create(&ours, &o).unwrap();
    check_clean(&ours);
    qemu_create(
        &twin,
        None,
        &[
            "-o",
            &format!("cluster_size={cluster},refcount_bits={refcount_bits}"),
            "-b",
            "base.raw",
            "-F",
            "raw",
        ],
    );
    let w = writes(cluster ^ u64::from(refcount_bits), size, nwrites, max_len);
    let table_before = refcount_table(&ours);
    apply_ours(&ours, &w);
    apply_qemu(&twin, &w);
    check_clean(&ours);
    compare(&ours, &twin);
    // Our own reader agrees with QEMU's on what we wrote.
    assert_bytes_eq(
        "ours vs qemu-img convert",
        &read_all_ours(&ours),
        &to_raw(&ours),
    );
    (table_before, refcount_table(&ours))
}

#[test]
fn overlay_64k_refcount16() {
    overlay_case(64 * KIB, 16, 300, 300 * KIB);
}

#[test]
fn overlay_4k_refcount1() {
    overlay_case(4 * KIB, 1, 300, 64 * KIB);
}

#[test]
fn overlay_512_refcount64_grows_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and one table
    // cluster 2 MiB, so these writes grow the refcount table several times.
    let ((off0, clusters0), (off1, clusters1)) = overlay_case(512, 64, 400, 64 * KIB);
    eprintln!("refcount table: {clusters0} clusters at {off0:#x} -> {clusters1} at {off1:#x}");
    // Each growth at least doubles the table and moves it past everything allocated.
    assert!(
        clusters1 >= 4 * clusters0,
        "refcount table of {clusters0} clusters grew only to {clusters1}"
    );
    assert_ne!(off1, off0, "the grown refcount table stayed in place");
}

#[test]
fn overlay_2m_refcount8() {
    overlay_case(2 * MIB, 8, 100, 3 * MIB);
}

#[test]
fn cache_with_backing_written_then_chained() {
    // A cache built by vmicache over a raw base, written through the engine, then an instance
    // over it: QEMU sees the chain we meant and the same bytes as a qemu-io twin.
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let base = make_base(dir.path(), size);
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    let twin = dir.path().join("twin.qcow2");
    qemu_overlay(&twin, "base.raw", "raw");
    let w = writes(99, size, 200, 200 * KIB);
    apply_ours(&cache, &w);
    apply_qemu(&twin, &w);
    check_clean(&cache);
    compare(&cache, &twin);
    let inst = dir.path().join("inst.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    check_clean(&inst);
    let info = qemu_img_json(&["info", "--backing-chain", "--output=json", ps(&inst)]);
    let names: Vec<&str> = info
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names[1].ends_with("cache.qcow2") && names[2].ends_with("base.raw"),
        "{names:?}"
    );
    // Writes into the instance land there only; the cache is untouched.
    let before = std::fs::read(&cache).unwrap();
    apply_ours(&inst, &writes(5, size, 50, 100 * KIB));
    check_clean(&inst);
    assert_eq!(
        before,
        std::fs::read(&cache).unwrap(),
        "instance writes changed the cache file"
    );
}

#[test]
fn overwrite_compressed_and_zero_clusters() {
    // Writes over compressed clusters and zero clusters made by QEMU free the old clusters
    // in the right order: check stays clean (no leaks).
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, pattern(3, (8 * MIB) as usize)).unwrap();
    let img = dir.path().join("c.qcow2");
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", ps(&raw), ps(&img)]);
    let twin = dir.path().join("t.qcow2");
    std::fs::copy(&img, &twin).unwrap();
    let z = ["write -q -z 1M 256k", "write -q -z 3M 64k"];
    qemu_io_qcow2(&img, &z);
    qemu_io_qcow2(&twin, &z);
    let w = writes(11, 8 * MIB, 120, 150 * KIB);
    apply_ours(&img, &w);
    apply_qemu(&twin, &w);
    check_clean(&img);
    compare(&img, &twin);
}

/// Fills `buf` (guest bytes at `off`, 16-byte aligned) with 16-byte units tagged with the
/// guest offset of their cluster and a writer-specific stamp.
fn tag(buf: &mut [u8], off: u64, cluster: u64, stamp: u64) {
    for (i, unit) in buf.chunks_mut(16).enumerate() {
        let g = (off + i as u64 * 16) / cluster * cluster;
        unit[..8].copy_from_slice(&(g + 1).to_le_bytes());
        unit[8..].copy_from_slice(&stamp.to_le_bytes());
    }
}

/// Every 16-byte unit of `buf` (guest bytes at `off`) is zero or tagged for its own cluster:
/// a unit tagged for another cluster means a host cluster was reused while in use.
fn check_tags(buf: &[u8], off: u64, cluster: u64, what: &str) {
    for (i, unit) in buf.chunks(16).enumerate() {
        let at = off + i as u64 * 16;
        let t = u64::from_le_bytes(unit[..8].try_into().unwrap());
        let want = at / cluster * cluster + 1;
        assert!(
            unit.iter().all(|&b| b == 0) || t == want,
            "{what}: guest {at:#x} holds a unit of guest {:#x}",
            t.wrapping_sub(1)
        );
    }
}

/// Several threads write, zero, read and flush the same few clusters at once: in-place
/// writes and reads run without the metadata lock while zeroing frees clusters that new
/// allocations reuse. No read may see, and no cluster may end up with, bytes meant for
/// another guest offset; `qemu-img check` stays clean.
fn concurrent_case(cluster: u64) {
    const THREADS: u64 = 4;
    const OPS: u64 = 4000;
    let dir = tempfile::tempdir().unwrap();
    let nclusters = 48;
    let size = nclusters * cluster;
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base).unwrap().set_len(size).unwrap();
    let img = dir.path().join("c.qcow2");
    create_ours(&img, size, cluster, true);
    let im = Image::open(&img, &OpenOptions::read_write()).unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let im = &im;
            s.spawn(move || {
                let mut r = XorShift64::new(1000 + t + cluster);
                for seq in 0..OPS {
                    let c = r.below(nclusters);
                    let g = c * cluster;
                    match r.below(100) {
                        0..=29 => {
                            // Whole clusters (one or two).
                            let n = if c + 1 < nclusters { 1 + r.below(2) } else { 1 };
                            let mut b = vec![0u8; (n * cluster) as usize];
                            tag(&mut b, g, cluster, t << 32 | seq);
                            im.write_at(&b, g).unwrap();
                        }
                        30..=44 => {
                            // Part of a cluster: the rest is copied from the old content.
                            let units = cluster / 16;
                            let a = r.below(units);
                            let len = r.range(1, units - a + 1) * 16;
                            let mut b = vec![0u8; len as usize];
                            tag(&mut b, g + a * 16, cluster, t << 32 | seq);
                            im.write_at(&b, g + a * 16).unwrap();
                        }
                        45..=59 => im.write_zeroes(g, cluster).unwrap(),
                        60..=94 => {
                            let n = (1 + r.below(3)).min(nclusters - c);
                            let mut b = vec![0u8; (n * cluster) as usize];
                            im.read_at(&mut b, g).unwrap();
                            check_tags(&b, g, cluster, "read");
                        }
                        _ => im.flush(false).unwrap(),
                    }
                }
            });
        }
    });
    im.flush(true).unwrap();
    drop(im);
    check_clean(&img);
    check_tags(&to_raw(&img), 0, cluster, "final image");
}

#[test]
fn concurrent_writes_zeroes_reads_and_flushes_4k() {
    concurrent_case(4096);
}

#[test]
fn concurrent_writes_zeroes_reads_and_flushes_64k() {
    concurrent_case(64 << 10);
}

/// A file whose reads at one offset stall for a while once armed.
#[derive(Debug)]
struct Stalling {
    inner: vmicache::engine::storage::FileStorage,
    at: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Stalling {
    /// The image at `path` over a stalling file, and the offset to set to arm the stall.
    fn open(path: &Path, write: bool) -> (Image, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let at = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let st = Stalling {
            inner: vmicache::engine::storage::FileStorage::open(path, write).unwrap(),
            at: at.clone(),
        };
        (Image::from_storage(Box::new(st), write).unwrap(), at)
    }
}

impl vmicache::engine::storage::Storage for Stalling {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn len(&self) -> vmicache::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> vmicache::Result<()> {
        if off == self.at.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> vmicache::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn sync(&self) -> vmicache::Result<()> {
        self.inner.sync()
    }
    fn set_len(&self, len: u64) -> vmicache::Result<()> {
        self.inner.set_len(len)
    }
    fn seek_data(&self, off: u64) -> vmicache::Result<Option<u64>> {
        self.inner.seek_data(off)
    }
    fn seek_hole(&self, off: u64) -> vmicache::Result<u64> {
        self.inner.seek_hole(off)
    }
    fn status(
        &self,
        off: u64,
        len: u64,
    ) -> vmicache::Result<(vmicache::engine::storage::FileStatus, u64)> {
        self.inner.status(off, len)
    }
}

/// The host cluster of guest offset `g` at the top layer.
fn host_of(im: &Image, g: u64) -> u64 {
    use vmicache::engine::layer::{MapMode, Mapping};
    match im.layer().map(g, 4096, MapMode::STATUS).unwrap().runs[0].map {
        Mapping::Data { host } => host,
        other => panic!("guest {g:#x} is {other:?}"),
    }
}

/// A read stalled on a data cluster keeps that cluster from being freed and reused: the
/// flush that would free it (after the guest zeroed it) waits for the read, which therefore
/// returns the old data and never the bytes of the guest offset that reuses the cluster.
#[test]
fn a_stalled_read_holds_off_the_reuse_of_its_cluster() {
    const CS: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.qcow2");
    create_ours(&img, MIB, CS, false);
    let (im, at) = Stalling::open(&img, true);
    let mut a = vec![0u8; CS as usize];
    tag(&mut a, 0, CS, 0xA);
    im.write_at(&a, 0).unwrap();
    im.flush(true).unwrap();
    let h0 = host_of(&im, 0);
    at.store(h0, std::sync::atomic::Ordering::SeqCst);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut b = vec![0u8; CS as usize];
            im.read_at(&mut b, 0).unwrap();
            b
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Zero guest cluster 0 (its host cluster is freed by the flush) and write guest
        // cluster 5, which takes the freed host cluster.
        im.write_zeroes(0, CS).unwrap();
        im.flush(false).unwrap();
        let mut b = vec![0u8; CS as usize];
        tag(&mut b, 5 * CS, CS, 0xB);
        im.write_at(&b, 5 * CS).unwrap();
        assert_eq!(host_of(&im, 5 * CS), h0, "the freed cluster is reused");
        assert!(
            reader.join().unwrap() == a,
            "the stalled read returns the old data"
        );
    });
    im.flush(true).unwrap();
    drop(im);
    check_clean(&img);
}

/// A write that must copy the old content of a partial cluster from a stalled backing file
/// does not hold up the other requests of the image: a read and an in-place write of another
/// cluster complete while it waits; then it lands with the right content.
#[test]
fn a_copy_on_write_from_a_stalled_backing_does_not_block_other_requests() {
    const CS: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), MIB);
    let inst = dir.path().join("i.qcow2");
    create_ours(&inst, MIB, CS, true);
    let (below, at) = Stalling::open(&base, false);
    let below = std::sync::Arc::new(below);
    let im = Image::open_over(&inst, &OpenOptions::read_write(), below).unwrap();
    // Empty writes (NBD allows them) change nothing, at the start and inside a cluster.
    im.write_at(&[], 0).unwrap();
    im.write_at(&[], 200 * CS + 7).unwrap();
    im.write_at(&vec![1u8; CS as usize], CS).unwrap();
    let g = 128 * CS; // in the base's data
    at.store(g, std::sync::atomic::Ordering::SeqCst);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            im.write_at(&[9u8; 100], g + 10).unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut b = vec![0u8; CS as usize];
        im.read_at(&mut b, CS).unwrap();
        assert!(b.iter().all(|&x| x == 1));
        im.write_at(&vec![2u8; CS as usize], CS).unwrap();
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "the other requests finished while the copy-on-write read was stalled"
        );
    });
    im.flush(true).unwrap();
    drop(im);
    check_clean(&inst);
    let mut want = std::fs::read(&base).unwrap();
    want[CS as usize..2 * CS as usize].fill(2);
    want[(g + 10) as usize..(g + 110) as usize].fill(9);
    assert_bytes_eq("instance", &to_raw(&inst), &want);
    let m = qemu_img_json(&["map", "--output=json", ps(&inst)]);
    let ours: Vec<(u64, u64)> = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        ours,
        vec![(CS, CS), (g, CS)],
        "only the two written clusters"
    );
}

/// Allocating writes racing for the same clusters, each writing other sectors of them, lose
/// nothing: a write claims the clusters it gives a new home, so the next one waits and copies
/// the first one's bytes (copy-on-write of a partial cluster) rather than the base's.
#[test]
fn racing_partial_writes_to_the_same_clusters_all_land() {
    let d = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let base = make_base(d.path(), size);
    let img = d.path().join("top.qcow2");
    create_ours(&img, size, 65536, true);
    let mut want = std::fs::read(&base).unwrap();
    let threads = 8u64;
    let sectors = size / 512;
    for t in 0..threads {
        for s in (t..sectors).step_by(threads as usize) {
            want[(s * 512) as usize..((s + 1) * 512) as usize].fill(t as u8 + 1);
        }
    }
    let im = Image::open(&img, &OpenOptions::read_write()).unwrap();
    std::thread::scope(|sc| {
        for t in 0..threads {
            let im = &im;
            sc.spawn(move || {
                let b = vec![t as u8 + 1; 512];
                // Each thread walks the clusters in its own order.
                let mut r = XorShift64::new(t + 1);
                let mut order: Vec<u64> = (t..sectors).step_by(threads as usize).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, r.below(i as u64 + 1) as usize);
                }
                for s in order {
                    im.write_at(&b, s * 512).unwrap();
                }
            });
        }
    });
    im.flush(true).unwrap();
    let mut got = vec![0u8; size as usize];
    im.read_at(&mut got, 0).unwrap();
    assert_bytes_eq("read back by us", &got, &want);
    drop(im);
    check_clean(&img);
    assert_bytes_eq("read by qemu-img", &to_raw(&img), &want);
}
