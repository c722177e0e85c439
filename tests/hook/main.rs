//! `vmicache hook` driven exactly as libvirt drives `/etc/libvirt/hooks/qemu`: arguments
//! `GUEST OP SUBOP EXTRA`, the domain XML on stdin, a configuration whose directories all lie
//! in a tempdir. Checks the files, sockets and processes that result, and that every refusal
//! is one line, a non-zero exit, and changes nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod concurrency;
mod hoarded;
mod lifecycle;
mod ownership;
mod refusals;
#[path = "../common/registry.rs"]
mod registry;
mod servers;

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
            .env("VMICACHE_CONFIG", self.p("config.yaml"));
        spawn_fed(c, xml)
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

/// A domain with one NBD disk whose instance is named by `instance=`.
fn nbd_domain_with_instance(name: &str, base: &str, instance: &str, socket: &str) -> String {
    domain(name, base, "", &nbd_disk(socket, name)).replace(
        &format!("base=\"{base}\""),
        &format!("base=\"{base}\" instance=\"{instance}\""),
    )
}

/// Start `c` with piped output and `stdin` written to its standard input (then closed), as
/// libvirt starts its hook.
fn spawn_fed(mut c: Command, stdin: &str) -> std::process::Child {
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child
}
