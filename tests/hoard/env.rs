//! What the hoard's tests share: synthetic bases, sealed caches over them, a hoard in a
//! tempdir and the vmicache command pointed at it.

use super::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SIZE: u64 = 64 * MIB;

/// A raw base of `SIZE` with data in a few regions (the rest holes), from `seed`.
pub fn make_base(path: &Path, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, (off, len)) in [(0, 4 * MIB), (10 * MIB, 6 * MIB), (40 * MIB, 3 * MIB)]
        .into_iter()
        .enumerate()
    {
        write_at(path, off, &pattern(seed + i as u64, len as usize));
    }
}

/// A sealed cache over `base`, holding all of it.
pub fn sealed_cache(cache: &Path, base: &Path) {
    run(bin().args(["build", ps(base), "-o", ps(cache), "-q"]));
    run(bin().args(["warm", ps(cache), "--full", "-q"]));
    run(bin().args(["seal", ps(cache), "-q"]));
}

/// A trace of `reads` recorded (as it were) over the base of `cache`.
pub fn trace_for(cache: &Path, reads: Vec<(u64, u64)>) -> Vec<u8> {
    use vmicache::engine::{Image, OpenOptions};
    let img = Image::open(cache, &OpenOptions::read_only()).unwrap();
    let meta = vmicache::chain::build::cache_meta(&img).unwrap().unwrap();
    let base = meta.base.unwrap();
    let t = vmicache::chain::trace::Trace {
        base_size: base.virtual_size,
        base_fingerprint: base.fingerprint,
        reads,
    };
    t.encode()
}

pub struct Env {
    pub _d: tempfile::TempDir,
    pub dir: PathBuf,
    pub hoard: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let hoard = dir.join("hoard");
        let e = Env { _d: d, dir, hoard };
        e.v(&["hoard", "init", ps(&e.hoard)]);
        e
    }
    pub fn cmd(&self) -> Command {
        let mut c = bin();
        c.env("VMICACHE_HOARD", &self.hoard)
            .env("VMICACHE_ALLOW_BACKING", &self.dir)
            .env("VMICACHE_CONFIG", self.dir.join("none.yaml"));
        c
    }
    pub fn v(&self, args: &[&str]) -> String {
        String::from_utf8(run(self.cmd().args(args)).stdout).unwrap()
    }
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.v(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
    }
    pub fn pack_bytes(&self) -> u64 {
        std::fs::read_dir(self.hoard.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }
    pub fn packs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.hoard.join("packs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }
    pub fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

pub fn compare(a: &Path, b: &Path) {
    compare_images(a, b, &["-U"]);
}

/// A real OCI registry (Debian's `docker-registry`, the CNCF distribution registry) on
/// 127.0.0.1, its storage in a tempdir; stopped when dropped.
pub struct Registry {
    pub addr: String,
    child: Option<std::process::Child>,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\nhttp: {{addr: {addr}, secret: vmicache-test}}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            addr,
            child: None,
            config,
            _dir: dir,
        };
        r.resume();
        r
    }

    /// Start it (again, on the same port and storage).
    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.config.with_file_name("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (tools/deps.sh installs it)");
        self.child = Some(child);
        let t0 = std::time::Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(&self.addr) {
                use std::io::{Read, Write};
                let _ = write!(s, "GET /v2/ HTTP/1.0\r\n\r\n");
                let mut b = String::new();
                let _ = s.read_to_string(&mut b);
                if b.starts_with("HTTP/1.") && b.contains(" 200 ") {
                    return;
                }
            }
            assert!(t0.elapsed().as_secs() < 30, "docker-registry did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Stop it (a registry that went away).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The tags of repository `repo` (its name in the registry), sorted.
    pub fn tags(&self, repo: &str) -> Vec<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(s, "GET /v2/{repo}/tags/list HTTP/1.0\r\n\r\n").unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        let body = &b[b.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let mut t: Vec<String> = v["tags"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        t.sort();
        t
    }

    /// A repository reference in it.
    pub fn repo(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
