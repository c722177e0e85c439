//! Servers: detached `vmicache serve` daemons with a pid file and a log file.

use super::confine::{exists, remove_regular};
use super::log::{open_append, HookLog};
use super::plan::DiskPlan;
use super::proc::{Handle, ProcId};
use crate::chain::build::cache_meta;
use crate::config::Config;
use crate::engine::{Image, OpenOptions};
use crate::format::ext::CacheState;
use crate::{Error, Result};
use nix::sys::signal::Signal;
use std::fs::OpenOptions as FsOpen;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a disk's pid file names.
#[derive(Debug)]
pub(super) enum Server {
    /// No pid file, or its process has exited.
    None,
    /// A live process that is not this disk's server (a recycled pid, a pid file of an older
    /// vmicache that recorded no start time): never signalled.
    Other { pid: i32, why: String },
    /// This disk's server: the recorded start time and executable, `serve` on its socket.
    Ours(ProcId),
}

/// Read this disk's pid file and check the process it names.
pub(super) fn running(p: &DiskPlan) -> Result<Server> {
    let mut s = String::new();
    match FsOpen::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&p.pid)
    {
        Ok(f) => {
            f.take(4096)
                .read_to_string(&mut s)
                .map_err(|e| Error::io(&p.pid, "read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Server::None),
        Err(e) => return Err(Error::io(&p.pid, "open", e)),
    }
    let id = match ProcId::parse(&s) {
        None => return Ok(Server::None),
        Some(Err(pid)) => {
            return Ok(match ProcId::of(pid) {
                None => Server::None,
                Some(_) => Server::Other {
                    pid,
                    why: "the pid file records no start time".into(),
                },
            })
        }
        Some(Ok(id)) => id,
    };
    if id.gone() {
        return Ok(Server::None);
    }
    if let Some(why) = id.mismatch() {
        return Ok(Server::Other { pid: id.pid, why });
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", id.pid)).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let sock = p
        .socket
        .as_ref()
        .map(|s| s.as_os_str().as_encoded_bytes())
        .unwrap_or_default();
    if !(args.contains(&&b"serve"[..]) && args.contains(&sock)) {
        return Ok(Server::Other {
            pid: id.pid,
            why: "not serving this socket".into(),
        });
    }
    Ok(Server::Ours(id))
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

/// How long a server has to stop after SIGTERM, and to be gone after SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Stop this disk's server if one runs and remove its pid file. Only the process the pid
/// file records (start time, executable, arguments) is signalled: SIGTERM, then SIGKILL after
/// 10 s; it is gone when this returns (an error, and the pid file kept, if it outlives
/// SIGKILL by 5 s). Logging plays no part in whether the server stops.
pub(super) fn stop_server(p: &DiskPlan, log: &HookLog) -> Result<()> {
    match running(p)? {
        Server::None => {}
        Server::Other { pid, why } => log.line(&format!(
            "{}: pid file {} names process {pid}, which is not this disk's server ({why}); not signalled",
            p.dev,
            p.pid.display()
        )),
        Server::Ours(id) => stop(p, &id, log)?,
    }
    remove_regular(&p.pid)
}

fn stop(p: &DiskPlan, id: &ProcId, log: &HookLog) -> Result<()> {
    let pid = id.pid;
    let h = match Handle::open(id) {
        Ok(h) => h,
        Err(why) => {
            log.line(&format!("{}: server {pid} not signalled: {why}", p.dev));
            return Ok(());
        }
    };
    if let Err(e) = h.signal(Signal::SIGTERM) {
        if !id.gone() {
            return Err(Error::io(&p.pid, "signal the server", e));
        }
    }
    if id.wait_gone(TERM_GRACE) {
        log.line(&format!("{}: stopped server {pid}", p.dev));
        return Ok(());
    }
    let _ = h.signal(Signal::SIGKILL);
    if id.wait_gone(KILL_WAIT) {
        log.line(&format!("{}: server {pid} ignored SIGTERM; killed", p.dev));
        return Ok(());
    }
    log.line(&format!(
        "{}: server {pid} still runs {} s after SIGKILL",
        p.dev,
        KILL_WAIT.as_secs()
    ));
    Err(Error::refused(
        &p.pid,
        format!(
            "server {pid} still runs {} s after SIGKILL; pid file kept",
            KILL_WAIT.as_secs()
        ),
    ))
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
        return Err(Error::refused(
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
    // The limits of the configuration's `nbd:` section; the server reads the same
    // configuration (its directories are where backing files may lie).
    cmd.args(cfg.nbd.serve_args());
    cmd.env("VMICACHE_CONFIG", &cfg.path);
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
    let fail = |child: &mut std::process::Child, e: Error| {
        let _ = child.kill();
        let _ = child.wait();
        let _ = remove_regular(&p.pid);
        e
    };
    let exited = |st: std::process::ExitStatus| {
        Error::refused(
            sock,
            format!(
                "vmicache serve exited ({st}): {} (log: {})",
                last_line(&p.log),
                p.log.display()
            ),
        )
    };
    // The child has exec'd when spawn returns: its start time and executable are final.
    let Some(id) = ProcId::of(pid as i32) else {
        return Err(match child.try_wait() {
            Ok(Some(st)) => exited(st),
            _ => fail(
                &mut child,
                Error::refused(
                    format!("/proc/{pid}/stat"),
                    "cannot read the server's start time",
                ),
            ),
        });
    };
    let write_pid = || -> Result<()> {
        remove_regular(&p.pid)?;
        let mut f = FsOpen::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&p.pid)
            .map_err(|e| Error::io(&p.pid, "create", e))?;
        f.write_all(id.record().as_bytes())
            .map_err(|e| Error::io(&p.pid, "write", e))
    };
    if let Err(e) = write_pid() {
        return Err(fail(&mut child, e));
    }
    let t0 = Instant::now();
    let limit = Duration::from_secs(cfg.start_timeout.0);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            let _ = remove_regular(&p.pid);
            return Err(exited(st));
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
                Error::refused(
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
        return Err(Error::refused(sock, "refused: not a socket"));
    }
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(sock, uid, gid).map_err(|e| Error::io(sock, "chown", e))?;
    }
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(cfg.socket.mode.0))
        .map_err(|e| Error::io(sock, "chmod", e))
}

/// At `reconnect` (libvirtd started again: this node may have been away): when it has a hoard
/// and a registry, start `vmicache hoard sync` detached, its output in
/// `STATE/hoard-sync.log`. The hook does not wait for it; syncs run one at a time (a second
/// exits at once), so the reconnect of every domain may start one.
pub(super) fn start_hoard_sync(cfg: &Config, log: &HookLog) {
    if cfg.dirs.hoard.is_none() || cfg.registry.is_none() {
        return;
    }
    let out_path = cfg.dirs.state.0.join("hoard-sync.log");
    let started = (|| -> Result<u32> {
        let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", "resolve", e))?;
        let out = open_append(&out_path, 0o640)?;
        let err = out
            .try_clone()
            .map_err(|e| Error::io(&out_path, "dup", e))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["hoard", "sync", "--retry-for", "300", "-q"])
            .env("VMICACHE_CONFIG", &cfg.path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                // The hoard's files readable as a sync run by hand makes them (the hook
                // itself runs with umask 077).
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(&exe, "start vmicache hoard sync", e))?;
        Ok(child.id())
    })();
    match started {
        Ok(pid) => log.line(&format!(
            "started hoard sync (pid {pid}; log {})",
            out_path.display()
        )),
        Err(e) => log.line(&format!("could not start hoard sync: {e}")),
    }
}
