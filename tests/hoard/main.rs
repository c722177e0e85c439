//! The hoard (`vmicache hoard`): round trips against QEMU (qemu-img compare and check are the
//! referee), deduplication counted in bytes, serving a hoarded cache over NBD, damage
//! detected and never served, concurrent writers, gc.

#[path = "../common/mod.rs"]
mod common;
mod env;
mod gens;
mod registry;
use common::*;
use env::*;
use std::path::{Path, PathBuf};

#[test]
fn add_list_checkout_rm_gc_round_trip() {
    let e = Env::new();
    let (base, cache) = (e.p("base.raw"), e.p("c1.qcow2"));
    make_base(&base, 1);
    sealed_cache(&cache, &base);
    // A trace beside the cache travels with it (and orders the packing).
    let trace_bytes = trace_for(&cache, vec![(10 * MIB, 4 * KIB), (MIB, 16 * KIB)]);
    std::fs::write(e.p("c1.qcow2.trace"), &trace_bytes).unwrap();
    let r = e.json(&["hoard", "add", ps(&cache), "--json"]);
    assert_eq!(r["name"], "c1");
    assert!(r["new_chunks"].as_u64().unwrap() > 0, "{r}");
    let list = e.json(&["hoard", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "c1");
    e.v(&["hoard", "verify"]);

    // Checkout: equal content (qemu-img compare), clean, same extension and trace.
    let out = e.p("out.qcow2");
    e.v(&["hoard", "checkout", "c1", "-o", ps(&out)]);
    check_clean(&out);
    compare(&cache, &out);
    assert_eq!(std::fs::read(e.p("out.qcow2.trace")).unwrap(), trace_bytes);
    let ins = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&run(e.cmd().args(["inspect", "--json", ps(p)])).stdout).unwrap()
    };
    let (a, b) = (ins(&cache), ins(&out));
    for k in ["state", "base", "sealed", "created", "base-check"] {
        assert_eq!(a["cache"][k], b["cache"][k], "{k}");
    }
    // A second reader: qcow2-rs sees the same bytes as QEMU.
    assert_bytes_eq("checkout", &read_all_ours(&out), &to_raw(&out));
    // A bare file name is in the current directory (its parent is the empty path).
    run(e
        .cmd()
        .current_dir(e.p(""))
        .args(["hoard", "checkout", "c1", "-o", "bare.qcow2"]));
    compare(&cache, &e.p("bare.qcow2"));
    assert!(e.p("bare.qcow2.trace").exists());

    // Deregister; gc takes the packs away.
    assert!(!e.packs().is_empty());
    e.v(&["hoard", "rm", "c1"]);
    assert_eq!(e.json(&["hoard", "list", "--json"]), serde_json::json!([]));
    let g = e.json(&["hoard", "gc", "--keep-days", "0", "--json"]);
    assert_eq!(g["deleted_packs"], 1, "{g}");
    assert!(e.packs().is_empty());
    e.v(&["hoard", "verify"]);
    // Asking for what is not there: a clear error.
    let o = run_status(
        e.cmd()
            .args(["hoard", "checkout", "c1", "-o", ps(&e.p("x.qcow2"))]),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no cache named 'c1'"));
}

