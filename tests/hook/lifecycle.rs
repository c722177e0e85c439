//! Prepare, start, reconnect and release in both modes; migrate and restore; sealed caches.

use super::*;

#[test]
fn nbd_prepare_release() {
    let h = Host::new("defaults:\n  ephemeral: true\n");
    let sock = h.s("sockets/web1.sock");
    let xml = domain(
        "web1",
        &h.s("bases/debian.raw"),
        " mode=\"nbd\"",
        &nbd_disk(&sock, "web1"),
    );
    let o = h.ok("web1", "prepare", "begin", &xml);
    assert!(o.stdout.is_empty(), "prepare prints nothing on stdout");
    h.ok("web1", "start", "begin", &xml);
    h.ok("web1", "started", "begin", &xml);

    // One cache, named after the base, over the base; the instance over the cache.
    let caches: Vec<_> = std::fs::read_dir(h.p("caches"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    assert!(caches[0].starts_with("debian.raw-"), "{caches:?}");
    let inst = h.s("instances/web1.vda.qcow2");
    let chain = qemu_img_info(&inst);
    assert_eq!(chain[0]["format"], "qcow2");
    assert_eq!(chain[0]["virtual-size"], 8 * MIB);
    assert_eq!(
        chain[0]["full-backing-filename"],
        h.s(&format!("caches/{}", caches[0]))
    );
    assert_eq!(chain[1]["full-backing-filename"], h.s("bases/debian.raw"));
    assert_eq!(chain[2]["format"], "raw");

    // The server: a live detached process named in the pid file, a socket of mode 0660.
    let pid = h.pid("web1.vda").expect("pid file");
    assert!(alive(pid));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("serve"));
    let sid = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = sid.rsplit_once(')').unwrap().1.split_whitespace().collect();
    assert_eq!(fields[3], pid.to_string(), "server leads its own session");
    assert_eq!(
        std::fs::metadata(h.p("state/web1.vda.pid")).unwrap().mode() & 0o777,
        0o600
    );
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o660);

    // The export reads as the base through the NBD socket.
    let uri = format!("nbd+unix:///web1?socket={sock}");
    let o = Command::new("nbdinfo").arg(&uri).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("8388608"));
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", &uri])
        .output()
        .unwrap();
    assert!(info.status.success());
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 8 * MIB);
    let out = h.p("outside/read.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &uri, out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(h.p("bases/debian.raw")).unwrap()
    );

    // A second prepare-less reconnect is a no-op while the server runs.
    h.ok("web1", "reconnect", "begin", &xml);
    assert_eq!(h.pid("web1.vda"), Some(pid));

    // Release: server stopped, socket and pid file gone, ephemeral instance removed, trace
    // of the fill written.
    h.ok("web1", "stopped", "end", &xml);
    h.ok("web1", "release", "end", &xml);
    assert!(!alive(pid), "server still running");
    assert!(!h.p("state/web1.vda.pid").exists());
    assert!(!Path::new(&sock).exists());
    assert!(!Path::new(&inst).exists());
    let traces: Vec<_> = std::fs::read_dir(h.p("traces")).unwrap().collect();
    assert_eq!(traces.len(), 1);
    let log = std::fs::read_to_string(h.p("state/web1.vda.log")).unwrap();
    assert!(log.contains("SIGTERM"), "{log}");
    let o = Command::new("qemu-img")
        .args(["check", &h.s(&format!("caches/{}", caches[0]))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    // Release again (libvirt may call stopped and release both, or twice): nothing to do.
    h.ok("web1", "release", "end", &xml);
}

#[test]
fn reconnect_restarts_a_dead_server() {
    let h = Host::new("");
    let sock = h.s("sockets/db.sock");
    let xml = domain("db", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "db"));
    h.ok("db", "prepare", "begin", &xml);
    let pid = h.pid("db.vda").unwrap();
    kill(pid, "-9");
    let t0 = std::time::Instant::now();
    while alive(pid) && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    h.ok("db", "reconnect", "begin", &xml);
    let pid2 = h.pid("db.vda").unwrap();
    assert_ne!(pid, pid2);
    assert!(alive(pid2));
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
    h.ok("db", "release", "end", &xml);
    // Persistent by default: the instance stays for the next start.
    assert!(h.p("instances/db.vda.qcow2").exists());
}

