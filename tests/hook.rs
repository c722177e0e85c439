//! `vmicache hook` driven exactly as libvirt drives `/etc/libvirt/hooks/qemu`: arguments
//! `GUEST OP SUBOP EXTRA`, the domain XML on stdin, a configuration whose directories all lie
//! in a tempdir. Checks the files, sockets and processes that result, and that every refusal
//! is one line, a non-zero exit, and changes nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const MIB: u64 = 1 << 20;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmicache"))
}

/// One host: a tempdir with bases/, the configured directories, and a config file.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new(extra_config: &str) -> Host {
        let h = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        for d in [
            "bases",
            "caches",
            "instances",
            "traces",
            "sockets",
            "state",
            "outside",
        ] {
            std::fs::create_dir(h.p(d)).unwrap();
        }
        make_base(&h.p("bases/debian.raw"), 8 * MIB);
        h.write_config(extra_config);
        h
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.p(rel).to_str().unwrap().to_string()
    }

    fn config_text(&self, extra: &str) -> String {
        let r = self.dir.path().display();
        format!(
            "# vmicache test host\n\
             dirs:\n  bases: [{r}/bases]\n  caches: {r}/caches\n  instances: {r}/instances\n  \
             traces: {r}/traces\n  sockets: {r}/sockets\n  state: {r}/state\n\
             socket:\n  mode: \"0660\"\n{extra}"
        )
    }

    fn write_config(&self, extra: &str) {
        std::fs::write(self.p("config.yaml"), self.config_text(extra)).unwrap();
    }

    /// Start the hook as libvirt does (the domain XML written to its stdin).
    fn spawn_hook(&self, guest: &str, op: &str, subop: &str, xml: &str) -> std::process::Child {
        let mut c = bin();
        c.args(["hook", guest, op, subop, "-"])
            .env("VMICACHE_CONFIG", self.p("config.yaml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(xml.as_bytes())
            .unwrap();
        child
    }

    /// Run the hook as libvirt does.
    fn hook(&self, guest: &str, op: &str, subop: &str, xml: &str) -> Output {
        self.spawn_hook(guest, op, subop, xml)
            .wait_with_output()
            .unwrap()
    }

    fn ok(&self, guest: &str, op: &str, subop: &str, xml: &str) -> Output {
        let o = self.hook(guest, op, subop, xml);
        assert!(
            o.status.success(),
            "hook {guest} {op} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// The hook fails with exactly one line on stderr, which is returned.
    fn fails(&self, guest: &str, op: &str, xml: &str) -> String {
        let o = self.hook(guest, op, "begin", xml);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "expected failure, stderr: {err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
        assert!(err.starts_with("vmicache: "), "{err}");
        err
    }

    /// Every file under the tempdir (the hook's own log excepted) with what can change.
    fn snapshot(&self) -> BTreeMap<PathBuf, (u32, u64, i64, i64)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                }
                if e.file_name() == "hook.log" {
                    continue;
                }
                out.insert(e.path(), (m.mode(), m.len(), m.mtime(), m.mtime_nsec()));
            }
        }
        out
    }

    /// The pid a pid file names (its first line).
    fn pid(&self, stem: &str) -> Option<i32> {
        std::fs::read_to_string(self.p(&format!("state/{stem}.pid")))
            .ok()
            .map(|s| s.lines().next().unwrap_or("").trim().parse().unwrap())
    }
}

impl Drop for Host {
    /// Never leave a server behind, whatever failed.
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.p("state")) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    if let Ok(s) = std::fs::read_to_string(e.path()) {
                        let first = s.lines().next().unwrap_or("");
                        if let Ok(pid) = first.trim().parse::<i32>() {
                            kill(pid, "-9");
                        }
                    }
                }
            }
        }
    }
}

/// A raw base with recognizable data at its start and middle.
fn make_base(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0xab; 65536], 0).unwrap();
    f.write_all_at(b"vmicache-test-pattern", size / 2).unwrap();
}

