//! What the hoard's tests share: synthetic bases, sealed caches over them, a hoard in a
//! tempdir and the vmicache command pointed at it.

pub use super::common::registry::Registry;
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

/// The vmicache command run on hoard `hoard` (another "node" in the same tempdir).
pub fn on(e: &Env, hoard: &Path, args: &[&str]) -> std::process::Output {
    e.cmd()
        .env("VMICACHE_HOARD", hoard)
        .args(args)
        .output()
        .unwrap()
}

/// [`on`], which must succeed: its standard output.
pub fn ok(e: &Env, hoard: &Path, args: &[&str]) -> String {
    let o = on(e, hoard, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// [`ok`] with `--json`, parsed.
pub fn ok_json(e: &Env, hoard: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(e, hoard, &a)).unwrap()
}

/// What `HOARD/HEAD` holds.
pub fn head(hoard: &Path) -> String {
    std::fs::read_to_string(hoard.join("HEAD")).unwrap()
}
