//! Image locking that QEMU respects, and that respects QEMU.
//!
//! QEMU's file driver (block/file-posix.c, `raw_apply_lock_bytes`) takes shared OFD byte-range
//! locks: byte `100 + i` for each permission `i` it holds, byte `200 + i` for each permission it
//! does not share with others. Permission bits: 0 consistent read, 1 write, 2 write unchanged,
//! 3 resize. Having taken them, it probes the opposite bytes for locks held by others. We do the
//! same, so `qemu-io` opening a cache we serve for writing is refused by QEMU itself, and we
//! refuse a cache QEMU holds open for writing.

use crate::{Error, Result};
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use std::fs::File;
use std::path::Path;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;
const ALL: u32 = READ | WRITE | WRITE_UNCHANGED | RESIZE;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// How an image is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read; others may read but not write (a base under its cache).
    Read,
    /// Read and write; others may only read (a cache being filled, an instance in use).
    Write,
}

impl LockMode {
    fn perms(self) -> (u32, u32) {
        match self {
            LockMode::Read => (READ, ALL & !WRITE),
            LockMode::Write => (ALL, READ | WRITE_UNCHANGED),
        }
    }
}

fn flock(ty: libc::c_short, start: i64) -> libc::flock {
    // SAFETY: libc::flock is a plain C struct for which all-zero bytes are a valid value.
    let mut f: libc::flock = unsafe { std::mem::zeroed() };
    f.l_type = ty;
    f.l_whence = libc::SEEK_SET as libc::c_short;
    f.l_start = start;
    f.l_len = 1;
    f
}

fn held_by_other(file: &File, byte: i64) -> nix::Result<bool> {
    let mut f = flock(libc::F_WRLCK as libc::c_short, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut f))?;
    Ok(f.l_type != libc::F_UNLCK as libc::c_short)
}

fn set(file: &File, ty: libc::c_int, byte: i64) -> nix::Result<()> {
    let f = flock(ty as libc::c_short, byte);
    fcntl(file, FcntlArg::F_OFD_SETLK(&f)).map(|_| ())
}

/// Lock `file` (at `path`) for `mode`, or say who is in the way.
///
/// As QEMU does, the lock bytes are taken first and the other side's bytes checked after, so
/// that of a QEMU and a vmicache racing for the same image at least one sees the other. A
/// writer (the only kind that must win alone) does the whole step under an exclusive
/// `flock(2)` of the file, which QEMU's byte-range locks do not see, so that exactly one of
/// racing vmicache writers succeeds. The flock is only tried for a few seconds (on NFS it is a
/// byte-range lock of the whole file, which QEMU's locks hold off): then the image counts as
/// locked; where the file system has no flock, writers go on without it. A refusal leaves
/// no lock behind.
///
/// `file` must be a freshly opened file holding no locks (byte-range locks of one open file
/// description do not stack: a second call on it would change what the first one took).
pub fn lock(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let mutex = match mode {
        LockMode::Write => writers_mutex(file, path)?,
        LockMode::Read => None,
    };
    let mut taken = Vec::new();
    let r = lock_and_check(file, path, mode, &mut taken);
    if r.is_err() {
        for byte in taken {
            let _ = set(file, libc::F_UNLCK, byte);
        }
    }
    drop(mutex);
    r
}

/// The exclusive flock that serializes vmicache writers locking `file`; None where the file
/// system has no flock.
fn writers_mutex(file: &File, path: &Path) -> Result<Option<nix::fcntl::Flock<File>>> {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // A duplicate descriptor shares the open file description, which flock(2) locks.
    let mut dup = file.try_clone().map_err(|e| Error::io(path, "lock", e))?;
    loop {
        match Flock::lock(dup, FlockArg::LockExclusiveNonblock) {
            Ok(f) => return Ok(Some(f)),
            Err((f, Errno::EINTR)) => dup = f,
            Err((_, Errno::ENOLCK | Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL)) => {
                return Ok(None)
            }
            Err((f, Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                dup = f;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(Error::Locked {
                    path: path.into(),
                    what: "image is locked by another process".into(),
                })
            }
            Err((_, e)) => return Err(Error::io(path, "lock", e.into())),
        }
    }
}

/// Takes the lock bytes of `mode` (noting each in `taken`), then checks the other side's.
fn lock_and_check(file: &File, path: &Path, mode: LockMode, taken: &mut Vec<i64>) -> Result<()> {
    let (held, shared) = mode.perms();
    let unshared = ALL & !shared;
    let err = |e: nix::errno::Errno| Error::io(path, "lock", e.into());
    for i in 0..4 {
        let bit = 1 << i;
        for (set_bits, base) in [(held, PERM_BASE), (unshared, SHARED_BASE)] {
            if set_bits & bit != 0 {
                let byte = base + i64::from(i);
                set(file, libc::F_RDLCK, byte).map_err(|e| {
                    if e == nix::errno::Errno::EAGAIN || e == nix::errno::Errno::EACCES {
                        Error::Locked {
                            path: path.into(),
                            what: "image is locked by another process".into(),
                        }
                    } else {
                        err(e)
                    }
                })?;
                taken.push(byte);
            }
        }
    }
    for i in 0..4 {
        let bit = 1 << i;
        if held & bit != 0 && held_by_other(file, SHARED_BASE + i64::from(i)).map_err(err)? {
            return Err(Error::Locked {
                path: path.into(),
                what: format!(
                    "failed to get \"{}\" lock: another process (a QEMU or vmicache) uses the image and does not share it",
                    NAMES[i as usize]
                ),
            });
        }
        if unshared & bit != 0 && held_by_other(file, PERM_BASE + i64::from(i)).map_err(err)? {
            return Err(Error::Locked {
                path: path.into(),
                what: format!(
                    "failed to get shared \"{}\" lock: another process (a QEMU or vmicache) has the image open with that permission",
                    NAMES[i as usize]
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers racing for one image (separate open file descriptions, as separate processes
    /// have): exactly one wins each round, and the losers leave no lock behind.
    #[test]
    fn racing_writers_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"x").unwrap();
        for _ in 0..100 {
            let files: Vec<File> = (0..6)
                .map(|_| File::options().read(true).write(true).open(&path).unwrap())
                .collect();
            let barrier = std::sync::Barrier::new(files.len());
            let wins: Vec<bool> = std::thread::scope(|s| {
                let hs: Vec<_> = files
                    .iter()
                    .map(|f| {
                        let b = &barrier;
                        let p = &path;
                        s.spawn(move || {
                            b.wait();
                            lock(f, p, LockMode::Write).is_ok()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(wins.iter().filter(|&&w| w).count(), 1, "{wins:?}");
            // The winner gone, a new writer gets the image: the losers hold nothing.
            let winner = wins.iter().position(|&w| w).unwrap();
            let mut files = files;
            files.remove(winner);
            let late = File::options().read(true).write(true).open(&path).unwrap();
            lock(&late, &path, LockMode::Write).unwrap();
        }
    }
}
