//! A hoarded node (`dirs.hoard`): `prepare` takes the base's cache from the local hoard (no
//! first boot here), and builds one as before when the hoard holds none.

use super::*;

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
    let v = |args: &[&str]| {
        let o = bin()
            .env("VMICACHE_CONFIG", h.p("config.yaml"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
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