/// `kill SIG PID` (errors ignored: the process may be gone).
fn kill(pid: i32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn qemu_img_info(target: &str) -> serde_json::Value {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json", "--backing-chain", "-U", target])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-img info {target}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

const NS: &str = "https://vmicache.dev/ns/1";

/// A domain XML as `virsh dumpxml` prints it, with one managed disk (`disk` is the <disk>
/// element) and the usual surroundings (an unmanaged cdrom, libosinfo metadata...).
fn domain(name: &str, base: &str, mode_attr: &str, disk: &str) -> String {
    format!(
        r#"<domain type='qemu' id='7'>
  <name>{name}</name>
  <uuid>6d1c9b0e-5b2f-4c55-9d7e-0f4b3a5e8c21</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <vmicache:disks xmlns:vmicache="{NS}">
      <vmicache:disk dev="vda" base="{base}"{mode_attr}/>
    </vmicache:disks>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <kernel>/var/lib/vmicache/boot/vmlinuz</kernel>
    <cmdline>console=ttyS0 root=/dev/vda</cmdline>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disk}
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='sata' index='0'>
      <alias name='ide'/>
    </controller>
    <serial type='pty'>
      <source path='/dev/pts/3'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <alias name='serial0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+64055:+64055</label>
    <imagelabel>+64055:+64055</imagelabel>
  </seclabel>
</domain>
"#
    )
}

fn nbd_disk(socket: &str, export: &str) -> String {
    format!(
        r#"    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name='{export}' index='2'>
        <host transport='unix' socket='{socket}'/>
      </source>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>"#
    )
}

fn file_disk(path: &str) -> String {
    format!(
        r#"    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>"#
    )
}

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

/// A domain with one NBD disk whose instance is named by `instance=`.
fn nbd_domain_with_instance(name: &str, base: &str, instance: &str, socket: &str) -> String {
    domain(name, base, "", &nbd_disk(socket, name)).replace(
        &format!("base=\"{base}\""),
        &format!("base=\"{base}\" instance=\"{instance}\""),
    )
}

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

/// `/proc/PID/stat` field 22: the process's start time.
fn start_time(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    f[19].parse().unwrap()
}

#[test]
fn pid_files_naming_another_process_are_not_signalled() {
    let h = Host::new("");
    let sock = h.s("sockets/p.sock");
    let xml = domain("p", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "p"));
    h.ok("p", "prepare", "begin", &xml);
    let pid = h.pid("p.vda").unwrap();
    let rec = std::fs::read_to_string(h.p("state/p.vda.pid")).unwrap();
    assert!(rec.contains(&format!("start={}", start_time(pid))), "{rec}");
    h.ok("p", "release", "end", &xml);
    assert!(!alive(pid));

    // An unrelated process whose arguments look like the server's ("serve", the socket): a
    // recycled pid, or a pid file left from an older run.
    // One process (sh waiting in its `read` builtin), so killing it leaves nothing behind.
    let mut decoy = Command::new("sh")
        .args(["-c", "read x", "serve", &sock])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = decoy.id() as i32;
    let d_exe = std::fs::read_link(format!("/proc/{d}/exe")).unwrap();
    let vmicache = std::fs::canonicalize(env!("CARGO_BIN_EXE_vmicache")).unwrap();
    let records = [
        format!("{d}\n"),
        format!("{d}\nstart=1\nexe={}\n", d_exe.display()),
        format!("{d}\nstart={}\nexe={}\n", start_time(d), vmicache.display()),
    ];
    for rec in &records {
        std::fs::write(h.p("state/p.vda.pid"), rec).unwrap();
        h.ok("p", "release", "end", &xml);
        assert!(alive(d), "signalled by release through {rec:?}");
        assert!(!h.p("state/p.vda.pid").exists());
        std::fs::write(h.p("state/p.vda.pid"), rec).unwrap();
        h.ok("p", "prepare", "begin", &xml);
        assert!(alive(d), "signalled by prepare through {rec:?}");
        let server = h.pid("p.vda").unwrap();
        assert_ne!(server, d);
        h.ok("p", "release", "end", &xml);
        assert!(!alive(server));
    }
    let _ = decoy.kill();
    let _ = decoy.wait();
}

#[test]
fn a_server_ignoring_sigterm_is_killed_and_waited_for() {
    let h = Host::new("");
    let sock = h.s("sockets/k.sock");
    let xml = domain("k", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "k"));
    h.ok("k", "prepare", "begin", &xml);
    let pid = h.pid("k.vda").unwrap();
    // A stopped process does not act on SIGTERM; SIGKILL ends it.
    kill(pid, "-STOP");
    let t0 = std::time::Instant::now();
    h.ok("k", "release", "end", &xml);
    assert!(!alive(pid), "release returned while its server still ran");
    assert!(t0.elapsed().as_secs() >= 9, "{:?}", t0.elapsed());
    let log = std::fs::read_to_string(h.p("state/hook.log")).unwrap();
    assert!(log.contains("ignored SIGTERM; killed"), "{log}");
    assert!(!h.p("state/k.vda.pid").exists());
}

/// Run `tools/libvirt/qemu` as libvirt does.
fn hook_script(h: &Host, args: &[&str], xml: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/libvirt/qemu");
    let mut child = Command::new("sh")
        .arg(script)
        .args(args)
        .env("VMICACHE", env!("CARGO_BIN_EXE_vmicache"))
        .env("VMICACHE_CONFIG", h.p("config.yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
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

/// Run the hook with a deadline; None if it did not finish.
fn hook_within(h: &Host, guest: &str, op: &str, xml: &str, secs: u64) -> Option<Output> {
    let mut child = h.spawn_hook(guest, op, "begin", xml);
    let t0 = std::time::Instant::now();
    while t0.elapsed().as_secs() < secs {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn logging_never_stops_the_hook() {
    let h = Host::new("defaults:\n  ephemeral: true\n");
    let sock = h.s("sockets/l.sock");
    let xml = domain("l", &h.s("bases/debian.raw"), "", &nbd_disk(&sock, "l"));
    // hook.log is a FIFO nobody reads: opening it for writing would wait forever.
    let fifo = h.p("state/hook.log");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for op in ["prepare", "release"] {
        let o = hook_within(&h, "l", op, &xml, 20).unwrap_or_else(|| panic!("{op} hung"));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::remove_file(&fifo).unwrap();
    // A full file system (/dev/full) under the hook's log and the server's log; then the
    // server's log removed while it runs: prepare and release still work.
    let full = |p: PathBuf| {
        Command::new("mknod")
            .arg(&p)
            .args(["c", "1", "7"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !(full(h.p("state/hook.log")) && full(h.p("state/l.vda.log"))) {
        eprintln!("mknod not permitted: full-disk case skipped");
        return;
    }
    h.ok("l", "prepare", "begin", &xml);
    let pid = h.pid("l.vda").unwrap();
    h.ok("l", "release", "end", &xml);
    assert!(!alive(pid));
    std::fs::remove_file(h.p("state/l.vda.log")).unwrap();
    h.ok("l", "prepare", "begin", &xml);
    let pid = h.pid("l.vda").unwrap();
    std::fs::remove_file(h.p("state/l.vda.log")).unwrap();
    std::fs::remove_file(h.p("state/hook.log")).unwrap();
    std::fs::create_dir(h.p("state/hook.log")).unwrap();
    h.ok("l", "release", "end", &xml);
    assert!(!alive(pid));
    assert!(!Path::new(&sock).exists());
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
