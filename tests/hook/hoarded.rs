//! A hoarded node (`dirs.hoard`): `prepare` takes the base's cache from the local hoard (no
//! first boot here), and builds one as before when the hoard holds none.

use super::*;

/// vmicache with the host's configuration (and `hoard` as VMICACHE_HOARD); it must succeed.
fn vmicache(h: &Host, hoard: Option<&str>, args: &[&str]) {
    let mut c = bin();
    c.env("VMICACHE_CONFIG", h.p("config.yaml"));
    if let Some(d) = hoard {
        c.env("VMICACHE_HOARD", d);
    }
    let o = c.args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn prepare_takes_the_cache_from_the_hoard() {
    let h = Host::new("");
    make_base(&h.p("bases/other.raw"), 8 * MIB);
    let extra = format!(
        "images:\n  debian:\n    base: {}\n  other:\n    base: {}\n",
        h.s("bases/debian.raw"),
        h.s("bases/other.raw")
    );
    let text = h.config_text(&extra).replacen(
        "dirs:\n",
        &format!("dirs:\n  hoard: {}\n", h.s("hoard")),
        1,
    );
    std::fs::write(h.p("config.yaml"), text).unwrap();
    let v = |args: &[&str]| vmicache(&h, None, args);
    // The storage node's work, done here: a sealed cache of debian.raw, hoarded.
    let made = h.s("outside/made.qcow2");
    v(&["build", &h.s("bases/debian.raw"), "-o", &made, "-q"]);
    v(&["warm", &made, "--full", "-q"]);
    v(&["seal", &made, "-q"]);
    v(&["hoard", "init", &h.s("hoard")]);
    v(&["hoard", "add", &made, "--name", "debian-12"]);

    let inst = h.s("instances/vm3.qcow2");
    let xml = domain("vm3", "debian", "", &file_disk(&inst));
    h.ok("vm3", "prepare", "begin", &xml);
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert!(
        log.contains("from the hoard ('debian-12', generation 1)"),
        "{log}"
    );
    let cache = h.s("caches/debian.qcow2");
    let o = Command::new("qemu-img")
        .args(["compare", "-U", &made, &cache])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = bin()
        .env("VMICACHE_CONFIG", h.p("config.yaml"))
        .args(["inspect", "--json", &cache])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["cache"]["state"], "sealed", "{j}");
    assert_eq!(
        qemu_img_info(&inst)[0]["full-backing-filename"],
        cache.as_str()
    );
    h.ok("vm3", "release", "end", &xml);

    // An image the hoard does not hold: built here as before.
    let inst = h.s("instances/vm4.qcow2");
    let xml = domain("vm4", "other", "", &file_disk(&inst));
    h.ok("vm4", "prepare", "begin", &xml);
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert!(log.contains("built cache"), "{log}");
    h.ok("vm4", "release", "end", &xml);
}

#[test]
fn reconnect_starts_a_hoard_sync() {
    let h = Host::new("");
    let reg = super::registry::Registry::start();
    let repo = reg.repo("cloud/hoard");
    // The storage node: a sealed cache of debian.raw, hoarded and pushed.
    let storage = h.s("outside/storage");
    let made = h.s("outside/made.qcow2");
    let v = |args: &[&str]| vmicache(&h, Some(&storage), args);
    v(&["build", &h.s("bases/debian.raw"), "-o", &made, "-q"]);
    v(&["warm", &made, "--full", "-q"]);
    v(&["seal", &made, "-q"]);
    v(&["hoard", "init", &storage]);
    v(&["hoard", "add", &made, "--name", "debian"]);
    v(&["hoard", "push", &repo]);
    // This node: an empty hoard and the registry in its configuration.
    let extra = format!("registry:\n  ref: {repo}\n");
    let text = h.config_text(&extra).replacen(
        "dirs:\n",
        &format!("dirs:\n  hoard: {}\n", h.s("hoard")),
        1,
    );
    std::fs::write(h.p("config.yaml"), text).unwrap();
    let o = bin()
        .env("VMICACHE_CONFIG", h.p("config.yaml"))
        .args(["hoard", "init"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sock = h.s("sockets/vm5.sock");
    let xml = domain(
        "vm5",
        &h.s("bases/debian.raw"),
        " mode=\"nbd\"",
        &nbd_disk(&sock, "vm5"),
    );
    h.ok("vm5", "prepare", "begin", &xml);
    // libvirtd restarted: reconnect starts a sync, which brings the hoard to generation 1.
    h.ok("vm5", "reconnect", "begin", &xml);
    let t0 = std::time::Instant::now();
    while !h.p("hoard/caches/debian.vmh").exists() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "no sync: {}",
            std::fs::read_to_string(h.p("state/hoard-sync.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert!(log.contains("started hoard sync"), "{log}");
    assert!(h.p("hoard/caches/debian.vmh").exists());
    h.ok("vm5", "release", "end", &xml);
}
