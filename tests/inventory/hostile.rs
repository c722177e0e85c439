//! Partition tables and hostile file systems, made here: ext4 by `mkfs.ext4 -d` (e2fsprogs),
//! tables and damage written byte by byte. A hostile image gives warnings or an error, never
//! a panic, a hang or unbounded memory.

use super::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A small tree to put in a file system: /etc/hostname, /a/b/c.txt, /bin/tool (4 KiB), ...
pub fn tree(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("etc/hostname"), "hostile\n").unwrap();
    std::fs::write(root.join("a/b/c.txt"), "see\n").unwrap();
    std::fs::write(root.join("a/b/back"), "to be a loop\n").unwrap();
    std::fs::write(root.join("a/ghost"), "to be out of range\n").unwrap();
    std::fs::write(root.join("a/huge"), "to be absurd\n").unwrap();
    std::fs::write(root.join("bin/tool"), pattern(7, 4096)).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("etc/link")).unwrap();
    // Too long to be kept in the inode: a slow symlink, its target in a data block.
    std::os::unix::fs::symlink(format!("/{}", "x".repeat(100)), root.join("etc/longlink")).unwrap();
    root
}

/// An 8 MiB ext4 (1 KiB blocks) of [`tree`] in `dir`/fs.raw; `features`: -O list.
pub fn small_fs(dir: &Path, features: &str) -> PathBuf {
    let root = tree(dir);
    let img = dir.join("fs.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mkfs(&img, 0, 8192, &root, features);
    img
}

/// mkfs.ext4 of `root` into `img` at byte `offset`, `size_kib` KiB; `features`: -O list.
pub fn mkfs(img: &Path, offset: u64, size_kib: u64, root: &Path, features: &str) {
    let mut c = tool("mkfs.ext4");
    c.args(["-q", "-F", "-b", "1024", "-E"])
        .arg(format!("offset={offset}"))
        .args(["-d", ps(root)]);
    if !features.is_empty() {
        c.args(["-O", features]);
    }
    run(c.arg(ps(img)).arg(format!("{size_kib}k")));
}

fn crc32(b: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(b);
    c.sum()
}

/// A GPT (512-byte sectors) naming `parts` (first, last sector, name) in a disk of `sectors`.
pub fn write_gpt(img: &Path, sectors: u64, parts: &[(u64, u64, &str)]) {
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0xEE;
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    mbr[446 + 12..446 + 16]
        .copy_from_slice(&((sectors - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    let linux: [u8; 16] = [
        0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D,
        0xE4,
    ];
    let mut entries = vec![0u8; 128 * 128];
    for (i, (first, last, name)) in parts.iter().enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[..16].copy_from_slice(&linux);
        e[16] = i as u8 + 1;
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (k, u) in name.encode_utf16().enumerate() {
            e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
        }
    }
    let mut h = vec![0u8; 512];
    h[..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x10000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&128u32.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
    let c = crc32(&h[..92]);
    h[16..20].copy_from_slice(&c.to_le_bytes());
    write_at(img, 0, &mbr);
    write_at(img, 512, &h);
    write_at(img, 1024, &entries);
}

/// The `key` string of every item of the JSON array `list`.
pub fn strings<'a>(list: &'a serde_json::Value, key: &str) -> Vec<&'a str> {
    let items = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"));
    items.iter().map(|i| i[key].as_str().unwrap()).collect()
}

/// The entry of inventory `j` at `path`.
pub fn entry_at<'a>(j: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    let entries = j["entries"].as_array().unwrap();
    entries
        .iter()
        .find(|e| e["path"] == path)
        .unwrap_or_else(|| panic!("{path} not listed"))
}

/// `vmicache inventory ARGS` with a deadline and 2 GiB of address space: (exit code, stdout,
/// stderr). Panics on a hang, a signal (an allocation that fails aborts), or a panic (exit 101).
pub fn inventory(args: &[&str]) -> (i32, String, String) {
    let t = Instant::now();
    let out = run_status(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 2097152 && exec timeout 120 \"$@\"")
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_vmicache"))
            .arg("inventory")
            .args(args),
    );
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let code = out.status.code().unwrap_or(-1);
    assert!(code != 124, "inventory {args:?} hung ({:?})", t.elapsed());
    assert!(
        !se.contains("panicked") && code != 101 && code >= 0,
        "inventory {args:?} crashed ({code}):\n{se}"
    );
    (code, so, se)
}

