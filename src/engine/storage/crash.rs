//! [`CrashStorage`]: in-memory storage with a volatile page cache, for crash-ordering tests.
//!
//! Every `write_at`, `set_len` and `sync` is an operation, numbered from 0 in the order it is
//! attempted (reads are not counted). Writes and length changes land in a page cache that
//! reads see at once; only a successful `sync` makes them durable. The image a crash leaves
//! is the last synced state plus any subset of the operations since, applied in order
//! ([`CrashStorage::crash_image`]): none, all, each prefix, or any other choice (a missing
//! barrier shows as a later write that reached the disk without an earlier one).
//!
//! A test may arm one fault at operation `k` ([`CrashStorage::set_fault`]):
//! - [`Fault::Crash`]: operation `k` and every later one fail and are not applied (the
//!   process is gone; what it still tries goes nowhere). [`CrashStorage::power_off`] then
//!   lets a dropped engine's close-time flush succeed without reaching the disk.
//! - [`Fault::Eio`]: operation `k` alone fails with EIO and is not applied; later ones work.
//!   A failed sync leaves the cached operations pending (a transient error; Linux may
//!   instead drop the pages, which a writer can only survive by failing every later flush).

use super::{seek_status, FileStatus, Storage};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// What happens at the armed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// This operation and all later ones fail and are not applied.
    Crash,
    /// This operation alone fails with EIO and is not applied.
    Eio,
}

/// One counted operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Write,
    SetLen,
    Sync,
}

/// A cached, not yet durable change.
#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