#[test]
fn shared_data_is_stored_once() {
    let e = Env::new();
    let (a, b) = (e.p("a.raw"), e.p("b.raw"));
    make_base(&a, 7);
    // B: A with 1 MiB of new random data and one region zeroed.
    std::fs::copy(&a, &b).unwrap();
    let mut rng = XorShift64::new(99);
    let mut fresh = vec![0u8; MIB as usize];
    rng.fill(&mut fresh);
    write_at(&b, 11 * MIB, &fresh);
    write_at(&b, 41 * MIB, &vec![0u8; MIB as usize]);
    let (ca, cb) = (e.p("a.qcow2"), e.p("b.qcow2"));
    sealed_cache(&ca, &a);
    sealed_cache(&cb, &b);
    let ra = e.json(&["hoard", "add", ps(&ca), "--json"]);
    let after_a = e.pack_bytes();
    let rb = e.json(&["hoard", "add", ps(&cb), "--json"]);
    // B's only new chunks are the 1 MiB of random data: 256 chunks, stored uncompressed.
    assert_eq!(rb["new_chunks"], 256, "{rb}");
    let grew = e.pack_bytes() - after_a;
    assert!(
        (MIB..MIB + 64 * KIB).contains(&grew),
        "B added {grew} bytes to the packs"
    );
    assert!(rb["dedup_bytes"].as_u64().unwrap() > 8 * MIB, "{rb}");
    // The same cache again under another name: nothing new stored.
    let before = e.pack_bytes();
    let r2 = e.json(&["hoard", "add", ps(&ca), "--name", "a-again", "--json"]);
    assert_eq!(r2["new_chunks"], 0, "{r2}");
    assert_eq!(e.pack_bytes(), before);
    assert_eq!(
        r2["dedup_bytes"],
        ra["data_bytes"].as_u64().unwrap() - ra["zero_bytes"].as_u64().unwrap()
    );
    // The same name twice: refused, naming the way out.
    let o = run_status(e.cmd().args(["hoard", "add", ps(&ca)]));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already hoarded"));
    let s = e.json(&["hoard", "stats", "--json"]);
    assert!(s["dedup_ratio"].as_f64().unwrap() > 2.5, "{s}");
    // analyze counts the same distinct non-zero 4 KiB blocks as the hoard stores.
    let an = e.json(&[
        "analyze",
        ps(&ca),
        ps(&cb),
        "--block-sizes",
        "4K,64K",
        "--hoard",
        ps(&e.hoard),
        "--json",
    ]);
    let rows = an["analysis"]["rows"].as_array().unwrap();
    assert_eq!(rows[0]["block_size"], 4096);
    assert_eq!(rows[0]["unique"], s["stored_chunks"], "{an}");
    assert!(rows[0]["dedup_ratio"].as_f64().unwrap() > 1.8, "{an}");
    let cross = rows[0]["cross_similarity"].as_f64().unwrap();
    assert!((0.8..1.0).contains(&cross), "{an}");
    assert!(an["hoard"]["vs_zfs_style"].as_f64().unwrap() > 0.0, "{an}");
    let bases = e.json(&[
        "analyze",
        ps(&ca),
        "--bases",
        "--block-sizes",
        "4K",
        "--json",
    ]);
    // The cache holds all of its base: the same data either way.
    let own = e.json(&["analyze", ps(&ca), "--block-sizes", "4K", "--json"]);
    assert_eq!(
        bases["analysis"]["rows"], own["analysis"]["rows"],
        "{bases}\n{own}"
    );
    assert!(s["metadata_per_chunk"].as_f64().unwrap() <= 32.0, "{s}");

    // gc after removing A and its twin: the pack that held mostly A's chunks is repacked,
    // B still reads as before.
    e.v(&["hoard", "rm", "a"]);
    e.v(&["hoard", "rm", "a-again"]);
    let old = e.packs();
    e.v(&["hoard", "gc", "--keep-days", "0"]);
    e.v(&["hoard", "verify"]);
    let out = e.p("b-out.qcow2");
    e.v(&["hoard", "checkout", "b", "-o", ps(&out)]);
    compare(&cb, &out);
    check_clean(&out);
    // Slower, smaller: recompress everything at zstd 19.
    let repack = [
        "hoard",
        "gc",
        "--keep-days",
        "0",
        "--recompress",
        "19",
        "--frame-chunks",
        "64",
    ];
    let before = e.pack_bytes();
    e.v(&repack);
    assert!(e.pack_bytes() <= before);
    assert_ne!(e.packs(), old);
    // The same repack again makes the very same pack (same id): it must survive its gc.
    let packed = e.packs();
    e.v(&repack);
    assert_eq!(e.packs(), packed);
    e.v(&["hoard", "verify"]);
    let out2 = e.p("b-out2.qcow2");
    e.v(&["hoard", "checkout", "b", "-o", ps(&out2)]);
    compare(&cb, &out2);
    // A gc killed after writing its pack and before rewriting any index, run again: the
    // pack it writes again has the id of the one left over (kept here from an earlier gc).
    let keep = e.packs();
    let repack_back = [
        "hoard",
        "gc",
        "--keep-days",
        "0",
        "--recompress",
        "3",
        "--frame-chunks",
        "32",
    ];
    e.v(&repack_back);
    let made: Vec<PathBuf> = e
        .packs()
        .into_iter()
        .filter(|p| !keep.contains(p))
        .collect();
    assert_eq!(made.len(), 1);
    let copy = std::fs::read(&made[0]).unwrap();
    e.v(&repack);
    std::fs::write(&made[0], &copy).unwrap(); // the leftover of the "killed" gc
    e.v(&repack_back);
    e.v(&["hoard", "verify"]);
    let out3 = e.p("b-out3.qcow2");
    e.v(&["hoard", "checkout", "b", "-o", ps(&out3)]);
    compare(&cb, &out3);
}

