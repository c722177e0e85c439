//! A base reached only when needed: the storage under the base layer of a sealed cache.
//!
//! (The base keeps the size the cache recorded; should the base now be smaller, what lies
//! past its end reads as zeros, as QEMU reads past the end of a backing file.)
//!
//! A sealed cache answers boots without its base, so the base must not be needed to open,
//! inspect or serve it. [`RemoteBase`] stands for the base as a raw layer of the size the cache
//! recorded: nothing is opened or connected until the first read of a range the cache lacks;
//! a read that cannot reach the base fails (EIO over NBD) at once or within the NBD client's
//! timeouts, never hanging; after a failure the base is tried again no sooner than a backoff
//! (doubling from [`RemoteBase::FIRST_BACKOFF`] to [`RemoteBase::MAX_BACKOFF`]), so a base
//! that comes back (an NBD server restarted, a file restored) is used again, and a read error
//! through an open base drops it so that the next try reopens it.

use super::image::{Image, OpenOptions};
use super::storage::{FileStatus, Storage};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The base of a sealed cache, opened on first use and reopened after failures.
#[derive(Debug)]
pub struct RemoteBase {
    /// The base as the cache names it (a path, or an NBD URI).
    name: PathBuf,
    /// Guest size the cache recorded for it.
    size: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: Option<Arc<Image>>,
    /// The last failure: when, why, and how long to wait before trying again.
    failed: Option<(Instant, String, Duration)>,
}

impl RemoteBase {
    pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
    pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

    /// `name` as resolved from the cache's header (confinement already checked).
    pub fn new(name: PathBuf, size: u64) -> RemoteBase {
        RemoteBase {
            name,
            size,
            state: Mutex::new(State::default()),
        }
    }

    /// The base, opening it if it is not open and the backoff allows a try.
    fn get(&self) -> Result<Arc<Image>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(img) = &s.open {
            return Ok(img.clone());
        }
        if let Some((at, why, wait)) = &s.failed {
            if at.elapsed() < *wait {
                return Err(unreachable(&self.name, why));
            }
        }
        match Image::open(&self.name, &OpenOptions::read_only()) {
            Ok(img) => {
                let img = Arc::new(img);
                s.open = Some(img.clone());
                s.failed = None;
                Ok(img)
            }
            Err(e) => {
                let why = e.to_string();
                Self::failed(&mut s, why.clone());
                Err(unreachable(&self.name, &why))
            }
        }
    }

    fn failed(s: &mut State, why: String) {
        let wait = match &s.failed {
            Some((_, _, w)) => (*w * 2).min(Self::MAX_BACKOFF),
            None => Self::FIRST_BACKOFF,
        };
        s.open = None;
        s.failed = Some((Instant::now(), why, wait));
    }

    /// A read through the open base failed: drop it, so the next try reopens (reconnects).
    fn drop_after(&self, e: &Error) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::failed(&mut s, e.to_string());
    }

    /// The base if it is open now (nothing is tried).
    pub fn opened(&self) -> Option<Arc<Image>> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .clone()
    }

    /// The base as the cache names it.
    pub fn name(&self) -> &Path {
        &self.name
    }

    /// Try to reach the base now (for `inspect`): Ok, or why it cannot be reached.
    pub fn probe(&self) -> std::result::Result<Arc<Image>, String> {
        self.get().map_err(|e| match e {
            Error::Io { source, .. } => source.to_string(),
            e => e.to_string(),
        })
    }
}

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many remote bases this thread is reading through at once.
struct Depth;

impl Depth {
    fn enter(name: &Path) -> Result<Depth> {
        let d = DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        let g = Depth;
        if d > 8 {
            return Err(Error::chain(
                name,
                "backing loop: the base's chain leads back through a sealed cache",
            ));
        }
        Ok(g)
    }
}

impl Drop for Depth {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

fn unreachable(name: &Path, why: &str) -> Error {
    Error::io(
        name,
        "base unreachable",
        std::io::Error::other(why.to_string()),
    )
}

impl Storage for RemoteBase {
    fn path(&self) -> &Path {
        &self.name
    }
    fn len(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        // A base whose own chain leads back to this cache would recurse through fresh opens.
        let _depth = Depth::enter(&self.name)?;
        let img = self.get()?;
        // Past the base's end reads as zeros, as past the end of a file.
        let end = self.size.min(img.virtual_size());
        let have = end.saturating_sub(off).min(buf.len() as u64) as usize;
        buf[have..].fill(0);
        if have == 0 {
            return Ok(());
        }
        img.read_at(&mut buf[..have], off)
            .inspect_err(|e| self.drop_after(e))
    }
    fn write_at(&self, _buf: &[u8], _off: u64) -> Result<()> {
        Err(Error::request(&self.name, "a base is never written"))
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(Error::request(&self.name, "a base is never written"))
    }
    fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        Ok((off < self.size).then_some(off))
    }
    fn seek_hole(&self, _off: u64) -> Result<u64> {
        Ok(self.size)
    }
    /// What the base's own metadata says when it is open; data (unknown) otherwise, so that
    /// nothing is taken for zeros that the base was not asked about.
    fn as_remote_base(&self) -> Option<&RemoteBase> {
        Some(self)
    }
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)> {
        if off >= self.size {
            return Ok((FileStatus::Eof, len));
        }
        let len = len.min(self.size - off);
        match self.opened().map(|img| img.chain_status(off, len)) {
            Some(Ok(x)) if x.zero => Ok((FileStatus::Hole, x.length)),
            Some(Ok(x)) => Ok((FileStatus::Data, x.length)),
            _ => Ok((FileStatus::Data, len)),
        }
    }
}
