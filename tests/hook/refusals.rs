//! Refusals: one line, a non-zero exit, nothing changed (paths, symlinks, changed bases,
//! configuration errors, hostile names and backing files).

use super::*;

#[test]
fn refusals_change_nothing() {
    let h = Host::new("");
    let base = h.s("bases/debian.raw");
    let inst = h.s("instances/x.qcow2");
    // Outside of every path the hook creates: a file to protect.
    std::fs::write(h.p("outside/precious"), b"keep").unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing base",
            domain("x", &h.s("bases/nosuch.raw"), "", &file_disk(&inst)),
            "nosuch.raw: base image: No such file",
        ),
        (
            "base outside dirs.bases",
            domain("x", &h.s("outside/precious"), "", &file_disk(&inst)),
            "outside the configured dirs.bases",
        ),
        (
            "instance outside the instances dir",
            domain("x", &base, "", &file_disk(&h.s("outside/x.qcow2"))),
            "outside the configured instances directory",
        ),
        (
            "dot-dot",
            domain(
                "x",
                &base,
                "",
                &file_disk(&h.s("instances/../outside/x.qcow2")),
            ),
            "without '.' or '..'",
        ),
        (
            "socket outside the sockets dir",
            domain("x", &base, "", &nbd_disk(&h.s("instances/x.sock"), "x")),
            "outside the configured sockets directory",
        ),
        (
            "mode contradicts the disk",
            domain("x", &base, " mode=\"nbd\"", &file_disk(&inst)),
            "mode nbd is asked for",
        ),
        (
            "unnamed base",
            domain("x", "debian", "", &file_disk(&inst)),
            "neither an absolute path nor an image named",
        ),
        (
            "raw driver on a file disk",
            domain("x", &base, "", &file_disk(&inst)).replace("type='qcow2'", "type='raw'"),
            "a vmicache instance is qcow2",
        ),
    ];
    for (what, xml, expect) in &cases {
        let before = h.snapshot();
        let e = h.fails("x", "prepare", xml);
        assert!(e.contains(expect), "{what}: {e}");
        assert_eq!(h.snapshot(), before, "{what} changed files");
    }
    // A bad guest name is refused before any path is made from it.
    let xml = domain("x", &base, "", &file_disk(&inst));
    let e = h.fails("../x", "prepare", &xml);
    assert!(e.contains("needs a name of letters"), "{e}");
}

#[test]
fn symlinks_are_refused() {
    let h = Host::new("");
    let base = h.s("bases/debian.raw");
    std::fs::write(h.p("outside/precious"), b"keep").unwrap();
    // The instance's name is a link to a file outside.
    std::os::unix::fs::symlink(h.p("outside/precious"), h.p("instances/evil.qcow2")).unwrap();
    // A directory inside that is a link to a directory outside.
    std::os::unix::fs::symlink(h.p("outside"), h.p("instances/sub")).unwrap();
    // A base that is a link to a file outside the bases directory.
    std::os::unix::fs::symlink(h.p("outside/precious"), h.p("bases/linked.raw")).unwrap();
    // A dangling link where the hook would create a pid file.
    std::os::unix::fs::symlink(h.p("outside/created"), h.p("state/v.vda.pid")).unwrap();
    let before = h.snapshot();
    let xml = domain(
        "w",
        &h.s("bases/linked.raw"),
        "",
        &file_disk(&h.s("instances/w.qcow2")),
    );
    let e = h.fails("w", "prepare", &xml);
    assert!(e.contains("outside the configured dirs.bases"), "{e}");
    assert_eq!(h.snapshot(), before);
    let cases = [
        (
            "v",
            domain("v", &base, "", &file_disk(&h.s("instances/evil.qcow2"))),
            "is a symbolic link",
        ),
        (
            "v",
            domain("v", &base, "", &file_disk(&h.s("instances/sub/x.qcow2"))),
            "outside the configured instances directory",
        ),
        (
            "v",
            domain("v", &base, "", &nbd_disk(&h.s("sockets/v.sock"), "v")),
            "v.vda.pid: refused: is a symbolic link",
        ),
    ];
    for (g, xml, expect) in &cases {
        let before = h.snapshot();
        for op in ["prepare", "release"] {
            let e = h.fails(g, op, xml);
            assert!(e.contains(expect), "{op}: {e}");
        }
        assert_eq!(h.snapshot(), before);
    }
    assert_eq!(std::fs::read(h.p("outside/precious")).unwrap(), b"keep");
    assert!(!h.p("outside/created").exists());
}

