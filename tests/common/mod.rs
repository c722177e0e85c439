//! Shared helpers for the integration tests.
//!
//! Every integration test binary compiles this module separately and none of
//! them uses all of it, hence the blanket `dead_code` allowance.
#![allow(dead_code)]

pub mod guest;
pub mod registry;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmicache::engine::{Image, OpenOptions};

/// Chunk size used when reading whole images.
pub const CHUNK: usize = 1 << 20;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------
// Running external tools
// ---------------------------------------------------------------------------

/// A `Command` for an external tool found on `$PATH`.
pub fn tool(name: &str) -> Command {
    Command::new(name)
}

/// A `Command` for the vmicache binary built by cargo for this test run.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmicache"))
}

/// Runs `cmd` and returns its output whatever the exit status.
/// Panics only when the process cannot be spawned.
pub fn run_status(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"))
}

/// Runs `cmd`, panicking with its stdout/stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_status(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
    }
    out
}

/// `path` as `&str`, for building argument lists (temp paths are UTF-8).
pub fn ps(path: &Path) -> &str {
    path.to_str()
        .unwrap_or_else(|| panic!("non UTF-8 path: {}", path.display()))
}

/// Runs `qemu-img ARGS...` and returns its stdout.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run(tool("qemu-img").args(args));
    String::from_utf8(out.stdout).expect("qemu-img printed non UTF-8 output")
}

/// Runs `qemu-img ARGS...` (which must include `--output=json`) and parses stdout.
pub fn qemu_img_json(args: &[&str]) -> serde_json::Value {
    let text = qemu_img(args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("qemu-img {args:?}: bad JSON ({e}):\n{text}"))
}