#[test]
fn odd_sizes_cluster_sizes_and_zero_data() {
    let e = Env::new();
    // 16 MiB + 512 B virtual: the last chunk is partial.
    let base = e.p("odd.raw");
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(16 * MIB + 512).unwrap();
    write_at(&base, 0, &pattern(5, (3 * MIB) as usize));
    write_at(&base, 16 * MIB - 1024, &[0x77; 1536]);
    // A cluster of data whose first 4 KiB are zeros: a data chunk of zeros.
    write_at(&base, 8 * MIB + 4096, &pattern(6, 60 << 10));
    for cs in ["4K", "64K", "2M"] {
        let cache = e.p(&format!("odd{cs}.qcow2"));
        run(bin().args([
            "build",
            ps(&base),
            "-o",
            ps(&cache),
            "-q",
            "--cluster-size",
            cs,
        ]));
        run(bin().args(["warm", ps(&cache), "--full", "-q"]));
        run(bin().args(["seal", ps(&cache), "-q"]));
        let name = format!("odd{cs}");
        let r = e.json(&["hoard", "add", ps(&cache), "--json"]);
        let (data, zero, dedup) = (
            r["data_bytes"].as_u64().unwrap(),
            r["zero_bytes"].as_u64().unwrap(),
            r["dedup_bytes"].as_u64().unwrap(),
        );
        // Every byte of data is zeros, already hoarded or new (the last chunk holds 512 B).
        let new = r["new_chunks"].as_u64().unwrap() * 4096;
        assert!(
            data <= zero + dedup + new && zero + dedup + new < data + 4096,
            "{r}"
        );
        let out = e.p(&format!("{name}.out.qcow2"));
        e.v(&["hoard", "checkout", &name, "-o", ps(&out)]);
        compare(&cache, &out);
        check_clean(&out);
        // Served: the same bytes, the same block status as the cache itself.
        let inst = e.p(&format!("{name}-i.qcow2"));
        e.v(&["chain", &format!("hoard:{name}"), "-o", ps(&inst)]);
        let ours = run(e.cmd().args(["inspect", "--map", "--json", ps(&inst)])).stdout;
        let theirs = run(e.cmd().args(["inspect", "--map", "--json", ps(&cache)])).stdout;
        let strip = |b: &[u8]| -> Vec<(u64, u64, bool, bool)> {
            let v: serde_json::Value = serde_json::from_slice(b).unwrap();
            let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
            for x in v.as_array().unwrap() {
                let k = (x["zero"].as_bool().unwrap(), x["data"].as_bool().unwrap());
                let (s, l) = (x["start"].as_u64().unwrap(), x["length"].as_u64().unwrap());
                match out.last_mut() {
                    Some(p) if (p.2, p.3) == k && p.0 + p.1 == s => p.1 += l,
                    _ => out.push((s, l, k.0, k.1)),
                }
            }
            out
        };
        assert_eq!(strip(&ours), strip(&theirs), "{cs}");
    }
    // A checkout never overwrites, nor leaves a stale trace beside its output.
    std::fs::write(e.p("x.qcow2.trace"), b"stale").unwrap();
    let o = run_status(
        e.cmd()
            .args(["hoard", "checkout", "odd64K", "-o", ps(&e.p("x.qcow2"))]),
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists already"));
}

#[test]
fn traces_must_belong_to_the_cache() {
    let e = Env::new();
    let (a, b) = (e.p("a.raw"), e.p("b.raw"));
    make_base(&a, 51);
    make_base(&b, 52);
    let (ca, cb) = (e.p("a.qcow2"), e.p("b.qcow2"));
    sealed_cache(&ca, &a);
    sealed_cache(&cb, &b);
    // A trace recorded over B's base, given with A's cache.
    let tp = e.p("b.trace");
    std::fs::write(&tp, trace_for(&cb, vec![(0, 4096)])).unwrap();
    let o = run_status(e.cmd().args(["hoard", "add", ps(&ca), "--trace", ps(&tp)]));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("another base"),
        "{o:?}"
    );
    e.v(&["hoard", "add", ps(&cb), "--trace", ps(&tp)]);
    std::fs::write(&tp, b"VMITRACE garbage").unwrap();
    let o = run_status(e.cmd().args(["hoard", "add", ps(&ca), "--trace", ps(&tp)]));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("its trace"),
        "{o:?}"
    );
}