/// Byte offset of the first occurrence of `needle` in the file.
fn find(img: &Path, needle: &[u8]) -> u64 {
    let b = std::fs::read(img).unwrap();
    b.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the image")) as u64
}

#[test]
fn gpt_partitions_and_their_file_systems_are_found() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(d.path());
    let img = d.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    // Partition 1: 1 MiB with no file system; partition 2: ext4 from sector 4096 (2 MiB).
    write_gpt(
        &img,
        32768,
        &[(2048, 4095, "empty"), (4096, 32700, "rootfs")],
    );
    mkfs(&img, 4096 * 512, (32701 - 4096) / 2, &root, "");
    let (code, out, err) = inventory(&["--json", ps(&img)]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let parts = j["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{out}");
    assert_eq!(parts[1]["name"], "rootfs");
    assert_eq!(parts[1]["kind"], "gpt Linux filesystem");
    assert_eq!(j["filesystems"][0]["partition"], 2);
    let paths = strings(&j["entries"], "path");
    for p in ["/etc/hostname", "/a/b/c.txt", "/bin/tool", "/etc/link"] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    assert_eq!(entry_at(&j, "/etc/link")["target"], "/etc/hostname");
    assert_eq!(
        entry_at(&j, "/etc/longlink")["target"],
        format!("/{}", "x".repeat(100))
    );
    // The same disk as qcow2 (QEMU converts it) lists the same.
    let q = d.path().join("disk.qcow2");
    run(tool("qemu-img").args(["convert", "-O", "qcow2", ps(&img), ps(&q)]));
    let (_, qout, _) = inventory(&["--json", ps(&q)]);
    let k: serde_json::Value = serde_json::from_str(&qout).unwrap();
    assert_eq!(j["entries"], k["entries"]);
}

