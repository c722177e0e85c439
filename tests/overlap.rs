//! Never write through damaged metadata (issue #9, item 1): an image `check` calls corrupt is
//! refused for writing (reading still works), and a write that would land on metadata while
//! the image is open is refused, marks the image corrupt (as QEMU's overlap checks do) and
//! fails every later write.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vmicache::engine::{Image, OpenOptions};
use vmicache::Error;

const COPIED: u64 = 1 << 63;

/// 64k clusters, 8M, data at 0..128k and 1M. Layout (as qemu-img makes it): 0 header,
/// 1 refcount table, 2 refcount block (16-bit entries), 3 L1, 4 L2, 5-6 data for 0..128k,
/// 7 data for 1M.
fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create(&p, Some("8M"), &["-o", "cluster_size=65536"]);
    qemu_io_qcow2(&p, &["write -q -P 0xaa 0 128k", "write -q -P 0xbb 1M 64k"]);
    p
}

const L1: u64 = 0x30000;
const L2: u64 = 0x40000;
const REFBLOCK: u64 = 0x20000;
const REFTABLE: u64 = 0x10000;

fn refcount_at(cluster: u64) -> u64 {
    REFBLOCK + 2 * cluster
}

fn open_rw(p: &Path) -> vmicache::Result<Image> {
    Image::open(p, &OpenOptions::read_write())
}

/// Each damage QEMU's checks catch: the image is refused for writing with one line naming
/// the problem, nothing in the file changes, and it can still be opened to read.
#[test]
fn damaged_metadata_is_refused_for_writing() {
    let d = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64, Vec<u8>)] = &[
        // The reproduction of the issue: the header counted as free.
        ("header refcount 0", refcount_at(0), vec![0, 0]),
        ("L1 refcount 0", refcount_at(3), vec![0, 0]),
        ("L2 refcount 0", refcount_at(4), vec![0, 0]),
        (
            "L2 entry pointing at the L1 table",
            L2,
            (L1 | COPIED).to_be_bytes().to_vec(),
        ),
        (
            "refcount table pointing at the L1 table",
            REFTABLE,
            L1.to_be_bytes().to_vec(),
        ),
        (
            "L1 entry pointing at the header",
            L1,
            COPIED.to_be_bytes().to_vec(),
        ),
    ];
    for (i, (what, off, bytes)) in cases.iter().enumerate() {
        let p = image(d.path(), &format!("{i}.qcow2"));
        write_at(&p, *off, bytes);
        let before = std::fs::read(&p).unwrap();
        match open_rw(&p) {
            Err(Error::Corrupt { what: msg, .. }) => {
                assert!(!msg.contains('\n'), "{what}: one line: {msg}");
            }
            Err(e) => panic!("{what}: wrong error: {e}"),
            Ok(_) => panic!("{what}: opened for writing"),
        }
        assert!(
            std::fs::read(&p).unwrap() == before,
            "{what}: the refused open changed the file"
        );
        // Reading is still allowed (what qemu-img info/convert do too).
        Image::open(&p, &OpenOptions::read_only())
            .unwrap_or_else(|e| panic!("{what}: read-only open: {e}"));
    }
}

/// The shared reproduction: a guest write over NBD must never reach the header of an
/// instance whose header cluster is counted as free; `serve` refuses the instance, naming it.
#[test]
fn serve_refuses_an_instance_with_damaged_refcounts() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![0x33u8; 1 << 20]).unwrap();
    let cache = d.path().join("c.qcow2");
    let inst = d.path().join("i.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "-q"]));
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst), "-q"]));
    qemu_io_qcow2(&inst, &["write -q -P 5 512k 4k"]);
    // Refcount of cluster 0 := 0, found through the header's refcount table.
    let h = std::fs::read(&inst).unwrap();
    let rt = u64::from_be_bytes(h[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(h[rt..rt + 8].try_into().unwrap());
    write_at(&inst, rb, &[0, 0]);
    let sock = d.path().join("s.sock");
    let out = run_status(
        bin()
            .args(["serve", ps(&inst), "--socket", ps(&sock)])
            .arg("-q"),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to open it for writing") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!sock.exists());
}

/// Damage that appears while the image is open (the L2 table is read only now): the write
/// that would overwrite the L1 table is refused, the corrupt bit is set, the L1 table is
/// untouched, and later writes fail too.
#[test]
fn a_write_onto_metadata_marks_the_image_corrupt() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.qcow2");
    let img = open_rw(&p).unwrap();
    let l1_before = read_prefix_at(&p, L1, 64);
    // The entry for guest 1M (L2 index 16) now claims its data lies in the L1 table.
    write_at(&p, L2 + 16 * 8, &(L1 | COPIED).to_be_bytes());
    let e = img.write_at(&[0x55; 4096], 1 << 20).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("metadata overlap")
            && msg.contains("L1 table")
            && msg.contains("marked corrupt"),
        "{msg}"
    );
    assert_eq!(read_prefix_at(&p, L1, 64), l1_before, "L1 overwritten");
    // Every later write fails, even to a healthy cluster.
    let e2 = img.write_at(&[1; 512], 0).unwrap_err();
    assert!(e2.to_string().contains("marked corrupt"), "{e2}");
    drop(img);
    let info = qemu_img_json(&["info", "--output=json", ps(&p)]);
    assert_eq!(
        info["format-specific"]["data"]["corrupt"],
        serde_json::Value::Bool(true),
        "{info}"
    );
    // A corrupt-marked image is refused for writing from then on.
    assert!(matches!(open_rw(&p), Err(Error::Corrupt { .. })));
}

fn read_prefix_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}