#[test]
fn unsealed_caches_are_refused() {
    let e = Env::new();
    let (base, cache) = (e.p("base.raw"), e.p("c.qcow2"));
    make_base(&base, 3);
    run(bin().args(["build", ps(&base), "-o", ps(&cache), "-q"]));
    run(bin().args(["warm", ps(&cache), "--full", "-q"]));
    let o = run_status(e.cmd().args(["hoard", "add", ps(&cache)]));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not sealed") && err.contains("vmicache seal"),
        "{err}"
    );
    let o = run_status(e.cmd().args(["hoard", "add", ps(&base)]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be a qcow2 vmicache cache"));
    assert!(e.packs().is_empty());
}

/// Serve `inst` on a socket in the env's directory; the URI of its export.
fn serve(e: &Env, inst: &Path, log: &Path) -> (Proc, String) {
    let sock = e.p(&format!(
        "{}.sock",
        inst.file_stem().unwrap().to_str().unwrap()
    ));
    let mut c = e
        .cmd()
        .args(["serve", ps(inst), "--socket", ps(&sock)])
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_for(&sock, &mut c, "vmicache serve");
    let name = inst.file_stem().unwrap().to_str().unwrap();
    (
        Proc(Some(c)),
        format!("nbd+unix:///{name}?socket={}", sock.display()),
    )
}

#[test]
fn a_hoarded_cache_serves_like_the_cache() {
    let e = Env::new();
    let (base, cache) = (e.p("base.raw"), e.p("c.qcow2"));
    make_base(&base, 11);
    sealed_cache(&cache, &base);
    e.v(&["hoard", "add", ps(&cache)]);
    // Instances: over the hoarded cache (hoard:NAME) and over the plain cache.
    let (hi, ci) = (e.p("hi.qcow2"), e.p("ci.qcow2"));
    e.v(&["chain", "hoard:c", "-o", ps(&hi)]);
    e.v(&["chain", ps(&cache), "-o", ps(&ci)]);
    let info = qemu_img(&["info", "-U", ps(&hi)]);
    assert!(
        info.contains("backing file format: vmicache-hoard"),
        "{info}"
    );
    // The instance's own metadata is clean (its backing is ours alone: not opened by QEMU).
    let nob = format!(
        "json:{{\"driver\":\"qcow2\",\"backing\":null,\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}",
        hi.display()
    );
    let chk = run_status(tool("qemu-img").args(["check", &nob]));
    assert!(
        chk.status.success(),
        "{}",
        String::from_utf8_lossy(&chk.stdout)
    );
    // Writes go to the instance: write through the served chain, then compare.
    let (srv_h, uh) = serve(&e, &hi, &e.p("h.log"));
    let (srv_c, uc) = serve(&e, &ci, &e.p("c.log"));
    for u in [&uh, &uc] {
        qemu_io(
            Path::new(u),
            &["-f", "raw"],
            &["write -P 0x5a 10M 128k", "write -z 40M 64k"],
        );
    }
    let out = run_status(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &uh, &uc]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Same block status: qemu-img map over both exports.
    let map = |u: &str| -> Vec<(u64, u64, bool, bool)> {
        let m = qemu_img_json(&["map", "--output=json", "-f", "raw", u]);
        m.as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["start"].as_u64().unwrap(),
                    x["length"].as_u64().unwrap(),
                    x["zero"].as_bool().unwrap(),
                    x["data"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(map(&uh), map(&uc));
    srv_h.stop();
    srv_c.stop();
    check_clean(&ci);
    let log = std::fs::read_to_string(e.p("h.log")).unwrap();
    assert!(log.contains("read 0 B from the base"), "{log}");
}

#[test]
fn damage_is_reported_and_never_served() {
    let e = Env::new();
    let (base, cache) = (e.p("base.raw"), e.p("c.qcow2"));
    make_base(&base, 21);
    sealed_cache(&cache, &base);
    e.v(&["hoard", "add", ps(&cache)]);
    let pack = e.packs().pop().unwrap();
    // A byte in the middle of the frames.
    let len = std::fs::metadata(&pack).unwrap().len();
    let mut b = [0u8; 1];
    {
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&pack)
            .unwrap()
            .read_exact_at(&mut b, len / 3)
            .unwrap();
    }
    write_at(&pack, len / 3, &[b[0] ^ 0x40]);
    let o = run_status(e.cmd().args(["hoard", "verify"]));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("hoard damaged") && err.contains(ps(&pack)),
        "{err}"
    );
    assert!(err.contains("frame "), "{err}");
    let j = serde_json::from_slice::<serde_json::Value>(
        &run_status(e.cmd().args(["hoard", "verify", "--json"])).stdout,
    )
    .unwrap();
    assert!(!j["problems"].as_array().unwrap().is_empty());

    // Read in place: every read either fails or returns the cache's bytes, never others.
    let hi = e.p("hi.qcow2");
    e.v(&["chain", "hoard:c", "-o", ps(&hi)]);
    let want = to_raw(&cache);
    let failing = {
        use vmicache::engine::{Image, OpenOptions};
        vmicache::hoard::register();
        vmicache::engine::open::allow_backing_in(&e.dir).unwrap();
        let img = Image::open(&hi, &OpenOptions::read_only()).unwrap();
        let mut failing = Vec::new();
        let mut buf = vec![0u8; 64 * KIB as usize];
        for off in (0..SIZE).step_by(buf.len()) {
            match img.read_at(&mut buf, off) {
                Err(err) => {
                    assert!(err.to_string().contains("checksum mismatch"), "{err}");
                    failing.push(off);
                }
                Ok(()) => assert!(
                    buf == want[off as usize..off as usize + buf.len()],
                    "at {off}"
                ),
            }
        }
        failing
    };
    assert!(!failing.is_empty(), "no read met the damage");
    // Over NBD: EIO, and the server says why.
    let log = e.p("serve.log");
    let (srv, u) = serve(&e, &hi, &log);
    let out = run_status(tool("qemu-io").args([
        "-f",
        "raw",
        "-r",
        &u,
        "-c",
        &format!("read {} 64k", failing[0]),
    ]));
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("Input/output error"), "{said}");
    srv.stop();
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("damaged hoard pack"), "{said}");
}

