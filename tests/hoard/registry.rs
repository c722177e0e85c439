//! A hoard's generations through a real OCI registry: push, pull of only what is missing,
//! catch-up of a node that was away, a registry that goes away, hostile answers refused.

use super::common::*;
use super::env::*;

#[test]
fn nodes_follow_the_registry() {
    let e = Env::new();
    let mut reg = Registry::start();
    let repo = reg.repo("vmicache/hoard");
    // Three caches: c2 and c3 share most chunks with c1.
    let b1 = e.p("b1.raw");
    make_base(&b1, 1);
    for (i, seed) in [(2, 70), (3, 80)] {
        let b = e.p(&format!("b{i}.raw"));
        std::fs::copy(&b1, &b).unwrap();
        write_at(&b, 10 * MIB, &pattern(seed, MIB as usize));
    }
    for i in 1..=3 {
        sealed_cache(&e.p(&format!("c{i}.qcow2")), &e.p(&format!("b{i}.raw")));
    }
    let nodes: Vec<_> = (1..=3).map(|i| e.p(&format!("node{i}"))).collect();
    for n in &nodes {
        e.v(&["hoard", "init", ps(n)]);
    }
    let s = &e.hoard;

    // Registration 1, pushed; nodes 1-3 pull.
    e.v(&["hoard", "add", ps(&e.p("c1.qcow2"))]);
    let p = ok_json(&e, s, &["hoard", "push", &repo]);
    assert_eq!(p["generation"], 1, "{p}");
    assert!(p["uploaded"].as_u64().unwrap() >= 2, "{p}");
    let full = p["uploaded_bytes"].as_u64().unwrap();
    // Pushing again uploads nothing.
    let p = ok_json(&e, s, &["hoard", "push", &repo]);
    assert_eq!(p["uploaded"], 0, "{p}");
    for n in &nodes {
        let r = ok_json(&e, n, &["hoard", "pull", &repo]);
        assert_eq!(r["generation"], 1, "{r}");
        assert_eq!(head(n), head(s));
    }

    // Registration 2: nodes 1-2 pull only c2's new chunks; node 3 is away.
    e.v(&["hoard", "add", ps(&e.p("c2.qcow2"))]);
    ok_json(&e, s, &["hoard", "push", &repo]);
    for n in &nodes[..2] {
        let r = ok_json(&e, n, &["hoard", "pull", &repo]);
        assert_eq!(
            (r["generation"].clone(), r["from"].clone()),
            (2.into(), 1.into()),
            "{r}"
        );
        let got = r["bytes"].as_u64().unwrap();
        assert!(
            got < full / 2,
            "pulled {got} B for a registration; the first was {full} B"
        );
    }
    // Registration 3 and a deregistration; node 3 still away.
    e.v(&["hoard", "add", ps(&e.p("c3.qcow2"))]);
    ok_json(&e, s, &["hoard", "push", &repo]);
    e.v(&["hoard", "rm", "c1"]);
    ok_json(&e, s, &["hoard", "push", &repo]);
    for n in &nodes[..2] {
        ok_json(&e, n, &["hoard", "pull", &repo]);
    }
    // The registry goes away: a pull fails in one line and changes nothing; sync waits.
    reg.stop();
    let before = head(&nodes[2]);
    let o = on(&e, &nodes[2], &["hoard", "pull", &repo]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("registry"), "{err}");
    assert_eq!(head(&nodes[2]), before);
    let o = on(&e, &nodes[2], &["hoard", "sync", &repo, "--retry-for", "2"]);
    assert!(!o.status.success());
    // Back: node 3 catches up in one sync.
    reg.resume();
    let r = ok_json(&e, &nodes[2], &["hoard", "sync", &repo]);
    assert_eq!(
        (r["generation"].clone(), r["from"].clone()),
        (4.into(), 1.into()),
        "{r}"
    );
    for n in &nodes {
        assert_eq!(head(n), head(s), "{}", n.display());
        let v = ok_json(&e, n, &["hoard", "verify"]);
        assert_eq!(v["problems"], serde_json::json!([]), "{v}");
        let l = ok_json(&e, n, &["hoard", "list"]);
        let names: Vec<_> = l
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].clone())
            .collect();
        assert_eq!(names, ["c2", "c3"], "{l}");
    }
    // A node at generation 4 takes gen-2 only when told to.
    let old = format!("{repo}:gen-2");
    let o = on(&e, &nodes[0], &["hoard", "pull", &old]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("newer than"),
        "{o:?}"
    );
    let r = ok_json(&e, &nodes[0], &["hoard", "pull", &old, "--force"]);
    assert_eq!(r["generation"], 2, "{r}");
    // What is not a hoard's artifact, and a tag that is not there, are refused in one line.
    let o = on(
        &e,
        &nodes[0],
        &["hoard", "pull", &format!("{repo}:no-such-tag")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.trim().lines().count() == 1,
        "{err}"
    );
    let o = on(&e, &nodes[0], &["hoard", "pull", "not a reference"]);
    assert!(!o.status.success());

    // The GC window on the storage node takes the registry's old tags with it.
    let tags = ["gen-1", "gen-2", "gen-3", "gen-4", "latest"];
    assert_eq!(reg.tags("vmicache/hoard"), tags);
    let g = ok_json(
        &e,
        s,
        &["hoard", "gc", "--keep-days", "0", "--registry", &repo],
    );
    assert_eq!(g["registry"]["tags_removed"], 3, "{g}");
    assert_eq!(reg.tags("vmicache/hoard"), ["gen-4", "latest"]);
    // A node that was away all along still catches up from what is left.
    let late = e.p("late");
    e.v(&["hoard", "init", ps(&late)]);
    ok_json(&e, &late, &["hoard", "sync", &repo]);
    assert_eq!(head(&late), head(s));
}

