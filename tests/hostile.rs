//! Hostile input: damaged or malicious images never make vmicache panic, hang or allocate
//! without bound. Every refusal is one line on stderr, `vmicache: ...`, naming the problem,
//! with exit code 1; commands that create files leave nothing behind.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmicache::engine::{Image, OpenOptions};
use vmicache::format::header::Header;

/// Longest a refusal may take: hostile sizes must be rejected before anything big is read
/// or allocated.
const FAST: Duration = Duration::from_secs(5);

fn read_u64(path: &Path, off: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

/// 64k clusters, 8M, data at 0..128k and 1M. Layout: 0 header, 1 reftable, 2 refblock, 3 L1,
/// 4 L2, 5,6 data for 0..128k, 7 data for 1M; 0x80000 bytes.
fn base_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, Some("8M"), &["-o", "cluster_size=65536"]);
    qemu_io_qcow2(&p, &["write -q -P 0xaa 0 128k", "write -q -P 0xbb 1M 64k"]);
    p
}

/// Runs vmicache with `args` and asserts a clean refusal: exit 1, one stderr line starting with
/// `vmicache: ` that contains every string of `names` (case-insensitive; `a|b` accepts either),
/// no panic or backtrace, within `FAST`.
fn assert_refused(args: &[&str], names: &[&str]) -> String {
    let t = Instant::now();
    let out = run_status(bin().args(args).env("RUST_BACKTRACE", "1"));
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let ctx = format!(
        "vmicache {args:?}: exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{stderr}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(1), "{ctx}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected exactly one line on stderr\n{ctx}");
    assert!(lines[0].starts_with("vmicache: "), "{ctx}");
    let lower = lines[0].to_lowercase();
    for n in names {
        assert!(
            n.split('|').any(|alt| lower.contains(&alt.to_lowercase())),
            "the message does not name the problem ({n:?})\n{ctx}"
        );
    }
    assert!(took < FAST, "took {took:?}\n{ctx}");
    lines[0].to_string()
}

/// `inspect X`, `inspect X --map`, `check X` and `chain X -o Y` all refuse `img` naming the
/// problem; Y is not created.
fn refused_everywhere(img: &Path, names: &[&str]) {
    refused_by_open(img, names);
    assert_refused(&["check", ps(img)], names);
    assert_refused(&["check", ps(img), "--json"], names);
}

/// The commands that open the whole chain refuse `img`: `inspect` (plain, --map, --map --json)
/// and `chain`.
fn refused_by_open(img: &Path, names: &[&str]) {
    let p = ps(img);
    assert_refused(&["inspect", p], names);
    assert_refused(&["inspect", p, "--map"], names);
    assert_refused(&["inspect", p, "--map", "--json"], names);
    chain_refused(img, names);
}

fn chain_refused(img: &Path, names: &[&str]) {
    let inst = img.with_extension("instance.qcow2");
    assert_refused(&["chain", ps(img), "-o", ps(&inst)], names);
    assert!(
        !inst.exists(),
        "chain left {} behind after refusing",
        inst.display()
    );
}

/// A copy of `src` named `name` with `bytes` written at `off`.
fn patched(dir: &Path, src: &Path, name: &str, off: u64, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(src, &p).unwrap();
    write_at(&p, off, bytes);
    p
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.img");
    std::fs::File::create(&img).unwrap();
    // No magic: QEMU probes an empty file as a 0-byte raw image, so inspect shows it (the map
    // itself is compared with qemu-img's in map_check/); it must not panic.
    for args in [
        &["inspect"][..],
        &["inspect", "--json"],
        &["inspect", "--map", "--json"],
    ] {
        let out = run_status(bin().args(args).arg(&img));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("panicked"),
            "vmicache {args:?} on an empty file: {:?}\n{stderr}",
            out.status.code()
        );
    }
    // There is no qcow2 metadata to check, and a raw file is not a cache.
    assert_refused(&["check", ps(&img)], &["qcow2"]);
    chain_refused(&img, &["qcow2"]);
}

#[test]
fn truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.qcow2");
    let img = dir.path().join("short.qcow2");
    std::fs::write(&img, &std::fs::read(&base).unwrap()[..50]).unwrap();
    refused_everywhere(&img, &["short"]);
}