impl Pending {
    fn apply(&self, d: &mut Vec<u8>) {
        match self {
            Pending::Write(off, b) => {
                let (off, end) = (*off as usize, *off as usize + b.len());
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[off..end].copy_from_slice(b);
            }
            Pending::SetLen(l) => d.resize(*l as usize, 0),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// What the disk holds: the state at the last successful sync.
    durable: Vec<u8>,
    /// What reads see: `durable` with every pending change applied.
    cache: Vec<u8>,
    pending: Vec<Pending>,
    /// Operations attempted so far (the index of the next one).
    ops: u64,
    /// The kind of every operation attempted, in order.
    log: Vec<OpKind>,
    fault: Option<(u64, Fault)>,
    crashed: bool,
    powered_off: bool,
}

/// In-memory storage that models a volatile page cache and can crash or fail at the k-th
/// write or sync (see the module documentation). Clones share one storage, so a test keeps a
/// handle to what it gave the engine.
#[derive(Debug, Clone)]
pub struct CrashStorage {
    state: Arc<Mutex<State>>,
    path: PathBuf,
}

impl CrashStorage {
    /// A storage whose disk durably holds `data`.
    pub fn new(data: Vec<u8>) -> Self {
        CrashStorage {
            state: Arc::new(Mutex::new(State {
                cache: data.clone(),
                durable: data,
                ..State::default()
            })),
            path: PathBuf::from("<crash-storage>"),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arm `fault` at operation `at` (0-based), replacing any armed one.
    pub fn set_fault(&self, at: u64, fault: Fault) {
        self.st().fault = Some((at, fault));
    }

    /// Operations attempted so far, failed ones included.
    pub fn ops(&self) -> u64 {
        self.st().ops
    }

    /// The kind of every operation attempted so far, in order.
    pub fn op_log(&self) -> Vec<OpKind> {
        self.st().log.clone()
    }

    /// Whether an armed crash has happened.
    pub fn crashed(&self) -> bool {
        self.st().crashed
    }

    /// After a crash: later operations succeed and change nothing (the images a crash leaves
    /// are fixed; an engine dropped now flushes into the void instead of reporting errors).
    pub fn power_off(&self) {
        self.st().powered_off = true;
    }

    /// Changes cached since the last successful sync.
    pub fn pending(&self) -> usize {
        self.st().pending.len()
    }

    /// The disk as of the last successful sync.
    pub fn durable(&self) -> Vec<u8> {
        self.st().durable.clone()
    }

    /// What reads see now: every change applied (the disk after a clean shutdown).
    pub fn current(&self) -> Vec<u8> {
        self.st().cache.clone()
    }

    /// The disk a crash now could leave: the last synced state plus the pending changes `i`
    /// (0-based, in the order they were made) for which `keep(i)` holds, applied in order.
    pub fn crash_image(&self, keep: impl Fn(usize) -> bool) -> Vec<u8> {
        let s = self.st();
        let mut d = s.durable.clone();
        for (i, p) in s.pending.iter().enumerate() {
            if keep(i) {
                p.apply(&mut d);
            }
        }
        d
    }

    /// Count an operation; Ok(true) when it is to be applied, Ok(false) when it is to be
    /// dropped silently (powered off), or the error it fails with.
    fn begin(&self, s: &mut State, kind: OpKind, what: &'static str) -> Result<bool> {
        if s.powered_off {
            return Ok(false);
        }
        let k = s.ops;
        s.ops += 1;
        s.log.push(kind);
        let fail = |e: std::io::Error| Err(Error::io(&self.path, what, e));
        if s.crashed {
            return fail(std::io::Error::other(format!(
                "operation {k} after the simulated crash"
            )));
        }
        match s.fault {
            Some((at, Fault::Crash)) if k >= at => {
                s.crashed = true;
                fail(std::io::Error::other(format!(
                    "simulated crash at operation {k}"
                )))
            }
            Some((at, Fault::Eio)) if k == at => {
                fail(std::io::Error::from_raw_os_error(nix::libc::EIO))
            }
            _ => Ok(true),
        }
    }

    fn change(&self, p: Pending, kind: OpKind, what: &'static str) -> Result<()> {
        let mut s = self.st();
        if self.begin(&mut s, kind, what)? {
            p.apply(&mut s.cache);
            s.pending.push(p);
        }
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> Result<u64> {
        Ok(self.st().cache.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let s = self.st();
        let start = off.min(s.cache.len() as u64) as usize;
        let n = (s.cache.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&s.cache[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.change(Pending::Write(off, buf.to_vec()), OpKind::Write, "write")
    }
    fn sync(&self) -> Result<()> {
        let mut s = self.st();
        if self.begin(&mut s, OpKind::Sync, "fdatasync")? {
            let s = &mut *s;
            for p in s.pending.drain(..) {
                p.apply(&mut s.durable);
            }
        }
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.change(Pending::SetLen(len), OpKind::SetLen, "truncate")
    }
    fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        Ok((off < self.len()?).then_some(off))
    }
    fn seek_hole(&self, _off: u64) -> Result<u64> {
        self.len()
    }
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)> {
        seek_status(self, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_errno(e: &Error) -> Option<i32> {
        match e {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    #[test]
    fn writes_are_volatile_until_synced() {
        let s = CrashStorage::new(vec![1; 8]);
        s.write_at(&[2, 2], 0).unwrap();
        s.write_at(&[3], 10).unwrap();
        let mut b = [0u8; 12];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(
            b,
            [2, 2, 1, 1, 1, 1, 1, 1, 0, 0, 3, 0],
            "reads see the cache"
        );
        assert_eq!(s.durable(), vec![1; 8]);
        assert_eq!(s.pending(), 2);
        assert_eq!(s.crash_image(|_| false), vec![1; 8]);
        assert_eq!(s.crash_image(|i| i == 1), [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 3]);
        assert_eq!(s.crash_image(|_| true), s.current());
        s.sync().unwrap();
        assert_eq!(s.pending(), 0);
        assert_eq!(s.durable(), [2, 2, 1, 1, 1, 1, 1, 1, 0, 0, 3]);
        assert_eq!(s.ops(), 3);
        assert_eq!(s.op_log(), [OpKind::Write, OpKind::Write, OpKind::Sync]);
    }

    #[test]
    fn subsets_apply_in_order() {
        let s = CrashStorage::new(vec![0; 4]);
        s.write_at(&[1, 1], 0).unwrap();
        s.write_at(&[2], 1).unwrap();
        s.set_len(2).unwrap();
        assert_eq!(s.crash_image(|_| true), [1, 2]);
        assert_eq!(s.crash_image(|i| i == 0), [1, 1, 0, 0]);
        assert_eq!(s.crash_image(|i| i != 0), [0, 2]);
        assert_eq!(s.len().unwrap(), 2);
    }

    #[test]
    fn crash_stops_everything_from_k_on() {
        let s = CrashStorage::new(vec![0; 4]);
        s.set_fault(2, Fault::Crash);
        s.write_at(&[1], 0).unwrap();
        s.sync().unwrap();
        assert!(!s.crashed());
        assert!(s.write_at(&[2], 1).is_err());
        assert!(s.crashed());
        assert!(s.sync().is_err());
        assert!(s.set_len(1).is_err());
        assert_eq!(s.ops(), 5);
        assert_eq!(s.current(), [1, 0, 0, 0], "nothing after the crash applied");
        assert_eq!(s.pending(), 0);
        s.power_off();
        s.write_at(&[9], 0).unwrap();
        s.sync().unwrap();
        assert_eq!(
            s.current(),
            [1, 0, 0, 0],
            "powered off: accepted, not applied"
        );
        assert_eq!(s.ops(), 5, "powered off: not counted");
    }

    #[test]
    fn eio_fails_one_operation() {
        let s = CrashStorage::new(vec![0; 2]);
        s.set_fault(1, Fault::Eio);
        s.write_at(&[1], 0).unwrap();
        let e = s.write_at(&[2], 1).unwrap_err();
        assert_eq!(io_errno(&e), Some(nix::libc::EIO));
        s.write_at(&[3], 1).unwrap();
        assert_eq!(s.current(), [1, 3]);
        // A failed sync leaves the changes pending; a later one makes them durable.
        s.set_fault(3, Fault::Eio);
        assert_eq!(io_errno(&s.sync().unwrap_err()), Some(nix::libc::EIO));
        assert_eq!(s.durable(), [0, 0]);
        assert_eq!(s.pending(), 2);
        s.sync().unwrap();
        assert_eq!(s.durable(), [1, 3]);
        assert!(!s.crashed());
    }
}