/// Runs `qemu-io OPTS... IMAGE -c CMD1 -c CMD2 ...`, e.g.
/// `qemu_io(img, &["-f", "qcow2"], &["write -P 0xab 0 64k", "write -z 1M 4k"])`.
///
/// qemu-io reports some command errors on stderr while still exiting 0, so
/// stderr is checked for a few error markers as well.
pub fn qemu_io<S: AsRef<str>>(image: &Path, opts: &[&str], cmds: &[S]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.args(opts).arg(image);
    for c in cmds {
        cmd.arg("-c").arg(c.as_ref());
    }
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for text in [stdout.as_str(), &*stderr] {
        let lower = text.to_ascii_lowercase();
        if lower.contains("failed") || lower.contains("error") || lower.contains("invalid") {
            panic!("qemu-io {cmd:?} reported an error:\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
        }
    }
    stdout
}

/// `qemu_io` for a qcow2 image.
pub fn qemu_io_qcow2<S: AsRef<str>>(image: &Path, cmds: &[S]) -> String {
    qemu_io(image, &["-f", "qcow2"], cmds)
}

// ---------------------------------------------------------------------------
// Image checks and reference reads
// ---------------------------------------------------------------------------

fn json_count(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// Asserts that `qemu-img compare OPTS... A B` finds the images equal.
pub fn compare_images(a: &Path, b: &Path, opts: &[&str]) {
    let out = run_status(
        tool("qemu-img")
            .arg("compare")
            .args(opts)
            .args([ps(a), ps(b)]),
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that `qemu-img check` finds nothing wrong with the qcow2 image at
/// `path` and that (for v3) neither the dirty nor the corrupt bit is set.
pub fn check_clean(path: &Path) {
    let out = run_status(tool("qemu-img").args(["check", "--output=json", ps(path)]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {} ({}): no JSON report ({e})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            path.display(),
            out.status
        )
    });
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            json_count(&report, key),
            0,
            "qemu-img check {}: {key} != 0\n{report:#}\n{stderr}",
            path.display()
        );
    }
    assert!(
        out.status.success(),
        "qemu-img check {} exited with {}\n{report:#}\n{stderr}",
        path.display(),
        out.status
    );

    let header = read_prefix(path, 104);
    assert_eq!(
        &header[0..4],
        b"QFI\xfb",
        "{}: not a qcow2 image",
        path.display()
    );
    let version = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
    if version >= 3 {
        let incompatible = u64::from_be_bytes(header[72..80].try_into().expect("8 bytes"));
        assert_eq!(
            incompatible & 1,
            0,
            "{}: dirty bit set (incompatible_features = {incompatible:#x})",
            path.display()
        );
        assert_eq!(
            incompatible & 2,
            0,
            "{}: corrupt bit set (incompatible_features = {incompatible:#x})",
            path.display()
        );
    }
}

/// The first `len` bytes of a file (fewer if the file is shorter).
pub fn read_prefix(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = Vec::with_capacity(len);
    file.take(len as u64)
        .read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    buf
}

/// Guest-visible contents of `path` (through its whole backing chain), as
/// produced by `qemu-img convert -O raw`.
pub fn to_raw(path: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("converted.raw");
    qemu_img(&["convert", "-O", "raw", ps(path), ps(&out)]);
    std::fs::read(&out).unwrap_or_else(|e| panic!("read {}: {e}", out.display()))
}

/// Guest-visible contents of `path` read through vmicache, in 1 MiB chunks
/// (the last one shorter when the size is not a multiple of 1 MiB).
pub fn read_all_ours(path: &Path) -> Vec<u8> {
    let img = Image::open(path, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("vmicache: open {}: {e}", path.display()));
    let size = usize::try_from(img.virtual_size()).expect("virtual size fits in usize");
    let mut out = vec![0u8; size];
    let mut off = 0;
    while off < size {
        let end = (off + CHUNK).min(size);
        img.read_at(&mut out[off..end], off as u64)
            .unwrap_or_else(|e| {
                panic!(
                    "vmicache: read {}+{} of {}: {e}",
                    off,
                    end - off,
                    path.display()
                )
            });
        off = end;
    }
    out
}

/// Asserts `got == want`, reporting the first differing offset (and some
/// context) instead of dumping megabytes of bytes.
pub fn assert_bytes_eq(label: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let common = got.len().min(want.len());
    let Some(first) = got.iter().zip(want).position(|(a, b)| a != b) else {
        panic!(
            "{label}: length differs: got {} bytes, want {} bytes (common prefix equal)",
            got.len(),
            want.len()
        );
    };
    let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let last = got[..common]
        .iter()
        .zip(&want[..common])
        .rposition(|(a, b)| a != b)
        .unwrap_or(first);
    let ctx_start = first & !15;
    let ctx_end = (ctx_start + 32).min(common);
    panic!(
        "{label}: contents differ\n  first differing offset: {first} ({first:#x}; 512-sector {}, 64k-cluster {})\n  last differing offset:  {last} ({last:#x})\n  differing bytes: {differing} of {common}{}\n  got  @{ctx_start:#x}: {}\n  want @{ctx_start:#x}: {}",
        first / 512,
        first / 65536,
        if got.len() == want.len() {
            String::new()
        } else {
            format!(" (and lengths differ: got {}, want {})", got.len(), want.len())
        },
        hex(&got[ctx_start..ctx_end]),
        hex(&want[ctx_start..ctx_end]),
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// xorshift64 PRNG: deterministic, dependency free, good enough for test data.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    pub fn new(seed: u64) -> Self {
        // Any seed (including 0) maps to a non-zero state.
        Self((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish value in `0..n` (`n` must be non-zero).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform-ish value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "qcow2",
    "cluster",
    "refcount",
    "backing",
    "overlay",
    "snapshot",
    "guest",
    "host",
    "offset",
    "table",
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "boot",
    "kernel",
    "initrd",
    "cache",
    "layer",
    "zero",
    "compressed",
    "L1",
    "L2",
    "header",
    "extension",
    "image",
    "virtual",
    "disk",
];

fn push_random(rng: &mut XorShift64, out: &mut Vec<u8>, n: usize) {
    let start = out.len();
    out.resize(start + n, 0);
    rng.fill(&mut out[start..]);
}

fn push_text(rng: &mut XorShift64, out: &mut Vec<u8>, n: usize) {
    let end = out.len() + n;
    while out.len() < end {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        out.extend_from_slice(word.as_bytes());
        out.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    out.truncate(end);
}

/// `len` bytes of deterministic test data for `seed`.
///
/// The data is made of 16 KiB segments that are, at random, compressible
/// text (about half of them), incompressible random bytes, a mix of 512-byte
/// text and random blocks, or zeros. So compressed clusters really compress
/// (and some clusters stay uncompressed or unallocated after
/// `qemu-img convert -c`) whatever the cluster size.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    const SEGMENT: usize = 16 * 1024;
    let mut rng = XorShift64::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let seg = SEGMENT.min(len - out.len());
        match rng.below(8) {
            0..=3 => push_text(&mut rng, &mut out, seg),
            4 | 5 => push_random(&mut rng, &mut out, seg),
            6 => {
                let mut left = seg;
                while left > 0 {
                    let n = left.min(512);
                    if rng.below(2) == 0 {
                        push_text(&mut rng, &mut out, n);
                    } else {
                        push_random(&mut rng, &mut out, n);
                    }
                    left -= n;
                }
            }
            _ => out.resize(out.len() + seg, 0),
        }
    }
    out
}

/// Overwrite bytes of a file in place (to damage images on purpose).
pub fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(bytes, off)
        .unwrap_or_else(|e| panic!("write {}@{off:#x}: {e}", path.display()));
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT PATH` (the backing name as given, relative names
/// resolve from PATH's directory).
/// `qemu-img create -q -f qcow2 OPTS... PATH [SIZE]`: a qcow2 image made by QEMU.
pub fn qemu_create(path: &Path, size: Option<&str>, opts: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.push(ps(path));
    args.extend(size);
    qemu_img(&args);
}

/// Run `from | to` (both must succeed); `to`'s output.
pub fn piped(from: &mut Command, to: &mut Command) -> Output {
    let mut src = from
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {from:?}: {e}"));
    let out = to
        .stdin(src.stdout.take().unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot spawn {to:?}: {e}"));
    assert!(src.wait().unwrap().success(), "{from:?} failed");
    assert!(
        out.status.success(),
        "{to:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_overlay(path: &Path, backing: &str, backing_fmt: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
        ps(path),
    ]);
}

// ---------------------------------------------------------------------------
// Servers started by tests (nbdkit, vmicache serve)
// ---------------------------------------------------------------------------

pub fn wait_for(p: &Path, child: &mut std::process::Child, what: &str) {
    let t = Instant::now();
    while !p.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early: {st}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: {} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nbdkit serving `base` read-only on `sock`; `pre` are filter options, `post` plugin/filter
/// parameters.
/// A child process killed when dropped (a failing assertion must not leave servers behind
/// holding the test's output pipes).
pub struct Proc(pub Option<std::process::Child>);

impl Proc {
    pub fn stop(mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn nbdkit(sock: &Path, pre: &[&str], base: &Path, post: &[&str]) -> Proc {
    let _ = std::fs::remove_file(sock);
    let mut c = Command::new("nbdkit")
        .args(["-r", "-f", "-U", ps(sock)])
        .args(pre)
        .arg("file")
        .arg(base)
        .args(post)
        .stderr(Stdio::null())
        .spawn()
        .expect("nbdkit (tools/deps.sh --boot installs it)");
    wait_for(sock, &mut c, "nbdkit");
    Proc(Some(c))
}