/// One header field of a good image patched to a bad value: (case, offset, bytes, words the
/// refusal must contain). Absurd sizes (a 16 GiB L1 table, a 32 TiB refcount table) must be
/// refused from the header alone, quickly (assert_refused bounds the time), without trying
/// to allocate or read them.
#[test]
fn header_fields_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.qcow2");
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    let be64 = |v: u64| v.to_be_bytes().to_vec();
    let cases: Vec<(&str, u64, Vec<u8>, &[&str])> = vec![
        ("version_7", 4, be32(7), &["version 7"]),
        ("cluster_bits_8", 20, be32(8), &["cluster", "8"]),
        ("cluster_bits_22", 20, be32(22), &["cluster", "22"]),
        ("encryption_aes", 32, be32(1), &["encryption"]),
        ("encryption_luks", 32, be32(2), &["encryption"]),
        ("l1_size_huge", 36, be32(0x7fff_ffff), &["L1"]),
        ("l1_table_past_eof", 40, be64(64 * MIB), &["L1"]),
        (
            "refcount_table_clusters_huge",
            56,
            be32(0x00ff_ffff),
            &["refcount table|reference count table"],
        ),
        (
            "refcount_table_clusters_max",
            56,
            be32(0xffff_ffff),
            &["refcount table|reference count table"],
        ),
        (
            "incompatible_bit_63",
            72,
            be64(1 << 63),
            &["incompatible", "63"],
        ),
        (
            "header_length_huge",
            100,
            be32(0xffff_ffff),
            &["header_length|header length"],
        ),
        (
            "header_length_small",
            100,
            be32(50),
            &["header_length|header length"],
        ),
        ("refcount_order_7", 96, be32(7), &["refcount"]),
        ("compression_type_7", 104, vec![7], &["compression"]),
        (
            "backing_offset_past_cluster",
            8,
            be64(0x20000),
            &["backing"],
        ),
        ("virtual_size_2_62", 24, be64(1 << 62), &["L1"]),
        ("virtual_size_max", 24, be64(u64::MAX), &["size"]),
        ("l1_offset_unaligned", 40, be64(0x30200), &["L1"]),
        ("l1_offset_zero", 40, be64(0), &["L1"]),
        (
            "refcount_table_offset_unaligned",
            48,
            be64(0x10200),
            &["refcount table"],
        ),
        (
            "refcount_table_past_eof",
            48,
            be64(1 << 40),
            &["refcount table"],
        ),
        (
            "refcount_table_clusters_0",
            56,
            be32(0),
            &["refcount table"],
        ),
        ("nb_snapshots_huge", 60, be32(0x7fff_ffff), &["snapshot"]),
    ];
    for (name, off, bytes, names) in cases {
        let img = patched(dir.path(), &base, &format!("{name}.qcow2"), off, &bytes);
        refused_everywhere(&img, names);
    }
}

#[test]
fn garbage_snapshot_table() {
    // Three snapshots "stored" in a data cluster full of 0xaa: absurd lengths everywhere.
    // Opening may or may not read the table; whatever reads it refuses cleanly.
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.qcow2");
    let img = patched(dir.path(), &base, "snaps.qcow2", 60, &3u32.to_be_bytes());
    write_at(&img, 64, &0x50000u64.to_be_bytes());
    for args in [
        &["inspect"][..],
        &["inspect", "--map", "--json"],
        &["inspect", "--json"],
    ] {
        let out = run_status(bin().args(args).arg(&img));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if !out.status.success() {
            assert_refused(&[args, &[ps(&img)]].concat(), &["snapshot"]);
        }
    }
    assert_refused(&["check", ps(&img)], &["snapshot"]);
}

