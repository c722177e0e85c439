//! Crash-ordering tests (issue #10 item 7): the README promises that a crash at any point
//! leaves at worst leaked clusters. A workload runs through our engine over a
//! [`CrashStorage`] (a volatile page cache: what was written since the last sync may or may not
//! be on the disk), once for every operation `k` it makes:
//! - crash at `k`: every disk the crash can leave (the last synced state plus none, all, only
//!   the last, and a seeded random subset of the writes since, in order) is checked;
//! - EIO at `k`: the engine must report the error; flushed again and closed, the image is
//!   checked likewise.
//!
//! A prefix of the writes since the last sync is the "all" disk of an earlier crash point of
//! the same run, so every prefix is covered. Checked on each disk: `engine::check` finds no
//! corruption (only leaks), every write acknowledged before a completed `flush(true)` reads
//! back exactly, later (or failed) writes read as old or new bytes, `check --repair leaks`
//! leaves it clean; on every 10th crash point and wherever our check finds anything,
//! `qemu-img check` and `qemu-img convert -O raw` agree.

mod common;
use common::*;
use std::collections::HashSet;
use std::path::Path;
use vmicache::engine::check::{check, CheckReport, Repair};
use vmicache::engine::create::{create, CreateOptions};
use vmicache::engine::storage::{CrashStorage, Fault, MemStorage};
use vmicache::engine::{Image, OpenOptions};

const CS: u64 = 512;
const SIZE: u64 = 4 * MIB;
/// One L2 table maps this much guest data (64 entries of 512 B clusters).
const L2_SPAN: u64 = 64 * CS;

/// One request of the workload.
#[derive(Debug, Clone)]
enum Step {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    /// `Qcow2::fill`: copy-on-read data for whole clusters (stored where unallocated).
    Fill(u64, Vec<u8>),
    Flush(bool),
}

fn bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    XorShift64::new(seed).fill(&mut v);
    v
}

/// Allocating, partial and in-place writes, zeroing of whole and partial clusters, fills
/// that grow the refcount table (512 B clusters, 64-bit refcounts: one table cluster covers
/// 4096 clusters), and flushes between them.
fn workload() -> Vec<Step> {
    use Step::*;
    let mut s = vec![
        Write(0, bytes(1, 3 * CS)),
        Write(5000, bytes(2, 700)),
        Write(L2_SPAN - 700, bytes(3, 1400)),
        Write(100_000, bytes(4, 20_000)),
        Flush(true),
        Write(200, bytes(5, 100)),
        Write(5100, bytes(6, 1000)),
        Zero(CS, 2 * CS),
        Zero(5010, 200),
        Zero(99_000, 10_000),
        Write(CS, bytes(7, CS)),
        Flush(false),
        Write(150_000, bytes(8, 4000)),
        Flush(true),
    ];
    // Copy-on-read fills of 256 KiB .. 3.75 MiB, 32 KiB at a time (text, random and zero
    // segments), a write among them, a fill over written clusters and an all-zero one.
    let mut n = 0;
    let mut off = 256 * KIB;
    while off < SIZE - 256 * KIB {
        if off == 1536 * KIB {
            s.push(Write(off + 3 * CS + 17, bytes(9, 3000)));
            s.push(Fill(off, pattern(10, 2 * L2_SPAN as usize)));
            off += 2 * L2_SPAN;
        } else if off == 2 * MIB {
            s.push(Fill(off, vec![0; L2_SPAN as usize]));
            off += L2_SPAN;
        }
        s.push(Fill(off, pattern(100 + n, L2_SPAN as usize)));
        off += L2_SPAN;
        n += 1;
        if n % 16 == 0 {
            s.push(Flush(true));
        }
    }
    // After the growth: frees (the old refcount table's cluster is free again), reuse,
    // in-place overwrites of filled clusters.
    s.extend([
        Flush(true),
        Zero(0, 64 * KIB),
        Write(300 * KIB + 100, bytes(11, 5000)),
        Flush(true),
        Write(7 * CS, bytes(12, 4 * CS)),
        Write(50 * KIB, bytes(13, 9 * CS)),
        Zero(2 * MIB + 40 * KIB, 3 * CS + 5),
        Flush(true),
        Write(3 * MIB + 1, bytes(14, 2 * CS)),
    ]);
    s
}

