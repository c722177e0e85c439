//! Instances belong to their guest (owner records).

use super::*;

/// A host with a persistent image `keep` and an ephemeral image `eph` over one base.
fn two_image_host() -> Host {
    let h = Host::new("");
    let base = h.s("bases/debian.raw");
    h.write_config(&format!(
        "images:\n  keep:\n    base: {base}\n  eph:\n    base: {base}\n    ephemeral: true\n"
    ));
    h
}

fn nbd_io(sock: &str, export: &str, cmd: &str) -> String {
    let o = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd+unix:///{export}?socket={sock}"),
            "-c",
            cmd,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn guests_cannot_touch_each_others_instances() {
    let h = two_image_host();
    // Guest A: a persistent NBD disk with its default instance, its server running, data in it.
    let a_sock = h.s("sockets/A.sock");
    let a_inst = h.s("instances/A.vda.qcow2");
    let a_xml = domain("A", "keep", "", &nbd_disk(&a_sock, "A"));
    h.ok("A", "prepare", "begin", &a_xml);
    let a_pid = h.pid("A.vda").unwrap();
    nbd_io(&a_sock, "A", "write -P 0x42 1M 64k");
    // Guest N: a persistent native disk under a name of its own choosing.
    let n_inst = h.s("instances/n-root.qcow2");
    let n_xml = domain("N", "keep", "", &file_disk(&n_inst));
    h.ok("N", "prepare", "begin", &n_xml);
    let ino = |p: &str| std::fs::metadata(p).unwrap().ino();
    let (a_ino, n_ino) = (ino(&a_inst), ino(&n_inst));

    // Guest B names them in every way: ephemeral or not, NBD instance= or native <source file>.
    let b_sock = h.s("sockets/B.sock");
    let mut cases = Vec::new();
    for (victim, owner) in [(&a_inst, "A"), (&n_inst, "N")] {
        for img in ["eph", "keep"] {
            cases.push((
                format!("{img} nbd instance={victim}"),
                nbd_domain_with_instance("B", img, victim, &b_sock),
                owner,
            ));
            cases.push((
                format!("{img} native {victim}"),
                domain("B", img, "", &file_disk(victim)),
                owner,
            ));
        }
    }
    for (what, xml, owner) in &cases {
        for op in [
            "prepare",
            "release",
            "stopped",
            "reconnect",
            "migrate",
            "restore",
        ] {
            let before = h.snapshot();
            let e = h.fails("B", op, xml);
            assert!(
                e.contains(&format!("belongs to guest '{owner}'")),
                "{what} {op}: {e}"
            );
            assert_eq!(h.snapshot(), before, "{what} {op} changed files");
        }
    }
    // The hook's own files beside an instance are not instances.
    let xml = domain(
        "B",
        "eph",
        "",
        &file_disk(&h.s("instances/.A.vda.qcow2.owner")),
    );
    let e = h.fails("B", "prepare", &xml);
    assert!(e.contains("starts with '.'"), "{e}");

    // A and N are untouched: same files, A's server still serves A's data.
    assert_eq!((ino(&a_inst), ino(&n_inst)), (a_ino, n_ino));
    assert_eq!(h.pid("A.vda"), Some(a_pid));
    assert!(alive(a_pid));
    let out = nbd_io(&a_sock, "A", "read -P 0x42 1M 64k");
    assert!(out.contains("read 65536/65536"), "{out}");
    // Their owners use them as before.
    h.ok("A", "release", "end", &a_xml);
    h.ok("N", "release", "end", &n_xml);
    h.ok("A", "prepare", "begin", &a_xml);
    assert_eq!(ino(&a_inst), a_ino);
    h.ok("A", "release", "end", &a_xml);
}

#[test]
fn instances_without_owner_record_are_adopted_only_by_their_default_guest() {
    // Instances made before owner records existed.
    let h = two_image_host();
    let a_xml = domain("A", "keep", "", &nbd_disk(&h.s("sockets/A.sock"), "A"));
    h.ok("A", "prepare", "begin", &a_xml);
    h.ok("A", "release", "end", &a_xml);
    let n_inst = h.s("instances/n-root.qcow2");
    let n_xml = domain("N", "keep", "", &file_disk(&n_inst));
    h.ok("N", "prepare", "begin", &n_xml);
    h.ok("N", "release", "end", &n_xml);
    let a_owner = h.p("instances/.A.vda.qcow2.owner");
    let n_owner = h.p("instances/.n-root.qcow2.owner");
    assert_eq!(std::fs::read_to_string(&a_owner).unwrap(), "A\n");
    std::fs::remove_file(&a_owner).unwrap();
    std::fs::remove_file(&n_owner).unwrap();

    // Another guest cannot claim either.
    for victim in [h.s("instances/A.vda.qcow2"), n_inst.clone()] {
        let xml = domain("B", "eph", "", &file_disk(&victim));
        let before = h.snapshot();
        let e = h.fails("B", "prepare", &xml);
        assert!(e.contains("has no owner record"), "{e}");
        assert_eq!(h.snapshot(), before);
    }
    // A's default name is A's: adopted at its next prepare.
    h.ok("A", "prepare", "begin", &a_xml);
    assert_eq!(std::fs::read_to_string(&a_owner).unwrap(), "A\n");
    h.ok("A", "release", "end", &a_xml);
    // N's instance has a name of its own: the operator says whose it is.
    let e = h.fails("N", "prepare", &n_xml);
    assert!(e.contains(".n-root.qcow2.owner"), "{e}");
    std::fs::write(&n_owner, "N\n").unwrap();
    h.ok("N", "prepare", "begin", &n_xml);
    h.ok("N", "release", "end", &n_xml);
}