#[test]
fn chain_deeper_than_the_limit() {
    // 300 qcow2 files, each backed by the next: refused (not a stack overflow), quickly.
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    let name = |i: usize| format!("c{i:03}.qcow2");
    let last = dir.path().join(name(n));
    qemu_create(&last, Some("1M"), &[]);
    let template = dir.path().join("template.qcow2");
    qemu_create(
        &template,
        Some("1M"),
        &["-u", "-b", &name(1), "-F", "qcow2"],
    );
    let t = std::fs::read(&template).unwrap();
    let at = read_u64(&template, 8) as usize;
    assert_eq!(&t[at..at + 10], name(1).as_bytes());
    for i in 0..n {
        let mut b = t.clone();
        b[at..at + 10].copy_from_slice(name(i + 1).as_bytes());
        std::fs::write(dir.path().join(name(i)), b).unwrap();
    }
    let top = dir.path().join(name(0));
    refused_by_open(&top, &["deep|depth|layers"]);
    // QEMU has no depth limit, so `check` may check the top image or refuse; never crash.
    let out = run_status(bin().args(["check", ps(&top)]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(0 | 1)) && !stderr.contains("panicked"),
        "{:?}\n{stderr}",
        out.status.code()
    );
    // A chain within the limit opens.
    run(bin().args(["inspect", ps(&dir.path().join(name(n - 200)))]));
}

#[test]
fn backing_file_name_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, vec![0u8; MIB as usize]).unwrap();
    let img = dir.path().join("long.qcow2");
    qemu_overlay(&img, "base.raw", "raw");
    assert_ne!(read_u64(&img, 8), 0, "no backing file name");
    write_at(&img, 16, &2000u32.to_be_bytes());
    refused_everywhere(&img, &["backing file name"]);
}

#[test]
fn backing_loop() {
    // a.qcow2 -> b.qcow2 -> a.qcow2. `check` must refuse as well: qemu-img check opens the
    // whole backing chain (see missing_backing_file). Do not point qemu-img check or map at
    // this chain: QEMU 10 loops without end (check grew past 1.7 GB in a few minutes).
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    for (img, backing) in [(&a, "b.qcow2"), (&b, "a.qcow2")] {
        qemu_create(img, Some("1M"), &["-u", "-b", backing, "-F", "qcow2"]);
    }
    refused_everywhere(&a, &["loop"]);
}

#[test]
fn missing_backing_file() {
    // qemu-img check opens the backing chain and refuses (exit 1):
    // `Could not open 'X': Could not open backing file: Could not open 'gone.qcow2': No such
    // file or directory`. vmicache check must refuse too, naming the missing file.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("orphan.qcow2");
    qemu_create(&img, Some("1M"), &["-u", "-b", "gone.qcow2", "-F", "qcow2"]);
    chain_refused(&img, &["gone.qcow2"]);
    assert_refused(&["check", ps(&img)], &["gone.qcow2"]);
    assert_refused(&["check", ps(&img), "--json"], &["gone.qcow2"]);
    // inspect never needs the base (issue #11): the layer is shown as unreachable, exit 0.
    let out = run(bin().args(["inspect", ps(&img)]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("unreachable") && text.contains("gone.qcow2"),
        "{text}"
    );
}

#[test]
fn external_data_file_and_extended_l2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ext.qcow2");
    let data_file = dir.path().join("ext.data");
    qemu_create(
        &data,
        Some("4M"),
        &["-o", &format!("data_file={}", ps(&data_file))],
    );
    refused_everywhere(&data, &["external data file"]);

    let ext = dir.path().join("extl2.qcow2");
    qemu_create(&ext, Some("4M"), &["-o", "extended_l2=on"]);
    qemu_io_qcow2(&ext, &["write -q -P 1 0 4k"]);
    refused_everywhere(&ext, &["extended L2"]);
}