/// What the guest may see.
#[derive(Clone)]
struct Model {
    /// Content as of the last completed `flush(true)`.
    durable: Vec<u8>,
    /// Content with every acknowledged request.
    cur: Vec<u8>,
    /// Requests since the last completed flush: their bytes may read as old or new.
    loose: Vec<(u64, Vec<u8>)>,
    /// Requests that failed: their bytes may read as old or new, for ever.
    failed: Vec<(u64, Vec<u8>)>,
    /// Guest clusters allocated (data or zero) in the image.
    allocated: Vec<bool>,
    /// Completed flushes.
    flushes: usize,
}

impl Model {
    fn new() -> Self {
        Model {
            durable: vec![0; SIZE as usize],
            cur: vec![0; SIZE as usize],
            loose: Vec::new(),
            failed: Vec::new(),
            allocated: vec![false; (SIZE / CS) as usize],
            flushes: 0,
        }
    }

    /// The guest writes a step makes, and the clusters it allocates.
    fn effect(&self, step: &Step) -> (Vec<(u64, Vec<u8>)>, Vec<usize>) {
        let clusters = |off: u64, len: u64| (off / CS) as usize..(off + len).div_ceil(CS) as usize;
        match step {
            Step::Write(off, b) => (
                vec![(*off, b.clone())],
                clusters(*off, b.len() as u64).collect(),
            ),
            Step::Zero(off, len) => (
                vec![(*off, vec![0; *len as usize])],
                clusters(*off, *len).collect(),
            ),
            Step::Fill(off, b) => {
                let mut w = Vec::new();
                let mut c = Vec::new();
                for (i, chunk) in b.chunks(CS as usize).enumerate() {
                    let cl = (off / CS) as usize + i;
                    if !self.allocated[cl] {
                        w.push((off + i as u64 * CS, chunk.to_vec()));
                        c.push(cl);
                    }
                }
                (w, c)
            }
            Step::Flush(_) => (Vec::new(), Vec::new()),
        }
    }

