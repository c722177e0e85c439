//! The processes pid files name. A pid alone is not an identity (pids are recycled, and any
//! process can carry arguments that look like a server's): a pid file records the process's
//! start time (`/proc/PID/stat` field 22) and executable, both are checked before any
//! signal, and the signal goes through a pidfd, so it can only reach the process checked.

use nix::libc;
use nix::sys::signal::Signal;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A process as a pid file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ProcId {
    pub pid: i32,
    /// Clock ticks after boot (`/proc/PID/stat` field 22).
    pub start: u64,
    /// `/proc/PID/exe`, without the ` (deleted)` the kernel adds once the binary was replaced
    /// (an upgrade must not orphan running servers).
    pub exe: PathBuf,
}

/// The start time and run state of `pid` from `/proc/PID/stat`.
fn stat(pid: i32) -> Option<(u64, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
    let rest = s.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let start = f.nth(18)?.parse().ok()?;
    Some((start, state))
}

fn exe(pid: i32) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    Some(match p.as_os_str().as_bytes().strip_suffix(b" (deleted)") {
        Some(cut) => PathBuf::from(OsStr::from_bytes(cut)),
        None => p,
    })
}

impl ProcId {
    /// The identity of `pid` now, if it is a live (not zombie) process.
    pub fn of(pid: i32) -> Option<ProcId> {
        if pid <= 1 {
            return None;
        }
        let (start, state) = stat(pid)?;
        if matches!(state, 'Z' | 'X' | 'x') {
            return None;
        }
        Some(ProcId {
            pid,
            start,
            exe: exe(pid)?,
        })
    }

    /// The pid file's text: the pid on the first line (so `head -1` still gives it), then
    /// `start=` and `exe=`.
    pub fn record(&self) -> String {
        format!(
            "{}\nstart={}\nexe={}\n",
            self.pid,
            self.start,
            self.exe.display()
        )
    }

    /// A pid file's text: the pid, and the identity if the file records one (files written
    /// before start times were recorded give `Err(pid)`).
    pub fn parse(s: &str) -> Option<std::result::Result<ProcId, i32>> {
        let mut lines = s.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        let (mut start, mut exe) = (None, None);
        for l in lines {
            if let Some(v) = l.strip_prefix("start=") {
                start = v.trim().parse().ok();
            } else if let Some(v) = l.strip_prefix("exe=") {
                exe = Some(PathBuf::from(v));
            }
        }
        Some(match (start, exe) {
            (Some(start), Some(exe)) => Ok(ProcId { pid, start, exe }),
            _ => Err(pid),
        })
    }

    /// Why the live process `self.pid` is not the one recorded, if it is not.
    pub fn mismatch(&self) -> Option<String> {
        let Some(now) = ProcId::of(self.pid) else {
            return Some("not running".into());
        };
        if now.start != self.start {
            return Some(format!(
                "started at tick {}, the recorded server at {}",
                now.start, self.start
            ));
        }
        if now.exe != self.exe {
            return Some(format!("runs {}", now.exe.display()));
        }
        None
    }

    /// The recorded process has exited (or is a zombie): its pid is gone or names a process
    /// started at another time.
    pub fn gone(&self) -> bool {
        match stat(self.pid) {
            None => true,
            Some((start, state)) => start != self.start || matches!(state, 'Z' | 'X' | 'x'),
        }
    }

    /// Wait at most `limit` for the process to be gone; true if it is.
    pub fn wait_gone(&self, limit: Duration) -> bool {
        let t0 = Instant::now();
        while !self.gone() {
            if t0.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// A handle on one process that signals only it, however its pid is reused later.
pub(super) struct Handle {
    pid: i32,
    fd: Option<OwnedFd>,
}

impl Handle {
    /// Open a handle on `id`'s process and check, after opening it, that `id` still
    /// describes the process (a handle opened on an earlier holder of the pid refers to a
    /// process that has exited, and its signals fail). `Err(why)` if it does not.
    pub fn open(id: &ProcId) -> std::result::Result<Handle, String> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, id.pid, 0) };
        let fd = if r >= 0 {
            // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
            Some(unsafe { OwnedFd::from_raw_fd(r as i32) })
        } else {
            match std::io::Error::last_os_error().raw_os_error() {
                // Kernels before 5.3: identity checked just before kill(2) instead.
                Some(libc::ENOSYS) => None,
                _ => return Err("not running".into()),
            }
        };
        if let Some(why) = id.mismatch() {
            return Err(why);
        }
        Ok(Handle { pid: id.pid, fd })
    }

    /// Send `sig`; an error if the process has exited.
    pub fn signal(&self, sig: Signal) -> std::io::Result<()> {
        match &self.fd {
            Some(fd) => {
                // SAFETY: pidfd_send_signal(2) on a descriptor we own, no siginfo, no flags.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        sig as i32,
                        std::ptr::null::<libc::siginfo_t>(),
                        0u32,
                    )
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            }
            None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig)
                .map_err(std::io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_round_trips_and_detects_changes() {
        let me = ProcId::of(std::process::id() as i32).unwrap();
        assert_eq!(ProcId::parse(&me.record()), Some(Ok(me.clone())));
        assert_eq!(me.mismatch(), None);
        assert!(!me.gone());
        let older = ProcId {
            start: me.start.wrapping_sub(1),
            ..me.clone()
        };
        assert!(older.mismatch().unwrap().contains("started at tick"));
        assert!(older.gone());
        assert!(Handle::open(&older).is_err());
        let other = ProcId {
            exe: "/usr/bin/true".into(),
            ..me.clone()
        };
        assert!(other.mismatch().unwrap().contains("runs"));
        assert!(Handle::open(&me).is_ok());
        assert_eq!(ProcId::parse("123\n"), Some(Err(123)));
        assert_eq!(ProcId::parse("x\n"), None);
        assert_eq!(ProcId::parse(""), None);
    }
}
