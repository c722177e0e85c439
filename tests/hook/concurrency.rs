//! Several domains starting at once over one cache.

use super::*;

#[test]
fn concurrent_starts_build_one_cache() {
    let h = Host::new("");
    let base = h.s("bases/debian.raw");
    let xmls: Vec<(String, String)> = (0..6)
        .map(|i| {
            let g = format!("vm{i}");
            let x = domain(
                &g,
                &base,
                "",
                &file_disk(&h.s(&format!("instances/{g}.qcow2"))),
            );
            (g, x)
        })
        .collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = xmls
            .iter()
            .map(|(g, x)| s.spawn(|| h.hook(g, "prepare", "begin", x)))
            .collect();
        for t in hs {
            let o = t.join().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    });
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert_eq!(log.matches("built cache").count(), 1, "{log}");
    let caches: Vec<_> = std::fs::read_dir(h.p("caches"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    for (g, _) in &xmls {
        let chain = qemu_img_info(&h.s(&format!("instances/{g}.qcow2")));
        assert_eq!(
            chain[0]["full-backing-filename"],
            h.s(&format!("caches/{}", caches[0]))
        );
    }
}

#[test]
fn concurrent_nbd_starts_on_a_cold_cache() {
    // Three domains start at once on one cold cache in NBD mode: exactly one server fills
    // (records) the cache, the others pass through to the base; all serve correct data and
    // the cache stays consistent.
    let h = Host::new("defaults:\n  ephemeral: true\n");
    let base = h.s("bases/debian.raw");
    let doms: Vec<(String, String, String)> = (0..3)
        .map(|i| {
            let g = format!("nbd{i}");
            let sock = h.s(&format!("sockets/{g}.sock"));
            let x = domain(&g, &base, " mode=\"nbd\"", &nbd_disk(&sock, &g));
            (g, x, sock)
        })
        .collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = doms
            .iter()
            .map(|(g, x, _)| s.spawn(|| h.hook(g, "prepare", "begin", x)))
            .collect();
        for t in hs {
            let o = t.join().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    });
    let mut filling = 0;
    for (g, _, sock) in &doms {
        let uri = format!("nbd+unix:///{g}?socket={sock}");
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &uri, &base])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{g}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::read_to_string(h.p(&format!("state/{g}.vda.log"))).unwrap_or_default();
        if log.contains("copy-on-read, filling") {
            filling += 1;
        } else {
            assert!(log.contains("pass through"), "{g}: {log}");
        }
    }
    assert_eq!(filling, 1, "exactly one server fills the cache");
    for (g, x, _) in &doms {
        h.ok(g, "release", "end", x);
    }
    let caches: Vec<_> = std::fs::read_dir(h.p("caches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    assert_eq!(caches.len(), 1);
    let out = Command::new("qemu-img")
        .args(["check", caches[0].to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