    fn acknowledged(&mut self, step: &Step, eff: Vec<(u64, Vec<u8>)>, clusters: Vec<usize>) {
        for (off, b) in &eff {
            self.cur[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
        for c in clusters {
            self.allocated[c] = true;
        }
        self.loose.extend(eff);
        if let Step::Flush(true) = step {
            self.flushed();
        }
    }

    fn flushed(&mut self) {
        self.durable.clone_from(&self.cur);
        self.loose.clear();
        self.flushes += 1;
    }

    /// Every byte reads as its flushed value or as written by a request since (or a failed one).
    fn verify(&self, label: &str, got: &[u8]) {
        assert_eq!(got.len(), SIZE as usize, "{label}: length");
        let mut bad = Vec::new();
        for (ci, (g, d)) in got
            .chunks(CS as usize)
            .zip(self.durable.chunks(CS as usize))
            .enumerate()
        {
            if g == d {
                continue;
            }
            for i in 0..g.len() {
                let pos = ci * CS as usize + i;
                if g[i] == d[i] {
                    continue;
                }
                let ok = self.loose.iter().chain(&self.failed).any(|(off, b)| {
                    let o = *off as usize;
                    pos >= o && pos < o + b.len() && b[pos - o] == g[i]
                });
                if !ok {
                    bad.push(pos);
                }
            }
        }
        if let Some(&first) = bad.first() {
            panic!(
                "{label}: {} bytes read as neither flushed nor later written data, first at {first:#x} \
                 (got {:#04x}, flushed {:#04x}, latest {:#04x}); last at {:#x}",
                bad.len(),
                got[first],
                self.durable[first],
                self.cur[first],
                bad[bad.len() - 1]
            );
        }
    }
}

/// Runs `steps`, keeping `model` in step; stops at the first failing request (its index).
fn run(img: &Image, steps: &[Step], model: &mut Model) -> Result<(), (usize, vmicache::Error)> {
    for (i, step) in steps.iter().enumerate() {
        let (eff, clusters) = model.effect(step);
        let r = match step {
            Step::Write(off, b) => img.write_at(b, *off),
            Step::Zero(off, len) => img.write_zeroes(*off, *len),
            Step::Fill(off, b) => img.as_qcow2().unwrap().fill(*off, b, u64::MAX).map(|_| ()),
            Step::Flush(durable) => img.flush(*durable),
        };
        match r {
            Ok(()) => model.acknowledged(step, eff, clusters),
            Err(e) => {
                model.failed.extend(eff);
                return Err((i, e));
            }
        }
    }
    Ok(())
}

/// A fresh image made by our creator: 512 B clusters, 64-bit refcounts, 4 MiB.
fn fresh_image() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("new.qcow2");
    let mut o = CreateOptions::new(SIZE);
    o.cluster_size = CS;
    o.refcount_bits = 64;
    create(&p, &o).unwrap();
    std::fs::read(&p).unwrap()
}

fn open(st: &CrashStorage) -> Image {
    Image::from_storage(Box::new(st.clone()), true).expect("open the image for writing")
}

/// Guest content read through our engine.
fn read_ours(disk: &[u8], label: &str) -> Vec<u8> {
    let img = Image::from_storage(Box::new(MemStorage::new(disk.to_vec())), false)
        .unwrap_or_else(|e| panic!("{label}: open: {e}"));
    let mut out = vec![0u8; SIZE as usize];
    img.read_at(&mut out, 0)
        .unwrap_or_else(|e| panic!("{label}: read: {e}"));
    out
}

fn qemu_check(path: &Path, label: &str) -> serde_json::Value {
    let out = run_status(tool("qemu-img").args(["check", "--output=json", ps(path)]));
    let code = out.status.code();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{label}: qemu-img check ({code:?}): no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert!(
        matches!(code, Some(0 | 3)) && n("corruptions") == 0 && n("check-errors") == 0,
        "{label}: qemu-img check finds more than leaks (exit {code:?}):\n{v:#}"
    );
    v
}

fn assert_no_corruption(r: &CheckReport, label: &str) {
    assert!(
        r.corruptions == 0 && r.check_errors == 0,
        "{label}: our check finds {} corruptions, {} check errors, {} leaks: {:?}{}",
        r.corruptions,
        r.check_errors,
        r.leaks,
        &r.messages[..r.messages.len().min(4)],
        if r.messages.len() > 4 { " ..." } else { "" }
    );
}

/// What the checks of one run saw.
#[derive(Default)]
struct Tally {
    points: u64,
    disks: u64,
    ours: u64,
    qemu: u64,
    leaky: u64,
    seen: HashSet<([u8; 32], usize, usize)>,
    t_ours: std::time::Duration,
    t_qemu: std::time::Duration,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} points, {} distinct disks checked by us, {} by qemu-img, {} with leaks ({:.1?} ours, {:.1?} qemu)",
            self.points, self.ours, self.qemu, self.leaky, self.t_ours, self.t_qemu
        )
    }
}

