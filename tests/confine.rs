//! Backing chains stay in bounds (issue #9, items 2 and 6): a backing file (or NBD base socket)
//! must lie in the directory of the image naming it, or in a directory allowed with
//! `--allow-backing` / `VMICACHE_ALLOW_BACKING`; `..` and symlinks are resolved before the
//! check; FIFOs and devices are refused without blocking. Run through the CLI: the allowance
//! is process-wide.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// A qcow2 image in `dir` whose backing file name is `name` (written raw, no checks).
fn overlay_naming(dir: &Path, file: &str, name: &str) -> std::path::PathBuf {
    let p = dir.join(file);
    qemu_create(
        &p,
        Some("1M"),
        &["-u", "-b", name, "-F", "raw", "-o", "cluster_size=65536"],
    );
    p
}

fn refused(args: &[&str], env: Option<(&str, &str)>) -> String {
    let mut c = bin();
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    let t = Instant::now();
    let out = run_status(&mut c);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "{args:?} took {:?}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn backing_files_outside_the_image_directory_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let bases = d.path().join("bases");
    std::fs::create_dir(&bases).unwrap();
    // Absolute, relative with .., and a symlink that leads out.
    std::os::unix::fs::symlink("/etc/passwd", bases.join("link.raw")).unwrap();
    let cases = [
        ("abs.qcow2", "/etc/passwd"),
        ("rel.qcow2", "../../../../../../../etc/passwd"),
        ("link.qcow2", "link.raw"),
    ];
    for (file, name) in cases {
        let img = overlay_naming(&bases, file, name);
        for cmd in [
            &["inspect"][..],
            &["inspect", "--map", "--json"],
            &["chain"],
        ] {
            let mut args: Vec<&str> = cmd.to_vec();
            args.push(ps(&img));
            let out_path = d.path().join("x.qcow2");
            if cmd[0] == "chain" {
                args.extend(["-o", ps(&out_path)]);
            }
            let err = refused(&args, None);
            assert!(
                err.contains("lies outside") && err.contains("/etc/passwd"),
                "{name} via {cmd:?}: {err}"
            );
            assert!(!out_path.exists());
        }
        let err = refused(
            &["build", ps(&img), "-o", ps(&d.path().join("c.qcow2"))],
            None,
        );
        assert!(err.contains("lies outside"), "{err}");
    }
}

#[test]
fn allowed_directories_widen_the_bounds() {
    let d = tempfile::tempdir().unwrap();
    let (bases, caches) = (d.path().join("bases"), d.path().join("caches"));
    std::fs::create_dir(&bases).unwrap();
    std::fs::create_dir(&caches).unwrap();
    let base = bases.join("b.raw");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let cache = caches.join("c.qcow2");
    // `build` opens the base itself (not as a backing file): no allowance needed.
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "-q"]));
    // The cache names ../bases/b.raw: refused by default...
    let err = refused(&["inspect", ps(&cache)], None);
    assert!(err.contains("--allow-backing"), "{err}");
    // ...and allowed by the option or the environment.
    run(bin().args(["inspect", ps(&cache), "--allow-backing", ps(&bases)]));
    run(bin().args(["inspect", ps(&cache)]).env(
        "VMICACHE_ALLOW_BACKING",
        format!("/nonexistent-ok:{}", ps(&bases)),
    ));
    // A sibling directory's file reached through `..` from an allowed one is still checked
    // after resolution.
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("o.raw"), vec![1u8; 1 << 20]).unwrap();
    let sneaky = overlay_naming(&caches, "s.qcow2", "../bases/../other/o.raw");
    let err = refused(
        &["inspect", ps(&sneaky), "--allow-backing", ps(&bases)],
        None,
    );
    assert!(err.contains("other/o.raw"), "{err}");
}

#[test]
fn non_regular_backing_files_are_refused_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let img = overlay_naming(d.path(), "f.qcow2", "fifo");
    for args in [
        vec!["inspect", ps(&img)],
        vec!["inspect", "--map", "--json", ps(&img)],
        vec!["build", ps(&img), "-o"],
    ] {
        let mut args = args;
        let out = d.path().join("c.qcow2");
        if args[0] == "build" {
            args.push(ps(&out));
        }
        let err = refused(&args, None);
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    }
    // The top image itself too.
    let err = refused(&["inspect", ps(&fifo)], None);
    assert!(err.contains("FIFO"), "{err}");
    let err = refused(&["check", "/dev/null"], None);
    assert!(err.contains("character device"), "{err}");
}

#[test]
fn nbd_base_sockets_outside_the_bounds_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let sock = elsewhere.path().join("b.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let name = format!("nbd+unix:///?socket={}", sock.display());
    let img = overlay_naming(d.path(), "n.qcow2", &name);
    let err = refused(&["inspect", ps(&img)], None);
    assert!(
        err.contains("NBD socket") && err.contains("lies outside"),
        "{err}"
    );
}

/// `serve` (and `warm --boot`) open the instance's cache themselves: the same bounds apply.
#[test]
fn serve_refuses_an_instance_backed_by_a_host_file() {
    let d = tempfile::tempdir().unwrap();
    let img = overlay_naming(d.path(), "i.qcow2", "/etc/passwd");
    let sock = d.path().join("s.sock");
    let err = refused(&["serve", ps(&img), "--socket", ps(&sock)], None);
    assert!(
        err.contains("lies outside") && err.contains("/etc/passwd"),
        "{err}"
    );
    assert!(!sock.exists());
}

/// The base of a sealed cache is reached lazily; it is opened in the format the cache recorded,
/// never probed: a raw base whose first bytes are a qcow2 header naming /etc/passwd reads as
/// those bytes.
#[test]
fn a_lazily_reached_base_is_never_probed() {
    let d = tempfile::tempdir().unwrap();
    let trap = overlay_naming(d.path(), "trap.qcow2", "/etc/passwd");
    let base = d.path().join("base.raw");
    let mut bytes = std::fs::read(&trap).unwrap();
    bytes.resize(1 << 20, 0);
    std::fs::write(&base, &bytes).unwrap();
    let cache = d.path().join("c.qcow2");
    run(bin().args([
        "build",
        ps(&base),
        "--base-format",
        "raw",
        "-o",
        ps(&cache),
        "-q",
    ]));
    run(bin().args(["seal", ps(&cache), "-q"]));
    let img =
        vmicache::engine::Image::open(&cache, &vmicache::engine::OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; 4096];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(&got[..], &bytes[..4096], "the base was not read as raw");
}