#[test]
fn hostile_file_systems_give_warnings_not_crashes() {
    let d = tempfile::tempdir().unwrap();
    // No metadata checksums: the damage below must reach our parsing, not stop at a checksum.
    let img = small_fs(d.path(), "^metadata_csum,^dir_index");
    // /a/b/back: a directory entry made to name the root directory (a loop).
    // A directory entry: inode (4), record length (2), name length, file type (1 = file), name.
    let back = find(&img, b"\x04\x01back") - 6;
    write_at(&img, back, &2u32.to_le_bytes());
    write_at(&img, back + 7, &[2]); // file type: directory
                                    // /a/ghost: an inode number past the end of the inode tables.
    let ghost = find(&img, b"\x05\x01ghost") - 6;
    write_at(&img, ghost, &0x7fff_fff0u32.to_le_bytes());
    let (code, out, err) = inventory(&[ps(&img)]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("/a/b/c.txt") && out.contains("/etc/hostname"),
        "{out}"
    );
    assert!(err.contains("met before"), "no loop warning:\n{err}");
    assert!(
        err.contains("ghost"),
        "no warning about the out-of-range inode:\n{err}"
    );

    // An MBR whose only partition runs past the end of the disk.
    let mut mbr = vec![0u8; 512];
    mbr[446 + 4] = 0x83;
    mbr[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    mbr[446 + 12..446 + 16].copy_from_slice(&4_000_000u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    write_at(&img, 0, &mbr);
    let (code, _, err) = inventory(&[ps(&img)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("past the end of the disk"), "{err}");
    assert!(err.contains("no ext2/3/4 file system found"), "{err}");
}

#[test]
fn absurd_sizes_are_refused_per_file() {
    let d = tempfile::tempdir().unwrap();
    let img = small_fs(d.path(), "");
    // A file claiming 2^56 bytes, and another whose extent (i_block words 3-5: block, length,
    // start) points past the file system.
    run(tool("debugfs").args(["-w", "-R", "sif /a/huge size 0x100000000000000", ps(&img)]));
    run(tool("debugfs").args(["-w", "-R", "sif /bin/tool block[5] 0x7fffffff", ps(&img)]));
    let (code, out, err) = inventory(&["--json", ps(&img)]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    // ext4-view refuses the inode ("too many blocks"): listed, with a warning, no metadata.
    assert!(j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["path"] == "/a/huge"));
    assert!(
        err.contains("/a/huge"),
        "no warning for the absurd size:\n{err}"
    );
    assert!(
        err.contains("/bin/tool"),
        "no warning for the extent past the end:\n{err}"
    );
    // --diff reads content: an absurd size is not read through.
    let (code, _, err) = inventory(&["--diff", ps(&img), ps(&img)]);
    assert_eq!(code, 0, "{err}");
}

/// Mutation fuzzing of the partition and file-system probing: random bytes of a small disk
/// (GPT + ext4, metadata within the first 600 KiB) changed, thousands of times, in process.
#[test]
fn fuzzed_disks_never_panic() {
    use vmicache::engine::{Image, OpenOptions};
    let d = tempfile::tempdir().unwrap();
    let root = tree(d.path());
    let clean = d.path().join("clean.raw");
    std::fs::File::create(&clean)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    write_gpt(&clean, 8192, &[(64, 8100, "root")]);
    mkfs(&clean, 64 * 512, (8101 - 64) / 2, &root, "");
    let pristine = std::fs::read(&clean).unwrap();
    let img = d.path().join("fuzz.raw");
    let mut rng = XorShift64::new(0x1234_5678);
    let rounds: usize = std::env::var("VMICACHE_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let t = Instant::now();
    let mut listed = 0;
    for round in 0..rounds {
        let mut b = pristine.clone();
        for _ in 0..1 + rng.below(16) {
            let at = rng.below(600 << 10) as usize;
            b[at] = rng.next_u64() as u8;
        }
        std::fs::write(&img, &b).unwrap();
        let one = Instant::now();
        let got = std::panic::catch_unwind(|| {
            let im = Image::open(&img, &OpenOptions::read_only()).unwrap();
            vmicache::inventory::take(
                im,
                "fuzz",
                &vmicache::inventory::Options {
                    hash_content: true,
                    ..Default::default()
                },
            )
        });
        match got {
            Ok(Ok(inv)) => listed += usize::from(!inv.entries.is_empty()),
            Ok(Err(_)) => {}
            Err(_) => {
                std::fs::copy(&img, "/tmp/vmicache-fuzz-panic.raw").ok();
                panic!("round {round} panicked (the disk is in /tmp/vmicache-fuzz-panic.raw)");
            }
        }
        assert!(
            one.elapsed() < Duration::from_secs(20),
            "round {round} took {:?}",
            one.elapsed()
        );
    }
    eprintln!(
        "{rounds} fuzzed disks in {:?}, {listed} with entries",
        t.elapsed()
    );
    assert!(listed > 0);
}

#[test]
fn absurd_geometry_is_refused_before_anything_is_allocated() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(d.path());
    let img = d.path().join("huge.raw");
    // 1 TiB, sparse: an 8 MiB file system whose superblock claims 2^30 blocks in groups of 1.
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    mkfs(&img, 0, 8192, &root, "^metadata_csum");
    write_at(&img, 1024 + 0x4, &((1u32 << 30) - 1).to_le_bytes());
    write_at(&img, 1024 + 0x20, &1u32.to_le_bytes());
    let (code, _, err) = inventory(&[ps(&img)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("blocks per group"), "{err}");
}

#[test]
fn block_maps_that_never_end_are_cut_and_hard_links_mapped_once() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("heavy"), "x").unwrap();
    let img = d.path().join("fs.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    // 64 KiB blocks, ext2-style block maps: 16,384 pointers per indirect block.
    run(tool("mkfs.ext4").args([
        "-q",
        "-F",
        "-b",
        "65536",
        "-O",
        "^extent,^64bit,^metadata_csum,^has_journal",
        "-d",
        ps(&root),
        ps(&img),
    ]));
    // /heavy: 2^62 bytes whose triple-indirect block points 16,384 times at one block of
    // zero pointers (2^28 pointers to look at), and 100 more names for it.
    let (b1, b2) = (1000u64, 1001u64);
    write_at(
        &img,
        b1 * 65536,
        &[b2 as u8, (b2 >> 8) as u8, 0, 0].repeat(16384),
    );
    write_at(&img, b2 * 65536, &vec![0u8; 65536]);
    let mut cmds = format!("sif /heavy block[TIND] {b1}\nsif /heavy size 0x4000000000000000\n");
    // And 8 more files with the same map: together past the file system's work budget.
    for i in 0..8 {
        cmds.push_str(&format!(
            "write /dev/null /heavy{i}\nsif /heavy{i} block[TIND] {b1}\nsif /heavy{i} size 0x4000000000000000\n"
        ));
    }
    for i in 0..100 {
        cmds.push_str(&format!("ln /heavy /h{i}\n"));
    }
    let f = d.path().join("cmds");
    std::fs::write(&f, cmds).unwrap();
    run(tool("debugfs").args(["-w", "-f", ps(&f), ps(&img)]));
    let (code, out, err) = inventory(&["--json", ps(&img)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("/h99"), "the names are listed");
    assert!(err.contains("more work"), "{err}");
}

/// File systems that are unusual but sound are read whole, without a warning: ext2 and ext3
/// (block maps), no hash indexes (what `mkfs -d` always makes) over thousands of
/// subdirectories, bigalloc, 1 KiB blocks, a sparse file far larger than the disk.
#[test]
fn unusual_sound_file_systems_are_read_whole() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(d.path());
    for i in 0..2000 {
        let sub = root.join(format!("many/d{i:04}"));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("f"), format!("{i}")).unwrap();
    }
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    for at in [0u64, 300 << 20, (1 << 30) - 4096] {
        std::os::unix::fs::FileExt::write_all_at(&sparse, &pattern(at, 4096), at).unwrap();
    }
    drop(sparse);
    let want = run(tool("find").arg(ps(&root)).args(["-mindepth", "1"])).stdout;
    let want = want.iter().filter(|&&b| b == b'\n').count() + 1; // and lost+found
    for (mkfs, opts) in [
        ("mkfs.ext2", vec!["-b", "1024"]),
        ("mkfs.ext3", vec!["-O", "^dir_index"]),
        ("mkfs.ext4", vec!["-O", "bigalloc", "-C", "16384"]),
        ("mkfs.ext4", vec!["-T", "small"]),
    ] {
        let img = d.path().join("fs.raw");
        let _ = std::fs::remove_file(&img);
        std::fs::File::create(&img)
            .unwrap()
            .set_len(96 << 20)
            .unwrap();
        run(tool(mkfs)
            .args(["-q", "-F"])
            .args(&opts)
            .args(["-d", ps(&root), ps(&img)]));
        let (code, out, err) = inventory(&["--json", ps(&img)]);
        assert_eq!(code, 0, "{mkfs} {opts:?}: {err}");
        assert!(err.is_empty(), "{mkfs} {opts:?}: warnings:\n{err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            j["entries"].as_array().unwrap().len(),
            want,
            "{mkfs} {opts:?}"
        );
        // Content read through the block maps, holes as zeros: equal to itself, and the
        // sparse file's data (3 blocks) counted, not its size.
        let (code, out, err) = inventory(&["--diff", ps(&img), ps(&img)]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("0 added, 0 removed, 0 changed"), "{out}");
        let data = j["filesystems"][0]["data_bytes"].as_u64().unwrap();
        assert!(data < 1 << 20, "{mkfs} {opts:?}: {data} bytes of data");
    }
}

/// A guest that crashed (or runs) leaves changes in its journal: everything is read as of the
/// last checkpoint (the journal's replay by ext4-view is not bounded), and said so.
#[test]
fn journal_changes_are_read_as_of_the_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
    std::fs::write(
        root.join("var/lib/dpkg/status"),
        "Package: old\nStatus: install ok installed\nVersion: 1\n",
    )
    .unwrap();
    let (j, r) = (d.path().join("j.raw"), d.path().join("r.raw"));
    std::fs::File::create(&j)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    run(tool("mkfs.ext4").args(["-q", "-F", "-b", "4096", "-d", ps(&root), ps(&j)]));
    std::fs::copy(&j, &r).unwrap();
    // r: the status rewritten in place; j: the same blocks, only in its journal.
    let new = d.path().join("new");
    std::fs::write(
        &new,
        "Package: newpkg\nStatus: install ok installed\nVersion: 9.9\n\nPackage: other\nStatus: install ok installed\nVersion: 2\n",
    )
    .unwrap();
    run(tool("debugfs").args(["-w", "-R", "rm /var/lib/dpkg/status", ps(&r)]));
    run(tool("debugfs").args([
        "-w",
        "-R",
        &format!("write {} /var/lib/dpkg/status", ps(&new)),
        ps(&r),
    ]));
    let (a, b) = (std::fs::read(&j).unwrap(), std::fs::read(&r).unwrap());
    let changed: Vec<usize> = (0..a.len() / 4096)
        .filter(|&k| a[k * 4096..(k + 1) * 4096] != b[k * 4096..(k + 1) * 4096])
        .collect();
    assert!(!changed.is_empty() && changed.len() < 16, "{changed:?}");
    let blocks: Vec<u8> = changed
        .iter()
        .flat_map(|&k| b[k * 4096..(k + 1) * 4096].to_vec())
        .collect();
    let bin = d.path().join("blocks.bin");
    std::fs::write(&bin, blocks).unwrap();
    let list: Vec<String> = changed.iter().map(|k| k.to_string()).collect();
    let cmds = d.path().join("cmds");
    std::fs::write(
        &cmds,
        format!("jo -c\njw -b {} {}\njc\n", list.join(","), ps(&bin)),
    )
    .unwrap();
    run(tool("debugfs").args(["-w", "-f", ps(&cmds), ps(&j)]));
    let (code, out, err) = inventory(&["--packages", ps(&j)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "old 1\n", "{err}");
    assert!(
        err.contains("journal holds changes") && err.contains("as of the last checkpoint"),
        "{err}"
    );
    let (code, out, err) = inventory(&["--json", "--diff", ps(&j), ps(&r)]);
    assert_eq!(code, 0, "{err}");
    let d: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The status as of the checkpoint: its old size.
    assert_eq!(d["added"], serde_json::json!([]));
    assert_eq!(d["removed"], serde_json::json!([]));
    assert_eq!(
        d["changed"],
        serde_json::json!([{"path": "/var/lib/dpkg/status", "what": ["size"]}]),
        "{}",
        d["changed"]
    );
}

/// What a cache holds is its own clusters (and an instance's over it), never those of a base
/// that is itself an overlay.
#[test]
fn held_counts_the_cache_not_an_overlay_base() {
    let d = tempfile::tempdir().unwrap();
    let root = tree(d.path());
    let base = d.path().join("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mkfs(&base, 0, 8192, &root, "");
    let ov = d.path().join("ov.qcow2");
    qemu_overlay(&ov, ps(&base), "raw");
    // The overlay holds 64 KiB of its own.
    run(tool("qemu-io").args(["-f", "qcow2", "-c", "write -P 0 1M 64k", ps(&ov)]));
    let cache = d.path().join("c.qcow2");
    let allow = ("VMICACHE_ALLOW_BACKING", d.path());
    run(bin()
        .env(allow.0, allow.1)
        .args(["build", ps(&ov), "-o", ps(&cache)]));
    let out = run(bin()
        .env(allow.0, allow.1)
        .args(["inventory", "--json", ps(&cache)]))
    .stdout;
    let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(j["layers"], 3);
    assert_eq!(j["cache"]["held_bytes"], 0, "{}", j["cache"]);
}

/// Read by our reader alone (a journal to replay), a file system lists exactly as through
/// ext4-view: every field of every entry; what ext4-view refuses, ours refuses too.
#[test]
fn our_reader_alone_lists_as_ext4_view_does() {
    let d = tempfile::tempdir().unwrap();
    let img = small_fs(d.path(), "");
    let (_, before, err) = inventory(&["--json", ps(&img)]);
    assert!(err.is_empty(), "{err}");
    run(tool("debugfs").args(["-w", "-R", "feature needs_recovery", ps(&img)]));
    let (code, after, err) = inventory(&["--json", ps(&img)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("by our own reader"), "{err}");
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&before).unwrap(),
        serde_json::from_str(&after).unwrap(),
    );
    assert_eq!(a["entries"], b["entries"]);
    assert_eq!(a["filesystems"][0]["label"], b["filesystems"][0]["label"]);
    assert_eq!(a["filesystems"][0]["uuid"], b["filesystems"][0]["uuid"]);

    let inline = d.path().join("inline.raw");
    std::fs::File::create(&inline)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    mkfs(&inline, 0, 8192, &tree(&d.path().join("t2")), "inline_data");
    run(tool("debugfs").args(["-w", "-R", "feature needs_recovery", ps(&inline)]));
    let (code, _, err) = inventory(&[ps(&inline)]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not supported"), "{err}");
}
