//! Cache layers: build/chain/inspect through the CLI, the identity binding to the base, and
//! the vmicache header extension surviving QEMU's header rewrites.

mod common;
use common::*;
use std::path::{Path, PathBuf};

fn base(dir: &Path, size: usize) -> PathBuf {
    let p = dir.join("base.raw");
    let mut d = vec![0u8; size];
    d[..size / 2].copy_from_slice(&pattern(1, size / 2));
    std::fs::write(&p, d).unwrap();
    p
}

fn stderr_line(out: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(s.lines().count(), 1, "expected one stderr line, got:\n{s}");
    s
}

#[test]
fn build_chain_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 8 << 20);
    let cache = dir.path().join("cache.qcow2");
    let inst = dir.path().join("vm.qcow2");
    run(bin().args(["build", ps(&b), "-o", ps(&cache), "--quota", "4M"]));
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    check_clean(&cache);
    check_clean(&inst);
    let out = run(tool("qemu-img").args(["compare", ps(&inst), ps(&b)]));
    assert!(out.status.success());
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(&inst)])).stdout).unwrap();
    let layers = j["layers"].as_array().unwrap();
    let roles: Vec<&str> = layers.iter().map(|l| l["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["instance", "cache", "base"]);
    let c = &j["cache"];
    assert_eq!(c["state"], "empty");
    assert_eq!(c["quota"], 4 << 20);
    assert_eq!(c["base-check"], "ok");
    assert_eq!(c["cached-bytes"], 0);
    assert_eq!(c["base"]["format"], "raw");
    assert_eq!(c["base"]["virtual-size"], 8 << 20);
    // Human output names the layers and sizes.
    let text = String::from_utf8(run(bin().args(["inspect", ps(&inst)])).stdout).unwrap();
    assert!(
        text.contains("cache") && text.contains("8 MiB") && text.contains("matches"),
        "{text}"
    );
}

#[test]
fn chain_refuses_changed_base() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 4 << 20);
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&b), "-o", ps(&cache)]));

    // Content change (same size): the fingerprint samples the first block.
    let mut d = std::fs::read(&b).unwrap();
    d[10] ^= 0xff;
    std::fs::write(&b, &d).unwrap();
    let inst = dir.path().join("vm.qcow2");
    let out = run_status(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(line.contains("content fingerprint changed"), "{line}");
    assert!(!inst.exists());

    // Size change.
    d[10] ^= 0xff;
    d.extend_from_slice(&[0u8; 65536]);
    std::fs::write(&b, &d).unwrap();
    let out = run_status(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(line.contains("virtual size changed"), "{line}");

    // Inspect reports it rather than failing.
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(&cache)])).stdout).unwrap();
    assert_ne!(j["cache"]["base-check"], "ok");

    // Base removed: one clear line.
    std::fs::remove_file(&b).unwrap();
    let out = run_status(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(
        line.contains("base.raw") && line.contains("not found"),
        "{line}"
    );
}

#[test]
fn relative_base_path_recorded_relative_to_cache() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bases")).unwrap();
    std::fs::create_dir(dir.path().join("caches")).unwrap();
    let b = dir.path().join("bases/base.raw");
    std::fs::write(&b, pattern(2, 1 << 20)).unwrap();
    let out = run(bin().current_dir(dir.path()).args([
        "build",
        "bases/base.raw",
        "-o",
        "caches/c.qcow2",
    ]));
    assert!(out.status.success());
    let info = qemu_img_json(&[
        "info",
        "--output=json",
        ps(&dir.path().join("caches/c.qcow2")),
    ]);
    assert_eq!(info["backing-filename"], "../bases/base.raw");
    // From any working directory the chain resolves from the cache's directory (the
    // bases' directory allowed: it is not below the cache's).
    let out = run(bin().current_dir("/").args([
        "inspect",
        "--json",
        ps(&dir.path().join("caches/c.qcow2")),
        "--allow-backing",
        ps(&dir.path().join("bases")),
    ]));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["cache"]["base-check"], "ok");
}

#[test]
fn qemu_keeps_our_extension_and_we_keep_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 2 << 20);
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&b), "-o", ps(&cache)]));
    // QEMU rewrites the header (amend) and must keep our extension.
    qemu_img(&[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        ps(&cache),
    ]);
    qemu_img(&[
        "amend",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=off",
        ps(&cache),
    ]);
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(&cache)])).stdout).unwrap();
    assert_eq!(j["cache"]["base-check"], "ok", "{j}");
    check_clean(&cache);

    // An unknown extension QEMU would keep, we keep too when we rewrite the header.
    let img = vmicache::engine::Image::open(&cache, &vmicache::engine::OpenOptions::read_write())
        .unwrap();
    let q = img.as_qcow2().unwrap();
    let mut meta = q.cache_meta().unwrap().unwrap();
    meta.unknown.push((4242, b"future".to_vec()));
    q.set_cache_meta(Some(&meta)).unwrap();
    drop(img);
    let raw = std::fs::read(&cache).unwrap();
    let hay = &raw[..65536];
    assert!(hay.windows(6).any(|w| w == b"future"));
    check_clean(&cache);
    let img =
        vmicache::engine::Image::open(&cache, &vmicache::engine::OpenOptions::read_only()).unwrap();
    let m2 = img.as_qcow2().unwrap().cache_meta().unwrap().unwrap();
    assert_eq!(m2.unknown, vec![(4242, b"future".to_vec())]);
}

#[test]
fn build_refuses_existing_output_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let b = base(dir.path(), 1 << 20);
    let cache = dir.path().join("cache.qcow2");
    run(bin().args(["build", ps(&b), "-o", ps(&cache)]));
    let before = std::fs::read(&cache).unwrap();
    let out = run_status(bin().args(["build", ps(&b), "-o", ps(&cache)]));
    assert_eq!(out.status.code(), Some(1));
    stderr_line(&out);
    assert_eq!(
        before,
        std::fs::read(&cache).unwrap(),
        "existing file changed"
    );
    let out = run_status(bin().args(["build", ps(&b), "-o", "x.qcow2", "--cluster-size", "3K"]));
    assert_eq!(out.status.code(), Some(1));
    let out = run_status(bin().args(["build", ps(&b), "-o", "x.qcow2", "--quota", "lots"]));
    assert_ne!(out.status.code(), Some(0));
}

#[test]
fn man_page_and_completions() {
    let man = String::from_utf8(run(bin().arg("man")).stdout).unwrap();
    assert!(
        man.contains(".TH vmicache 1") && man.contains("warm"),
        "{man}"
    );
    for sh in ["bash", "zsh", "fish"] {
        let out = run(bin().args(["completions", sh]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
    }
    // --help explains exit codes.
    let help = String::from_utf8(run(bin().arg("--help")).stdout).unwrap();
    assert!(help.contains("Exit codes"), "{help}");
}