#[test]
fn changed_base_refused_or_rebuilt() {
    let h = Host::new("defaults:\n  ephemeral: true\n");
    let base = h.s("bases/debian.raw");
    let xml = domain("c", &base, "", &file_disk(&h.s("instances/c.qcow2")));
    h.ok("c", "prepare", "begin", &xml);
    h.ok("c", "release", "end", &xml);
    // The base grows: the cache no longer matches.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(12 * MIB)
        .unwrap();
    let before = h.snapshot();
    let e = h.fails("c", "prepare", &xml);
    assert!(e.contains("virtual size changed"), "{e}");
    assert!(e.contains("on_base_change: refuse"), "{e}");
    assert_eq!(h.snapshot(), before);
    // With on_base_change: rebuild the cache is built anew over the base as it is.
    h.write_config("defaults:\n  ephemeral: true\non_base_change: rebuild\n");
    h.ok("c", "prepare", "begin", &xml);
    let chain = qemu_img_info(&h.s("instances/c.qcow2"));
    assert_eq!(chain[0]["virtual-size"], 12 * MIB);
    assert_eq!(chain[1]["virtual-size"], 12 * MIB);
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert!(log.contains("rebuilt cache"), "{log}");
    h.ok("c", "release", "end", &xml);
}

#[test]
fn unwritable_directory() {
    let h = Host::new("");
    // The caches directory cannot exist: its parent is a regular file (root ignores modes).
    std::fs::write(h.p("afile"), b"").unwrap();
    let text = h.config_text("").replace(
        &format!("caches: {}", h.s("caches")),
        &format!("caches: {}", h.s("afile/caches")),
    );
    std::fs::write(h.p("config.yaml"), text).unwrap();
    let xml = domain(
        "u",
        &h.s("bases/debian.raw"),
        "",
        &file_disk(&h.s("instances/u.qcow2")),
    );
    let before = h.snapshot();
    let e = h.fails("u", "prepare", &xml);
    assert!(
        e.contains("afile/caches: create directory: Not a directory"),
        "{e}"
    );
    assert_eq!(h.snapshot(), before);
}