#[test]
fn credentials_reach_the_registry() {
    let e = Env::new();
    let reg = Registry::start_with_auth("vmicache", "s3cret pass");
    let repo = reg.repo("private/hoard");
    let b1 = e.p("b1.raw");
    make_base(&b1, 1);
    sealed_cache(&e.p("c1.qcow2"), &b1);
    e.v(&["hoard", "add", ps(&e.p("c1.qcow2"))]);
    // Without credentials, and with wrong ones: refused in one line that says where they go.
    for pw in [None, Some("wrong")] {
        let mut c = e.cmd();
        if let Some(pw) = pw {
            c.env("VMICACHE_REGISTRY_USER", "vmicache")
                .env("VMICACHE_REGISTRY_PASSWORD", pw);
        }
        let o = c.args(["hoard", "push", &repo]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(
            err.contains("VMICACHE_REGISTRY_USER") && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    // From the environment.
    let o = e
        .cmd()
        .env("VMICACHE_REGISTRY_USER", "vmicache")
        .env("VMICACHE_REGISTRY_PASSWORD", "s3cret pass")
        .args(["hoard", "push", &repo])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // From the configuration (the password in a file of its own).
    let node = e.p("node");
    e.v(&["hoard", "init", ps(&node)]);
    std::fs::write(e.p("password"), "s3cret pass\n").unwrap();
    std::fs::write(
        e.p("config.yaml"),
        format!(
            "dirs:\n  bases: [{d}]\n  caches: {d}/caches\n  instances: {d}/instances\n  traces: {d}/traces\n  sockets: {d}/sockets\n  state: {d}/state\n  hoard: {n}\nregistry:\n  ref: {repo}\n  username: vmicache\n  password_file: {d}/password\n",
            d = e.dir.display(),
            n = node.display()
        ),
    )
    .unwrap();
    let o = e
        .cmd()
        .env_remove("VMICACHE_HOARD")
        .env("VMICACHE_CONFIG", e.p("config.yaml"))
        .args(["hoard", "sync", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["generation"], 1, "{r}");
}
