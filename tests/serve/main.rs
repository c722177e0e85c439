//! `vmicache serve`: NBD over the chain with copy-on-read into the cache, checked with real
//! peers (qemu-img, qemu-io, nbdinfo). Needs libnbd-bin (tools/test.sh installs it).

#[path = "../common/mod.rs"]
mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vmicache::engine::cor::Cor;
use vmicache::engine::{Image, OpenOptions};

mod copy_on_read;
mod limits;
mod replies;

const SIZE: usize = 16 << 20;

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    base: PathBuf,
    cache: PathBuf,
    inst: PathBuf,
    sock: PathBuf,
}

fn setup(quota: &str) -> Setup {
    setup_with(quota, false)
}

/// A 16 MiB base with data in 0..6M and 10M..11M, zeros elsewhere (holes when `sparse`, else
/// written zeros), a cache over it with `quota`, and an instance over the cache.
fn setup_with(quota: &str, sparse: bool) -> Setup {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let base = dir.join("base.raw");
    let mut data = vec![0u8; SIZE];
    data[..6 << 20].copy_from_slice(&pattern(11, 6 << 20));
    data[10 << 20..11 << 20].copy_from_slice(&pattern(12, 1 << 20));
    if sparse {
        std::fs::File::create(&base)
            .unwrap()
            .set_len(SIZE as u64)
            .unwrap();
        write_at(&base, 0, &data[..6 << 20]);
        write_at(&base, 10 << 20, &data[10 << 20..11 << 20]);
    } else {
        std::fs::write(&base, data).unwrap();
    }
    let cache = dir.join("cache.qcow2");
    let inst = dir.join("vm1.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "--quota", quota]));
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    let sock = dir.join("nbd.sock");
    Setup {
        _dir: d,
        dir,
        base,
        cache,
        inst,
        sock,
    }
}

fn uri(s: &Setup, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", s.sock.display())
}

fn wait_socket(p: &Path, child: &mut Child) {
    let t = Instant::now();
    while !p.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("serve exited early: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "socket {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `vmicache serve`, killed when dropped: a test that fails before [`stop`] must not
/// leave it running with the harness's output open.
struct Served(Option<Child>);

impl Served {
    fn spawn(cmd: &mut std::process::Command, sock: &Path) -> Served {
        let mut c = Served(Some(cmd.stdout(Stdio::null()).spawn().unwrap()));
        wait_socket(sock, c.0.as_mut().unwrap());
        c
    }
    fn id(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
    /// The child, no longer killed on drop.
    fn take(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn serve(s: &Setup, extra: &[&str]) -> Served {
    Served::spawn(
        bin()
            .args(["serve", ps(&s.inst), "--socket", ps(&s.sock)])
            .args(extra)
            .stderr(Stdio::piped()),
        &s.sock,
    )
}

fn stop(c: Served) -> String {
    let c = c.take();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "serve failed: {err}");
    err
}

/// `qemu-img compare` of the NBD export `uri` (raw) with the base: equal, or the test fails.
fn compare_with_base(uri: &str, s: &Setup) {
    run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", uri, ps(&s.base)]));
}

/// (cluster, zero) allocated at depth 0 in `img` per qemu-img map.
fn depth0(img: &Path) -> Vec<(u64, bool)> {
    let m = qemu_img_json(&["map", "--output=json", "-U", ps(img)]);
    let mut v = Vec::new();
    for e in m.as_array().unwrap() {
        if e["depth"] == 0 && e["present"] == true {
            let (st, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            for c in st / 65536..(st + l).div_ceil(65536) {
                v.push((c, e["zero"] == true));
            }
        }
    }
    v
}
