//! Servers: detached `vmicache serve` daemons with a pid file and a log file.

use super::confine::{exists, remove_regular};
use super::log::{open_append, HookLog};
use super::plan::DiskPlan;
use crate::chain::build::cache_meta;
use crate::config::Config;
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheState;
use crate::{Error, Result};
use std::fs::OpenOptions as FsOpen;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pid of the live server for this disk, from its pid file (a pid whose process is not a
/// `vmicache serve` on this socket is stale).
pub(super) fn running(p: &DiskPlan) -> Result<Option<i32>> {
    let mut s = String::new();
    match FsOpen::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&p.pid)
    {
        Ok(mut f) => {
            f.read_to_string(&mut s)
                .map_err(|e| Error::io(&p.pid, "read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p.pid, "open", e)),
    }
    let Ok(pid) = s.trim().parse::<i32>() else {
        return Ok(None);
    };
    if pid <= 1 || !alive(pid) {
        return Ok(None);
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let sock = p
        .socket
        .as_ref()
        .map(|s| s.as_os_str().as_encoded_bytes())
        .unwrap_or_default();
    let ours = args.contains(&&b"serve"[..]) && args.contains(&sock);
    Ok(ours.then_some(pid))
}

/// A process that exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Seal the disk's cache if its server was recording (a cache still warming, recording on).
pub(super) fn seal_after_recording(p: &DiskPlan, log: &HookLog) -> Result<()> {
    let (Ok(img), Some(cache)) = (p.image(), p.cache.as_ref()) else {
        return Ok(());
    };
    if !img.settings.record || !exists(cache) {
        return Ok(());
    }
    let state = {
        let c = Image::open(cache, &OpenOptions::read_only())?;
        cache_meta(&c)?.map(|m| m.state)
    };
    if state == Some(CacheState::Warming) {
        match crate::chain::warm::seal(cache) {
            Ok(()) => log.line(&format!("{}: sealed cache {}", p.dev, cache.display())),
            // Another domain's server is still filling it; its release seals it.
            Err(Error::Locked { .. }) => log.line(&format!(
                "{}: cache {} still being filled by another server; not sealed yet",
                p.dev,
                cache.display()
            )),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Stop this disk's server if one runs (SIGTERM; SIGKILL after 10 s), remove its pid file.
pub(super) fn stop_server(p: &DiskPlan, log: &HookLog) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if let Some(pid) = running(p)? {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            log.line(&format!("{}: server {pid} ignored SIGTERM; killed", p.dev));
        } else {
            log.line(&format!("{}: stopped server {pid}", p.dev));
        }
    }
    remove_regular(&p.pid)
}

/// The last non-empty line of a server's log (why it stopped).
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim()
        .trim_start_matches("vmicache: ")
        .to_string()
}

/// Start `vmicache serve` for this disk as a detached daemon, write its pid file, wait until
/// the socket accepts, and give the socket its configured owner, group and mode.
pub(super) fn start_server(
    cfg: &Config,
    p: &DiskPlan,
    record: Option<&Path>,
    log: &HookLog,
) -> Result<()> {
    let sock = p.socket.as_ref().expect("NBD disks have a socket");
    if UnixStream::connect(sock).is_ok() {
        return Err(Error::request(
            sock,
            "refused: another process is already listening on this socket",
        ));
    }
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", "resolve", e))?;
    let out = open_append(&p.log, 0o640)?;
    let err = out.try_clone().map_err(|e| Error::io(&p.log, "dup", e))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg(&p.instance)
        .arg("--socket")
        .arg(sock)
        .arg("--pass-through-if-busy");
    if !p.export.is_empty() {
        // An empty export name (no name= in the XML) reaches the only export anyway.
        cmd.arg("--export").arg(&p.export);
    }
    if let Some(t) = record {
        cmd.arg("--record").arg(t);
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{signal, SigHandler, Signal};
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // The socket is created 0600; the hook then applies the configured mode.
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            for s in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGPIPE,
            ] {
                let _ = signal(s, SigHandler::SigDfl);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(&exe, "start vmicache serve", e))?;
    let pid = child.id();
    let write_pid = || -> Result<()> {
        remove_regular(&p.pid)?;
        let mut f = FsOpen::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&p.pid)
            .map_err(|e| Error::io(&p.pid, "create", e))?;
        writeln!(f, "{pid}").map_err(|e| Error::io(&p.pid, "write", e))
    };
    let fail = |child: &mut std::process::Child, e: Error| {
        let _ = child.kill();
        let _ = child.wait();
        let _ = remove_regular(&p.pid);
        e
    };
    if let Err(e) = write_pid() {
        return Err(fail(&mut child, e));
    }
    let t0 = Instant::now();
    let limit = Duration::from_secs(cfg.start_timeout.0);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let _ = remove_regular(&p.pid);
            return Err(Error::request(
                sock,
                format!(
                    "vmicache serve exited ({st}): {} (log: {})",
                    last_line(&p.log),
                    p.log.display()
                ),
            ));
        }
        if std::fs::symlink_metadata(sock)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
            && UnixStream::connect(sock).is_ok()
        {
            break;
        }
        if t0.elapsed() > limit {
            return Err(fail(
                &mut child,
                Error::request(
                    sock,
                    format!(
                        "vmicache serve did not accept within {} s (log: {})",
                        limit.as_secs(),
                        p.log.display()
                    ),
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Err(e) = socket_access(cfg, sock) {
        return Err(fail(&mut child, e));
    }
    log.line(&format!(
        "{}: started server {pid}: {} on {}{}",
        p.dev,
        p.instance.display(),
        sock.display(),
        record
            .map(|t| format!(", recording {}", t.display()))
            .unwrap_or_default()
    ));
    Ok(())
}

/// Give a fresh socket its configured owner, group and mode.
fn socket_access(cfg: &Config, sock: &Path) -> Result<()> {
    let (uid, gid) = cfg.socket.ids()?;
    let m = std::fs::symlink_metadata(sock).map_err(|e| Error::io(sock, "stat", e))?;
    if !m.file_type().is_socket() {
        return Err(Error::request(sock, "refused: not a socket"));
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(sock, uid, gid).map_err(|e| Error::io(sock, "chown", e))?;
    }
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(cfg.socket.mode.0))
        .map_err(|e| Error::io(sock, "chmod", e))
}