/// All checks on one disk a crash (or a failed request and a close) left.
fn check_disk(dir: &Path, disk: &[u8], model: &Model, label: &str, qemu: bool, t: &mut Tally) {
    // The same disk under the same flushed state (later points only allow more) is checked once.
    let key = (
        *blake3::hash(disk).as_bytes(),
        model.flushes,
        model.failed.len(),
    );
    if !t.seen.insert(key) {
        return;
    }
    t.disks += 1;
    let t0 = std::time::Instant::now();
    let path = dir.join("crash.qcow2");
    std::fs::write(&path, disk).unwrap();
    let r = check(&path, Repair::None).unwrap_or_else(|e| panic!("{label}: our check: {e}"));
    t.ours += 1;
    assert_no_corruption(&r, label);
    model.verify(&format!("{label}, read by us"), &read_ours(disk, label));
    let qemu = qemu || r.leaks > 0 && t.leaky % 10 == 0;
    if r.leaks > 0 {
        t.leaky += 1;
    }
    t.t_ours += t0.elapsed();
    let t0 = std::time::Instant::now();
    if qemu {
        t.qemu += 1;
        let v = qemu_check(&path, label);
        // Ours also counts clusters counted past the end of the file, where qemu-img does
        // not look (see check.rs).
        let past_eof: u64 = r
            .messages
            .iter()
            .filter_map(|m| m.strip_prefix("Leaked clusters past the end of the image: "))
            .filter_map(|m| m.split(' ').next()?.parse::<u64>().ok())
            .sum();
        let leaks = v.get("leaks").and_then(|x| x.as_u64()).unwrap_or(0);
        assert_eq!(
            leaks,
            r.leaks - past_eof,
            "{label}: leaks, qemu-img vs ours:\n{v:#}\n{r:?}"
        );
        model.verify(&format!("{label}, read by qemu-img"), &to_raw(&path));
    }
    if r.leaks > 0 {
        let fixed = check(&path, Repair::Leaks).unwrap_or_else(|e| panic!("{label}: repair: {e}"));
        assert_no_corruption(&fixed, label);
        let again = check(&path, Repair::None).unwrap();
        assert!(
            again.leaks == 0 && again.corruptions == 0,
            "{label}: not clean after --repair leaks: {again:?}"
        );
        if qemu {
            check_clean(&path);
        }
    }
    if qemu && t.qemu % 5 == 1 {
        // Reopened for writing, the repaired image takes writes and stays clean.
        let img = Image::open(&path, &OpenOptions::read_write())
            .unwrap_or_else(|e| panic!("{label}: reopen for writing: {e}"));
        img.write_at(&[0x5a; 1000], 3 * MIB + 700).unwrap();
        img.flush(true).unwrap();
        drop(img);
        check_clean(&path);
    }
    t.t_qemu += t0.elapsed();
}

/// The whole workload without faults: the count of operations, and the model at the end.
fn full_run(init: &[u8]) -> (u64, Model) {
    let st = CrashStorage::new(init.to_vec());
    let img = open(&st);
    let mut model = Model::new();
    run(&img, &workload(), &mut model).unwrap_or_else(|(i, e)| panic!("step {i}: {e}"));
    let h = img.as_qcow2().unwrap().header();
    assert!(
        h.refcount_table_clusters > 1,
        "the workload must grow the refcount table (now {} clusters)",
        h.refcount_table_clusters
    );
    let ops = st.ops();
    drop(img);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.qcow2");
    std::fs::write(&path, st.current()).unwrap();
    check_clean(&path);
    model.verify("full run", &to_raw(&path));
    (ops, model)
}

