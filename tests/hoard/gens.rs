//! Generations, the GC window, and streams between hoards (send / receive through a pipe).

use super::common::*;
use super::env::*;
use std::path::Path;

/// A second hoard ("node") in the same tempdir.
fn node(e: &Env, name: &str) -> std::path::PathBuf {
    let h = e.p(name);
    e.v(&["hoard", "init", ps(&h)]);
    h
}

/// Hoarded cache `name` of `hoard` reads as `cache` (checked out, compared by QEMU).
fn same(e: &Env, hoard: &Path, name: &str, cache: &Path) {
    let out = e.p("same.qcow2");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(e.p("same.qcow2.trace"));
    ok(e, hoard, &["hoard", "checkout", name, "-o", ps(&out)]);
    compare(cache, &out);
}

fn log(e: &Env, hoard: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(e, hoard, &["hoard", "log", "--json"])).unwrap()
}

#[test]
fn generations_and_the_gc_window() {
    let e = Env::new();
    let (b1, b2) = (e.p("b1.raw"), e.p("b2.raw"));
    make_base(&b1, 1);
    make_base(&b2, 50);
    sealed_cache(&e.p("c1.qcow2"), &b1);
    sealed_cache(&e.p("c2.qcow2"), &b2);
    e.v(&["hoard", "add", ps(&e.p("c1.qcow2"))]);
    e.v(&["hoard", "add", ps(&e.p("c2.qcow2"))]);
    e.v(&["hoard", "rm", "c1"]);
    let l = log(&e, &e.hoard);
    let nums: Vec<u64> = l
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(nums, [3, 2, 1], "{l}");
    assert_eq!(l[0]["change"], "rm c1");
    assert_eq!(l[0]["caches"].as_object().unwrap().len(), 1);
    assert_eq!(l[1]["caches"].as_object().unwrap().len(), 2);
    // The caches/ view follows the newest generation.
    assert!(!e.hoard.join("caches/c1.vmh").exists());
    assert!(e.hoard.join("caches/c2.vmh").exists());
    // A hoard from before the heads log (made by an older vmicache): gc writes it from the
    // records first, so the window still holds all three.
    std::fs::remove_file(e.hoard.join("heads")).unwrap();
    // A window of a day keeps all three generations, and c1's packs with generation 2.
    let before = e.pack_bytes();
    let g = e.json(&["hoard", "gc", "--keep-days", "1", "--json"]);
    assert_eq!(g["kept_generations"], 3, "{g}");
    assert_eq!(g["deleted_packs"], 0, "{g}");
    assert_eq!(e.pack_bytes(), before);
    let v = e.json(&["hoard", "verify", "--json"]);
    assert_eq!(v["generations"], 3, "{v}");
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    // A window of 0 days keeps the newest only: generation 1 and 2 go, and c1's data.
    let g = e.json(&["hoard", "gc", "--keep-days", "0", "--json"]);
    assert_eq!(g["kept_generations"], 1, "{g}");
    assert_eq!(g["deleted_generations"], 2, "{g}");
    assert!(e.pack_bytes() < before);
    assert_eq!(log(&e, &e.hoard).as_array().unwrap().len(), 1);
    let v = e.json(&["hoard", "verify", "--json"]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    same(&e, &e.hoard, "c2", &e.p("c2.qcow2"));
}

#[test]
fn streams_bring_nodes_to_the_same_generation() {
    let e = Env::new();
    let b1 = e.p("b1.raw");
    make_base(&b1, 1);
    sealed_cache(&e.p("c1.qcow2"), &b1);
    // c2: the same base with one region changed (most chunks shared with c1).
    let b2 = e.p("b2.raw");
    std::fs::copy(&b1, &b2).unwrap();
    write_at(&b2, 10 * MIB, &pattern(77, MIB as usize));
    sealed_cache(&e.p("c2.qcow2"), &b2);
    let (n1, n2) = (node(&e, "n1"), node(&e, "n2"));

    // Generation 1 → n1 by a full stream in a file.
    e.v(&["hoard", "add", ps(&e.p("c1.qcow2"))]);
    let full = e.p("full.stream");
    e.v(&["hoard", "send", "-o", ps(&full)]);
    let r: serde_json::Value =
        serde_json::from_str(&ok(&e, &n1, &["hoard", "receive", ps(&full), "--json"])).unwrap();
    assert_eq!(r["generation"], 1, "{r}");
    assert_eq!(head(&n1), head(&e.hoard));
    // Receiving it again changes nothing.
    let r: serde_json::Value =
        serde_json::from_str(&ok(&e, &n1, &["hoard", "receive", ps(&full), "--json"])).unwrap();
    assert_eq!(r["up_to_date"], true, "{r}");

    // Generation 2 → n1 incrementally through a pipe: only c2's new chunks travel.
    e.v(&["hoard", "add", ps(&e.p("c2.qcow2"))]);
    let mut send = e.cmd();
    send.args(["hoard", "send", "--from", "1"]);
    let mut recv = e.cmd();
    recv.env("VMICACHE_HOARD", &n1)
        .args(["hoard", "receive", "-", "--json"]);
    let recv = piped(&mut send, &mut recv);
    let r: serde_json::Value = serde_json::from_slice(&recv.stdout).unwrap();
    assert_eq!(
        (r["generation"].clone(), r["from"].clone()),
        (2.into(), 1.into()),
        "{r}"
    );
    let inc = r["bytes"].as_u64().unwrap();
    let full_len = std::fs::metadata(&full).unwrap().len();
    assert!(
        inc < full_len / 2,
        "incremental {inc} B vs full {full_len} B"
    );
    assert_eq!(head(&n1), head(&e.hoard));
    // n1 keeps the generation it was at, too (its log and GC window as the sender's).
    let l: serde_json::Value =
        serde_json::from_str(&ok(&e, &n1, &["hoard", "log", "--json"])).unwrap();
    assert_eq!(l.as_array().unwrap().len(), 2, "{l}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&e, &n1, &["hoard", "verify", "--json"])).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    same(&e, &n1, "c2", &e.p("c2.qcow2"));

    // n2 is at no generation: a stream from generation 1 is refused, naming both.
    let inc_file = e.p("inc.stream");
    e.v(&["hoard", "send", "--from", "1", "-o", ps(&inc_file)]);
    let o = on(&e, &n2, &["hoard", "receive", ps(&inc_file)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("has no generation yet") && err.contains("from generation 1"),
        "{err}"
    );
    assert_eq!(head(&n2).trim(), "none");

    // A cut stream and a damaged one apply nothing.
    let b = std::fs::read(&full).unwrap();
    let cut = e.p("cut.stream");
    std::fs::write(&cut, &b[..b.len() * 2 / 3]).unwrap();
    let o = on(&e, &n2, &["hoard", "receive", ps(&cut)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("cut short"));
    let mut bad = b.clone();
    let at = bad.len() - 4096;
    bad[at] ^= 0x55;
    let badp = e.p("bad.stream");
    std::fs::write(&badp, &bad).unwrap();
    let o = on(&e, &n2, &["hoard", "receive", ps(&badp)]);
    assert!(!o.status.success());
    assert_eq!(head(&n2).trim(), "none");
    // Garbage is refused in one line.
    std::fs::write(e.p("junk"), [b'x'; 200]).unwrap();
    let o = on(&e, &n2, &["hoard", "receive", ps(&e.p("junk"))]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a vmicache hoard stream"));
    // A full stream brings n2 up to date; gc then removes what the failed ones left.
    e.v(&["hoard", "send", "-o", ps(&full)]);
    ok(&e, &n2, &["hoard", "receive", ps(&full)]);
    assert_eq!(head(&n2), head(&e.hoard));
    ok(&e, &n2, &["hoard", "gc", "--keep-days", "0"]);
    let v: serde_json::Value =
        serde_json::from_str(&ok(&e, &n2, &["hoard", "verify", "--json"])).unwrap();
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    assert_eq!(v["notes"], serde_json::json!([]), "{v}");
    same(&e, &n2, "c1", &e.p("c1.qcow2"));
}

#[test]
fn a_format_1_hoard_is_named_and_upgraded() {
    let e = Env::new();
    let b1 = e.p("b1.raw");
    make_base(&b1, 1);
    sealed_cache(&e.p("c1.qcow2"), &b1);
    e.v(&["hoard", "add", ps(&e.p("c1.qcow2"))]);
    // Make it what format 1 was: hoard.yaml of format 1, caches/ and packs/ only.
    let h = &e.hoard;
    let y = std::fs::read_to_string(h.join("hoard.yaml")).unwrap();
    std::fs::write(h.join("hoard.yaml"), y.replace("format: 2", "format: 1")).unwrap();
    let idx = std::fs::read(h.join("caches/c1.vmh")).unwrap();
    for d in ["indexes", "gens"] {
        std::fs::remove_dir_all(h.join(d)).unwrap();
    }
    std::fs::remove_file(h.join("HEAD")).unwrap();
    std::fs::remove_file(h.join("caches/c1.vmh")).unwrap();
    std::fs::write(h.join("caches/c1.vmh"), &idx).unwrap();
    let o = e.cmd().args(["hoard", "list"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("hoard format 1"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    e.v(&["hoard", "init", ps(h)]);
    let l = e.json(&["hoard", "list", "--json"]);
    assert_eq!(l[0]["name"], "c1", "{l}");
    let v = e.json(&["hoard", "verify", "--json"]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    same(&e, h, "c1", &e.p("c1.qcow2"));
}

#[test]
fn a_lost_head_is_refused_then_repaired() {
    let e = Env::new();
    let b1 = e.p("b1.raw");
    make_base(&b1, 1);
    sealed_cache(&e.p("c1.qcow2"), &b1);
    sealed_cache(&e.p("c2.qcow2"), &b1);
    e.v(&["hoard", "add", ps(&e.p("c1.qcow2"))]);
    e.v(&["hoard", "add", ps(&e.p("c2.qcow2"))]);
    let packs = e.packs();
    std::fs::remove_file(e.hoard.join("HEAD")).unwrap();
    // Not an empty hoard: writers refuse, nothing is deleted, verify names it.
    for args in [
        vec!["hoard", "add", ps(&e.p("c1.qcow2")), "--name", "c3"],
        vec!["hoard", "gc", "--keep-days", "0"],
        vec!["hoard", "list"],
    ] {
        let o = e.cmd().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("--repair"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(e.packs(), packs);
    assert!(e.hoard.join("caches/c1.vmh").exists());
    let o = e.cmd().args(["hoard", "verify"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    e.v(&["hoard", "init", ps(&e.hoard), "--repair"]);
    let l = e.json(&["hoard", "log", "--json"]);
    assert_eq!(l[0]["generation"], 2, "{l}");
    let v = e.json(&["hoard", "verify", "--json"]);
    assert_eq!(v["problems"], serde_json::json!([]), "{v}");
    same(&e, &e.hoard, "c2", &e.p("c2.qcow2"));
}