#[test]
fn l2_table_past_eof_after_truncation() {
    // The file is cut right before its L2 table (0x40000). Reading, mapping and making an
    // instance refuse. `check` reports it as qemu-img check does (a corruption, exit 2): that
    // is what check is for.
    let dir = tempfile::tempdir().unwrap();
    let img = base_image(dir.path(), "cut.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(0x40000)
        .unwrap();
    let p = ps(&img);
    assert_refused(&["inspect", p], &["outside the image"]);
    assert_refused(&["inspect", p, "--map"], &["outside the image"]);
    assert_refused(&["inspect", p, "--map", "--json"], &["outside the image"]);
    chain_refused(&img, &[]);

    // The numbers are compared with qemu-img's in map_check/.
    let out = run_status(bin().args(["check", p]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");

    // Through the library: everything under L1 entry 0 is gone, reads fail cleanly.
    let im = Image::open(&img, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = im.read_at(&mut buf, 0).unwrap_err();
    assert!(e.to_string().contains("outside the image"), "{e}");
}

#[test]
fn library_reads_of_bad_clusters_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.qcow2");

    // An L2 entry pointing past EOF (L2 at 0x40000, entry 2 = guest 128k).
    let past = patched(
        dir.path(),
        &base,
        "past.qcow2",
        0x40000 + 8 * 2,
        &0x8000_0000_0100_0000u64.to_be_bytes(),
    );
    let im = Image::open(&past, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let e = im
        .read_at(&mut buf, 128 * 1024)
        .expect_err("read of a cluster past EOF succeeded");
    assert!(e.to_string().contains("past.qcow2"), "{e}");
    // Other clusters still read.
    im.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xaa));
    drop(im);
    assert_refused(&["inspect", ps(&past), "--map"], &["past the end"]);

    // A compressed cluster whose bytes are garbage.
    let comp = dir.path().join("comp.qcow2");
    qemu_create(&comp, Some("8M"), &["-o", "cluster_size=65536"]);
    qemu_io_qcow2(
        &comp,
        &["write -q -c -P 0x5a 0 64k", "write -q -P 1 1M 64k"],
    );
    let l1 = read_u64(&comp, 40);
    let l2 = read_u64(&comp, l1) & 0x00ff_ffff_ffff_fe00;
    let entry = read_u64(&comp, l2);
    assert_ne!(
        entry & (1 << 62),
        0,
        "cluster 0 is not compressed: {entry:#x}"
    );
    let host = entry & ((1u64 << 54) - 1); // 62 - (16 - 8) offset bits
                                           // 0xff: a final deflate block of the reserved type 3, an error at once.
    write_at(&comp, host, &[0xff; 512]);
    let im = Image::open(&comp, &OpenOptions::read_only()).unwrap();
    let e = im
        .read_at(&mut buf, 0)
        .expect_err("read of a garbage compressed cluster succeeded");
    assert!(e.to_string().contains("compressed"), "{e}");
    im.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 1));
    // Random garbage of every length that fits in the descriptor: never a panic.
    let mut r = XorShift64::new(77);
    for i in 0..64 {
        let mut g = vec![0u8; 512 + (i * 97) % 1024];
        r.fill(&mut g);
        write_at(&comp, host, &g);
        let im = Image::open(&comp, &OpenOptions::read_only()).unwrap();
        let _ = im.read_at(&mut buf, 0);
    }
}

#[test]
fn header_parser_survives_random_damage() {
    // A real header cluster with extensions and a backing name, damaged at random in its first
    // 512 bytes. Only panics fail; every result is acceptable.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.qcow2");
    std::fs::write(dir.path().join("b.raw"), [0u8; 4096]).unwrap();
    qemu_create(&img, Some("64M"), &["-b", "b.raw", "-F", "raw"]);
    let file_len = std::fs::metadata(&img).unwrap().len();
    let orig = read_prefix(&img, 65536);
    assert!(Header::parse(&orig, file_len).is_ok());
    let mut buf = orig.clone();
    let mut r = XorShift64::new(0x00c0_ffee);
    for i in 0..20_000u32 {
        buf.copy_from_slice(&orig);
        for _ in 0..r.range(1, 9) {
            let at = r.below(512) as usize;
            buf[at] = match r.below(4) {
                0 => 0,
                1 => 0xff,
                2 => buf[at] ^ (1 << r.below(8)),
                _ => r.next_u64() as u8,
            };
        }
        // Now and then a shorter slice (a short file) or a different file length.
        let len = if i % 8 == 0 {
            r.below(600) as usize
        } else {
            buf.len()
        };
        let flen = if i % 5 == 0 {
            r.next_u64() >> r.below(64)
        } else {
            file_len
        };
        let _ = Header::parse(&buf[..len], flen);
    }
}