/// Pending-write subsets checked at a crash point with `n` pending: (name, keep).
/// A named choice of pending writes that reached the disk.
type Subset = (&'static str, Box<dyn Fn(usize) -> bool>);

fn subsets(n: usize, seed: u64) -> Vec<Subset> {
    let mut v: Vec<Subset> = vec![("none", Box::new(|_| false)), ("all", Box::new(|_| true))];
    if n >= 2 {
        v.push(("only the last", Box::new(move |i| i == n - 1)));
    }
    if n >= 3 {
        let mut r = XorShift64::new(seed);
        let pick: Vec<bool> = (0..n).map(|_| r.below(2) == 0).collect();
        v.push(("random", Box::new(move |i| pick[i])));
    }
    v
}

/// The two tests run one after the other: a qemu-img forked by one while the other closes a
/// locked image inherits the image's lock for an instant, and the next open is refused.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn crash_at_every_operation() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = std::time::Instant::now();
    let init = fresh_image();
    let (total, _) = full_run(&init);
    let steps = workload();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tally::default();
    let stride: u64 = std::env::var("STRIDE")
        .map(|s| s.parse().unwrap())
        .unwrap_or(1);
    for k in (0..total).step_by(stride as usize) {
        let st = CrashStorage::new(init.clone());
        st.set_fault(k, Fault::Crash);
        let mut model = Model::new();
        let img = open(&st);
        let r = run(&img, &steps, &mut model);
        let (i, e) = r.expect_err("a crash before the end must fail a request");
        assert!(st.crashed(), "crash at {k}: step {i} failed before it: {e}");
        st.power_off();
        drop(img);
        t.points += 1;
        for (name, keep) in subsets(st.pending(), k) {
            let disk = st.crash_image(keep);
            let label = format!(
                "crash at op {k} (step {i} {}), {name} of {} pending",
                kind(&steps[i]),
                st.pending()
            );
            check_disk(dir.path(), &disk, &model, &label, k % 10 == 0, &mut t);
        }
    }
    eprintln!(
        "crash points: {} operations, {t} in {:.1?}",
        total,
        t0.elapsed()
    );
}

fn kind(s: &Step) -> String {
    match s {
        Step::Write(o, b) => format!("write {o:#x}+{:#x}", b.len()),
        Step::Zero(o, l) => format!("zero {o:#x}+{l:#x}"),
        Step::Fill(o, b) => format!("fill {o:#x}+{:#x}", b.len()),
        Step::Flush(d) => format!("flush({d})"),
    }
}

/// The panic message of a failed check, shortened.
fn message(p: Box<dyn std::any::Any + Send>) -> String {
    let m = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    m.chars().take(400).collect()
}

/// EIO at every operation in turn. Every point is checked (a failing one does not hide the
/// later ones); the failures are listed at the end.
#[test]
fn eio_at_every_operation() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = std::time::Instant::now();
    let init = fresh_image();
    let (total, _) = full_run(&init);
    let steps = workload();
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tally::default();
    let mut failures = Vec::new();
    for k in 0..total {
        let st = CrashStorage::new(init.clone());
        st.set_fault(k, Fault::Eio);
        let mut model = Model::new();
        let img = open(&st);
        let (i, e) =
            run(&img, &steps, &mut model).expect_err("an EIO must fail the request that met it");
        let what = format!("{:?}", st.op_log()[k as usize]).to_lowercase();
        let label = format!("EIO at op {k} ({what}, step {i} {})", kind(&steps[i]));
        assert!(
            matches!(&e, vmicache::Error::Io { source, .. } if source.raw_os_error() == Some(nix::libc::EIO)),
            "{label}: not reported as EIO: {e}"
        );
        // The engine goes on: flushed again, it keeps what it acknowledged.
        if img.flush(true).is_ok() {
            model.flushed();
        }
        drop(img);
        t.points += 1;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let closed = format!("{label}, closed");
            check_disk(
                dir.path(),
                &st.current(),
                &model,
                &closed,
                k % 10 == 0,
                &mut t,
            );
            for (name, keep) in subsets(st.pending(), k) {
                let disk = st.crash_image(keep);
                let l = format!("{label}, then a crash with {name} pending");
                check_disk(dir.path(), &disk, &model, &l, false, &mut t);
            }
        }));
        if let Err(p) = r {
            failures.push(message(p));
        }
    }
    eprintln!(
        "EIO points: {total} operations, {t} in {:.1?}",
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} EIO points leave a damaged image:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
