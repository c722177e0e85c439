//! Several nodes on one machine (each a hoard directory and the processes run for it): a
//! storage node registers images with real first boots of the test guest and pushes each
//! generation to a real OCI registry (`docker-registry`); compute nodes 1-2 pull every time;
//! node 3 is away through two registrations and a deregistration, then syncs and catches up.
//! All end at the same generation with the same index digests and a clean verify, and a VM
//! boots on node 3 from its hoard reading 0 B from the base (counted by nbdkit's log filter,
//! which serves the base to everyone). Streams through a pipe reach a fourth node.
//!
//! Needs: the minimal guest (`images/build.sh minimal`), qemu-system-x86, nbdkit and
//! docker-registry (tools/deps.sh --boot). Missing pieces fail the test.

mod common;
use common::guest::*;
use common::registry::Registry;
use common::*;
use std::path::{Path, PathBuf};

struct Nodes {
    dir: PathBuf,
    allow: String,
}

impl Nodes {
    fn on(&self, node: &str, args: &[&str]) -> std::process::Output {
        bin()
            .env("VMICACHE_HOARD", self.dir.join(node))
            .env("VMICACHE_ALLOW_BACKING", &self.allow)
            .env("VMICACHE_CONFIG", self.dir.join("none.yaml"))
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, node: &str, args: &[&str]) -> String {
        let o = self.on(node, args);
        assert!(
            o.status.success(),
            "{node}: {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, node: &str, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(node, &a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// The newest generation of `node`: (number, caches with their index ids).
    fn head(&self, node: &str) -> (u64, serde_json::Value) {
        let l = self.json(node, &["hoard", "log"]);
        (l[0]["generation"].as_u64().unwrap(), l[0]["caches"].clone())
    }

    fn register(&self, repo: &str, image: &Path, name: &str) -> serde_json::Value {
        let boot = boot_sh();
        self.ok(
            "storage",
            &[
                "register",
                ps(image),
                "--name",
                name,
                "--registry",
                repo,
                "--timeout",
                "300",
                "--",
                ps(&boot),
                "minimal",
                "{nbd}",
                "raw",
            ],
        );
        self.json("storage", &["hoard", "stats"])
    }
}

#[test]
fn nodes_share_a_hoard_through_a_registry() {
    std::env::set_var("VMICACHE_TEST_GUEST", "minimal");
    let g = guest_dir();
    let base = g.join("base.raw");
    assert!(
        base.exists(),
        "{} missing: run images/build.sh minimal (tools/test.sh does)",
        base.display()
    );
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let nodes = Nodes {
        allow: format!("{}:{}", g.display(), dir.display()),
        dir: dir.clone(),
    };
    // The base, served by nbdkit to every node: its log counts every read of it.
    let bsock = dir.join("base.sock");
    let log = dir.join("nbdkit.log");
    let _kit = nbdkit(
        &bsock,
        &["--filter=log"],
        &base,
        &[&format!("logfile={}", log.display())],
    );
    // Five images: qcow2 files over the served base (as images in a cloud share a parent).
    let uri = format!("nbd+unix:///?socket={}", bsock.display());
    let images: Vec<PathBuf> = (1..=5)
        .map(|i| {
            let p = dir.join(format!("image{i}.qcow2"));
            qemu_overlay(&p, &uri, "raw");
            p
        })
        .collect();
    let reg = Registry::start();
    let repo = reg.repo("cloud/hoard");
    for n in ["storage", "node1", "node2", "node3", "node4"] {
        nodes.ok(n, &["hoard", "init", ps(&dir.join(n))]);
    }

    // Three registrations; every node pulls each.
    let mut sizes = Vec::new();
    for (i, img) in images[..3].iter().enumerate() {
        let s = nodes.register(&repo, img, &format!("img{}", i + 1));
        sizes.push(s["logical_bytes"].as_u64().unwrap());
        for n in ["node1", "node2", "node3"] {
            let r = nodes.json(n, &["hoard", "pull", &repo]);
            assert_eq!(r["generation"], (i + 1) as u64, "{n}: {r}");
            eprintln!(
                "registration {}: {n} pulled {} B ({} packs)",
                i + 1,
                r["bytes"],
                r["packs"]
            );
        }
    }
    // Node 3 goes away: two more registrations and a deregistration pass it by.
    for (i, img) in images[3..].iter().enumerate() {
        nodes.register(&repo, img, &format!("img{}", i + 4));
        for n in ["node1", "node2"] {
            nodes.json(n, &["hoard", "pull", &repo]);
        }
    }
    nodes.ok("storage", &["deregister", "img1", "--registry", &repo]);
    for n in ["node1", "node2"] {
        nodes.json(n, &["hoard", "pull", &repo]);
    }
    assert_eq!(nodes.head("node3").0, 3);
    let t0 = std::time::Instant::now();
    let r = nodes.json("node3", &["hoard", "sync", &repo]);
    eprintln!(
        "node 3 caught up from generation 3 to {} (3 generations missed) in {:.2} s, pulling {} B",
        r["generation"],
        t0.elapsed().as_secs_f64(),
        r["bytes"]
    );
    let want = nodes.head("storage");
    assert_eq!(want.0, 6);
    for n in ["node1", "node2", "node3"] {
        assert_eq!(nodes.head(n), want, "{n}");
        let v = nodes.json(n, &["hoard", "verify"]);
        assert_eq!(v["problems"], serde_json::json!([]), "{n}: {v}");
    }

    // A VM boots on node 3 from its hoard: 0 B read from the base.
    let inst = dir.join("vm.qcow2");
    nodes.ok("node3", &["chain", "hoard:img5", "-o", ps(&inst)]);
    let before = base_reads(&log);
    std::env::set_var("VMICACHE_ALLOW_BACKING", &nodes.allow);
    std::env::set_var("VMICACHE_HOARD", dir.join("node3"));
    boot_served(&dir, &inst);
    assert_eq!(
        base_reads(&log) - before,
        0,
        "the boot on node 3 read from the base"
    );

    // Streams: node 4 takes a full stream through a pipe, then refuses one that does not
    // start at its generation, then takes the right one.
    nodes.ok(
        "storage",
        &[
            "hoard",
            "send",
            "--from",
            "5",
            "-o",
            ps(&dir.join("5-6.stream")),
        ],
    );
    let o = nodes.on("node4", &["hoard", "receive", ps(&dir.join("5-6.stream"))]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("from generation 5"),
        "{err}"
    );
    let node = |n: &str| {
        let mut c = bin();
        c.env("VMICACHE_HOARD", dir.join(n))
            .env("VMICACHE_CONFIG", dir.join("none.yaml"));
        c
    };
    let mut send = node("node1");
    send.args(["hoard", "send"]);
    let mut recv = node("node4");
    recv.args(["hoard", "receive", "-"]);
    piped(&mut send, &mut recv);
    assert_eq!(nodes.head("node4"), want);
    eprintln!("logical sizes of the first registrations: {sizes:?}");
}