#[test]
fn concurrent_adds_both_land() {
    let e = Env::new();
    let mut kids = Vec::new();
    for i in 0..2 {
        let (base, cache) = (e.p(&format!("b{i}.raw")), e.p(&format!("c{i}.qcow2")));
        make_base(&base, 30 + i);
        sealed_cache(&cache, &base);
        kids.push(
            e.cmd()
                .args(["hoard", "add", ps(&cache), "-q"])
                .spawn()
                .unwrap(),
        );
    }
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert_eq!(
        e.json(&["hoard", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    e.v(&["hoard", "verify"]);
    for i in 0..2 {
        let out = e.p(&format!("o{i}.qcow2"));
        e.v(&["hoard", "checkout", &format!("c{i}"), "-o", ps(&out)]);
        compare(&e.p(&format!("c{i}.qcow2")), &out);
    }
}

#[test]
fn damaged_indexes_are_errors_not_panics() {
    let e = Env::new();
    let (base, cache) = (e.p("base.raw"), e.p("c.qcow2"));
    make_base(&base, 41);
    sealed_cache(&cache, &base);
    e.v(&["hoard", "add", ps(&cache)]);
    let idx = e.hoard.join("caches/c.vmh");
    let good = std::fs::read(&idx).unwrap();
    let mut rng = XorShift64::new(5);
    for round in 0..40 {
        let mut b = good.clone();
        match round % 3 {
            0 => b.truncate(rng.below(b.len() as u64) as usize),
            1 => {
                let at = rng.below(b.len() as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            _ => {
                // Valid checksum over nonsense: the runs themselves must be checked.
                let n = b.len();
                let at = 8 + rng.below((n - 40) as u64) as usize;
                b[at] = rng.below(256) as u8;
                let h = blake3_of(&b[..n - 32]);
                b[n - 32..].copy_from_slice(&h);
            }
        }
        std::fs::write(&idx, &b).unwrap();
        for args in [
            vec!["hoard", "list"],
            vec!["inspect", ps(&idx)],
            vec!["hoard", "verify"],
        ] {
            let o = run_status(e.cmd().args(&args));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!err.contains("panicked"), "{args:?}: {err}");
            assert!(o.status.code().is_some_and(|c| c <= 2), "{args:?}: {o:?}");
        }
    }
    std::fs::write(&idx, &good).unwrap();
    e.v(&["hoard", "verify"]);
}

fn blake3_of(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}