#[test]
fn native_chain_persistent_instance() {
    let h = Host::new("images:\n  debian:\n    base: BASE\n    cluster_size: 128K\n");
    h.write_config(&format!(
        "images:\n  debian:\n    base: {}\n    cluster_size: 128K\n    quota: 4M\n",
        h.s("bases/debian.raw")
    ));
    let inst = h.s("instances/vm2-root.qcow2");
    let xml = domain("vm2", "debian", "", &file_disk(&inst));
    h.ok("vm2", "prepare", "begin", &xml);
    assert!(h.p("caches/debian.qcow2").exists());
    let chain = qemu_img_info(&inst);
    assert_eq!(
        chain[0]["full-backing-filename"],
        h.s("caches/debian.qcow2")
    );
    assert_eq!(chain[1]["cluster-size"], 128 * 1024);
    assert!(h.pid("vm2.vda").is_none(), "no server in native mode");
    // The guest writes; the instance keeps its writes across stop and start.
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", &inst, "-c", "write -P 0x5a 1M 64k"])
        .output()
        .unwrap();
    assert!(o.status.success());
    h.ok("vm2", "release", "end", &xml);
    assert!(Path::new(&inst).exists());
    h.ok("vm2", "prepare", "begin", &xml);
    let o = Command::new("qemu-io")
        .args(["-f", "qcow2", "-r", &inst, "-c", "read -P 0x5a 1M 64k"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("read 65536/65536"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    h.ok("vm2", "release", "end", &xml);
}

#[test]
fn migrate_and_restore_are_filters() {
    let h = Host::new("");
    let xml = domain(
        "mig",
        &h.s("bases/debian.raw"),
        "",
        &nbd_disk(&h.s("sockets/mig.sock"), "mig"),
    );
    let before = h.snapshot();
    for op in ["migrate", "restore"] {
        let o = h.ok("mig", op, "begin", &xml);
        assert_eq!(String::from_utf8(o.stdout).unwrap(), xml, "{op}");
    }
    assert_eq!(h.snapshot(), before);
    // A domain whose managed paths are outside the configured directories cannot migrate.
    let bad = domain(
        "mig",
        &h.s("bases/debian.raw"),
        "",
        &nbd_disk(&h.s("outside/mig.sock"), "mig"),
    );
    let e = h.fails("mig", "migrate", &bad);
    assert!(
        e.contains("outside the configured sockets directory"),
        "{e}"
    );
}

#[test]
fn unmanaged_domains_need_no_config() {
    let h = Host::new("");
    std::fs::write(h.p("config.yaml"), "this: is: broken: yaml").unwrap();
    let xml = "<domain type='kvm'><name>plain</name><devices><disk type='file' device='disk'>\
               <source file='/elsewhere/x.qcow2'/><target dev='vda'/></disk></devices></domain>";
    for op in [
        "prepare",
        "start",
        "started",
        "stopped",
        "release",
        "reconnect",
    ] {
        let o = h.ok("plain", op, "begin", xml);
        assert!(o.stdout.is_empty());
    }
    let o = h.ok("plain", "migrate", "begin", xml);
    assert_eq!(o.stdout, xml.as_bytes());
}

/// The `nbd:` section of the configuration reaches the servers the hook starts, and those
/// servers read the same configuration (VMICACHE_CONFIG), whatever the hook was given.
#[test]
fn nbd_limits_reach_hook_started_servers() {
    let h = Host::new("nbd:\n  max_connections: 3\n  handshake_timeout: 4\n");
    let sock = h.s("sockets/lim.sock");
    let xml = domain(
        "lim",
        &h.s("bases/debian.raw"),
        " mode=\"nbd\"",
        &nbd_disk(&sock, "lim"),
    );
    h.ok("lim", "prepare", "begin", &xml);
    let pid = h.pid("lim.vda").expect("a server");
    let args: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let has = |a: &str, b: &str| args.windows(2).any(|w| w[0] == a && w[1] == b);
    assert!(
        has("--max-connections", "3") && has("--handshake-timeout", "4"),
        "{args:?}"
    );
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let want = format!("VMICACHE_CONFIG={}", h.s("config.yaml"));
    assert!(
        env.split(|&b| b == 0).any(|e| e == want.as_bytes()),
        "the server does not read the hook's configuration"
    );
    h.ok("lim", "release", "end", &xml);
}

/// Issue #11: with its cache sealed, a domain starts although its base is gone (a storage
/// node down), in both modes: prepare compares only what the cache recorded and reads
/// nothing of the base.
#[test]
fn sealed_caches_start_without_their_base() {
    let h = Host::new("");
    h.write_config(&format!(
        "images:\n  debian:\n    base: {}\n",
        h.s("bases/debian.raw")
    ));
    let sock = h.s("sockets/s1.sock");
    let nbd = domain("s1", "debian", " mode=\"nbd\"", &nbd_disk(&sock, "s1"));
    h.ok("s1", "prepare", "begin", &nbd);
    h.ok("s1", "release", "end", &nbd);
    let caches: Vec<PathBuf> = std::fs::read_dir(h.p("caches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    assert_eq!(caches.len(), 1);
    assert!(bin()
        .args(["seal", caches[0].to_str().unwrap(), "-q"])
        .env("VMICACHE_CONFIG", h.p("config.yaml"))
        .status()
        .unwrap()
        .success());
    std::fs::rename(h.p("bases/debian.raw"), h.p("outside/debian.raw")).unwrap();
    h.ok("s1", "prepare", "begin", &nbd);
    h.ok("s1", "release", "end", &nbd);
    let native = domain("s2", "debian", "", &file_disk(&h.s("instances/s2.qcow2")));
    h.ok("s2", "prepare", "begin", &native);
    h.ok("s2", "release", "end", &native);
    // Named by its path rather than by an `images` entry, likewise.
    h.write_config("");
    let by_path = domain(
        "s3",
        &h.s("bases/debian.raw"),
        "",
        &file_disk(&h.s("instances/s3.qcow2")),
    );
    std::fs::rename(h.p("outside/debian.raw"), h.p("bases/debian.raw")).unwrap();
    h.ok("s3", "prepare", "begin", &by_path);
    h.ok("s3", "release", "end", &by_path);
    let caches: Vec<PathBuf> = std::fs::read_dir(h.p("caches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("debian.raw-")
        })
        .collect();
    assert!(bin()
        .args(["seal", caches[0].to_str().unwrap(), "-q"])
        .env("VMICACHE_CONFIG", h.p("config.yaml"))
        .status()
        .unwrap()
        .success());
    std::fs::rename(h.p("bases/debian.raw"), h.p("outside/debian.raw")).unwrap();
    h.ok("s3", "prepare", "begin", &by_path);
    h.ok("s3", "release", "end", &by_path);
    h.write_config(&format!(
        "images:\n  debian:\n    base: {}\n",
        h.s("bases/debian.raw")
    ));
    // The base back as another file with the same content (restored from a backup): its
    // fingerprint decides, and it is accepted.
    std::fs::copy(h.p("outside/debian.raw"), h.p("bases/debian.raw")).unwrap();
    h.ok("s1", "prepare", "begin", &nbd);
    h.ok("s1", "release", "end", &nbd);
    // Rewritten: refused, naming what changed.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(h.p("bases/debian.raw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 0).unwrap();
    drop(f);
    let err = h.fails("s1", "prepare", &nbd);
    assert!(err.contains("fingerprint"), "{err}");
}
