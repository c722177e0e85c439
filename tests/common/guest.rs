//! The test guest of images/ (built by `images/build.sh`), booted under TCG.

use super::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest to boot: `minimal` by default, `VMICACHE_TEST_GUEST=systemd` for the long run
/// (`tools/test.sh --long`).
pub fn guest() -> String {
    std::env::var("VMICACHE_TEST_GUEST").unwrap_or_else(|_| "minimal".into())
}

pub fn guest_dir() -> PathBuf {
    let d = std::env::var_os("VMICACHE_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/images"))
        .join(guest());
    // Caches in the tests' scratch directories name the guest's base in its own directory:
    // allowed for every vmicache this test runs.
    static ALLOW: std::sync::Once = std::sync::Once::new();
    ALLOW.call_once(|| std::env::set_var("VMICACHE_ALLOW_BACKING", &d));
    d
}

pub fn boot_sh() -> PathBuf {
    repo().join("images/boot.sh")
}

pub fn base_reads(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" Read "))
        .count()
}

/// Boot the guest from `disk` (file or NBD URI); panics unless the success marker appears.
pub fn boot(disk: &str, format: &str) -> f64 {
    let t = Instant::now();
    let out = run_status(
        Command::new(boot_sh())
            .args([guest().as_str(), disk, format])
            .env("BOOT_TIMEOUT", "240"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "guest did not boot from {disk}:\n{}\n{err}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    t.elapsed().as_secs_f64()
}

/// Serve `inst` and boot the guest through it.
pub fn boot_served(dir: &Path, inst: &Path) -> f64 {
    let sock = dir.join("vm.sock");
    let _ = std::fs::remove_file(&sock);
    let mut srv = bin()
        .args(["serve", ps(inst), "--socket", ps(&sock), "-q"])
        .spawn()
        .unwrap();
    wait_for(&sock, &mut srv, "vmicache serve");
    let srv = Proc(Some(srv));
    let name = inst.file_stem().unwrap().to_str().unwrap();
    let secs = boot(
        &format!("nbd+unix:///{name}?socket={}", sock.display()),
        "raw",
    );
    srv.stop();
    secs
}