#[test]
fn bad_config_names_the_line() {
    let h = Host::new("defaults:\n  qouta: 2G\n");
    let xml = domain(
        "b",
        &h.s("bases/debian.raw"),
        "",
        &file_disk(&h.s("instances/b.qcow2")),
    );
    let before = h.snapshot();
    let e = h.fails("b", "prepare", &xml);
    let want = format!(
        "{}:12:3: defaults: unknown field `qouta`",
        h.s("config.yaml")
    );
    assert!(e.contains(&want), "{e}");
    assert_eq!(h.snapshot(), before);
    // `config check` says the same, and accepts a good file.
    let o = bin()
        .args(["config", "check", "--config", &h.s("config.yaml")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&want));
    h.write_config("defaults:\n  quota: 2G\n  cluster_size: 1M\n");
    let o = bin()
        .args(["config", "check"])
        .env("VMICACHE_CONFIG", h.p("config.yaml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A relative directory, a bad size: the line and column of the value.
    h.write_config("defaults:\n  cluster_size: 3K\n");
    let o = bin()
        .args(["config", "check", "--config", &h.s("config.yaml")])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("config.yaml:12:17: defaults.cluster_size: cluster size 3072"),
        "{e}"
    );
}

#[test]
fn example_config_is_valid() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/libvirt/config.yaml");
    let mut text = std::fs::read_to_string(&p).unwrap();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    if !groups.lines().any(|l| l.starts_with("kvm:")) {
        // Hosts without QEMU's group: check everything else.
        assert!(text.contains("  group: kvm\n"));
        text = text.replace("  group: kvm\n", "  group: \"0\"\n");
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("config.yaml");
    std::fs::write(&copy, text).unwrap();
    let o = bin()
        .args(["config", "check", "--config", copy.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_newline_in_a_path_cannot_forge_a_log_line() {
    let h = Host::new("defaults:\n  ephemeral: true\n");
    let base = h.s("bases/debian.raw");
    let forged = "1700000000 [1] vda: removed ephemeral instance FORGED";
    let inst = format!("{}&#10;{forged}.qcow2", h.s("instances/f"));
    let xmls = [
        nbd_domain_with_instance("f", &base, &inst, &h.s("sockets/f.sock")),
        domain("f", &base, "", &file_disk(&inst)),
    ];
    for xml in &xmls {
        let before = h.snapshot();
        let e = h.fails("f", "prepare", xml);
        assert!(e.contains("control character"), "{e}");
        assert_eq!(h.snapshot(), before);
        h.fails("f", "release", xml);
    }
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap_or_default();
    for l in log.lines() {
        assert!(!l.starts_with("1700000000 [1]"), "forged: {log}");
    }
    assert_eq!(std::fs::read_dir(h.p("instances")).unwrap().count(), 0);
}

/// Run `tools/libvirt/qemu` as libvirt does.
fn hook_script(h: &Host, args: &[&str], xml: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/libvirt/qemu");
    let mut c = Command::new("sh");
    c.arg(script)
        .args(args)
        .env("VMICACHE", env!("CARGO_BIN_EXE_vmicache"))
        .env("VMICACHE_CONFIG", h.p("config.yaml"));
    spawn_fed(c, xml).wait_with_output().unwrap()
}

#[test]
fn guest_names_are_never_options() {
    let h = Host::new("");
    let base = h.s("bases/debian.raw");
    // A guest named like an option is the guest, not an option.
    let g = "--config=/tmp/x";
    let xml = domain(g, &base, "", &file_disk(&h.s("instances/c.qcow2")));
    let o = hook_script(&h, &[g, "prepare", "begin", "-"], &xml);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("domain '--config=/tmp/x'"), "{e}");
    assert!(e.contains("needs a name of letters"), "{e}");
    // `-rf` is a fine name.
    let inst = h.s("instances/-rf.vda.qcow2");
    let xml = domain("-rf", &base, "", &nbd_disk(&h.s("sockets/rf.sock"), "rf"));
    for op in ["prepare", "release"] {
        let o = hook_script(&h, &["-rf", op, "begin", "-"], &xml);
        assert!(
            o.status.success(),
            "{op}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(Path::new(&inst).exists());
    assert_eq!(
        std::fs::read_to_string(h.p("instances/.-rf.vda.qcow2.owner")).unwrap(),
        "-rf\n"
    );
}

/// Issue #9 item 2: a qcow2 base placed in `dirs.bases` whose backing file is a host file
/// outside the configured directories (absolute, through `..`, or through a symlink) is
/// refused at prepare, naming it, and nothing of it reaches a cache or an instance.
#[test]
fn bases_backed_by_host_files_are_refused() {
    let h = Host::new("");
    std::os::unix::fs::symlink("/etc/passwd", h.p("bases/link.raw")).unwrap();
    for (i, name) in [
        "/etc/passwd",
        "../../../../../../../../etc/passwd",
        "link.raw",
    ]
    .iter()
    .enumerate()
    {
        let base = h.s(&format!("bases/evil{i}.qcow2"));
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw"])
            .args([&base, "1M"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        for disk in [
            nbd_disk(&h.s("sockets/e.sock"), "e"),
            file_disk(&h.s(&format!("instances/e{i}.qcow2"))),
        ] {
            let err = h.fails("e", "prepare", &domain("e", &base, "", &disk));
            assert!(
                err.contains("lies outside") && err.contains("/etc/passwd"),
                "{err}"
            );
            // No cache, instance or server came of it (a build lock file may stay).
            for d in ["caches", "instances", "sockets"] {
                for e in std::fs::read_dir(h.p(d)).unwrap() {
                    let n = e.unwrap().file_name().to_string_lossy().to_string();
                    assert!(n.ends_with(".lock"), "{d}/{n} left behind");
                }
            }
            assert!(h.pid("e.vda").is_none());
        }
    }
}
