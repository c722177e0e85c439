//! A qcow2 image: reads through its mapping, writes with allocation and copy-on-write, and the
//! metadata cache that decides what reaches the disk in which order.
//!
//! Ordering (the crash rules of QEMU's block/qcow2-cluster.c):
//! 1. a new cluster's refcount reaches the disk before any L2/L1 entry that points at it;
//! 2. guest data reaches the disk before the L2 entry that exposes it;
//! 3. an L2 table's contents reach the disk before the L1 entry that points at it;
//! 4. a reference is removed from disk before the refcount that counted it drops.
//!
//! Data is written straight to its (already counted) cluster. L2 tables, L1 entries and refcount
//! blocks are cached; `flush` writes refcount blocks, syncs, writes L2 tables, syncs, writes L1
//! entries, then applies deferred frees. A crash at any point therefore leaves at worst clusters
//! whose refcount is too high (leaks), which `check --repair leaks` reclaims.
//!
//! This is a layer driver ([`Layer`]): it maps and reads its own clusters and knows nothing of
//! its backing file; the chain walker (`crate::engine::image`) reads what is unallocated here
//! from below and hands writes a [`BackingRead`] for copy-on-write.
//!
//! Concurrency: the metadata (header, L1, cached L2 tables, refcounts, deferred frees) sits
//! behind a reader-writer lock. Mapping a read takes it shared when the L2 tables it needs are
//! cached (each hit stamps its table for the LRU), exclusively only to load a table. Data I/O
//! at host offsets found in the L2 tables runs without the lock, under a shared guard of the
//! I/O gate taken before the lock is let go; applying deferred frees takes the gate
//! exclusively, so no cluster is reused while a request still reads or writes it. Writes that
//! allocate follow the fill's protocol: claim the guest clusters, allocate under the lock,
//! write the data unlocked, link under the lock.
//!
//! Files: `mapping.rs` (L1/L2 lookup and decoding, the layer mapping, walks), `read.rs`,
//! `write.rs` (in-place and allocating writes, claims, zeroing), `fill.rs` (storing content
//! read from below into unallocated clusters), `cache.rs` (the L2 cache and its LRU, the flush
//! order, `Drop`), `header.rs` (header and extension I/O, the corrupt bit). Copy-on-read is
//! not here: `crate::engine::cor` filters a chain's reads.

mod cache;
mod fill;
mod header;
mod mapping;
mod read;
mod write;

pub use fill::FillStats;
pub use mapping::AllocStats;

use super::alloc::Refcounts;
use super::header_io::write_header;
use super::layer::{BackingRead, Format, Layer, MapMode, Mapped, Run};
use super::storage::Storage;
use crate::format::header::{ext_kind, incompat, CompressionType, Header};
use crate::format::table;
use crate::format::types::Geometry;
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// All-zero check at memcmp speed.
pub fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; 65536] = [0; 65536];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

pub struct Qcow2 {
    storage: Box<dyn Storage>,
    geo: Geometry,
    v3: bool,
    size: u64,
    compression: CompressionType,
    writable: bool,
    meta: RwLock<Meta>,
    /// Data I/O at host offsets taken from the L2 tables happens without the metadata lock,
    /// under a shared guard of this gate taken while the lock was still held; applying
    /// deferred frees (which lets a host cluster be reused) takes it exclusively. So a request
    /// never reads or writes a cluster that has meanwhile been given to another guest offset.
    /// Rule that keeps it deadlock-free: whoever waits for the gate holds no lock that a
    /// holder of the gate waits for (a holder never waits for the metadata lock).
    gate: RwLock<()>,
    /// Guest clusters an allocating write is working on (allocated, not yet linked): other
    /// writes, zeroing and fills of them wait (`write.rs`).
    claims: Mutex<HashSet<u64>>,
    claimed: Condvar,
    /// LRU clock of the L2 cache: each hit stamps its table with the next tick.
    tick: AtomicU64,
    preallocated: std::sync::OnceLock<bool>,
    /// Corruption was found while writing (a metadata overlap): the corrupt bit is set and
    /// nothing more is written, as QEMU does.
    broken: AtomicBool,
    /// A write or sync of this image failed. What is in memory may be ahead of what reached
    /// the disk in order (a refcount table that grew in memory only; pages a failed fsync
    /// dropped), so nothing more is written: the disk holds a consistent image, at worst
    /// with leaks. Reopening it goes on from there.
    io_failed: AtomicBool,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.storage.path())
            .finish()
    }
}

pub(crate) struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    /// When it was last used ([`Qcow2::tick`]); stamped under the shared lock.
    used: AtomicU64,
}

pub(crate) struct Meta {
    pub(crate) header: Header,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    l2: HashMap<u64, L2Table>,
    /// How many cached L2 tables are dirty (kept, so no request scans the cache).
    l2_dirty: usize,
    pub(crate) rc: Refcounts,
    /// Host clusters whose references were removed in memory; their refcounts drop only after
    /// the removal is on disk.
    pending_free: Vec<u64>,
    /// An L1 entry changed to point at a new L2 table since the last flush.
    new_l2: bool,
}

/// What `open` should allow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Qcow2Open {
    pub write: bool,
}

impl Qcow2 {
    /// Open the image over `storage` (its header already read).
    pub(crate) fn open(
        storage: Box<dyn Storage>,
        header: Header,
        opts: Qcow2Open,
    ) -> Result<Qcow2> {
        let path = storage.path().to_path_buf();
        let geo = header.geometry;
        if opts.write {
            let refuse = |what: &str| {
                Err(Error::unsupported(
                    &path,
                    format!("{what} (opened for writing)"),
                ))
            };
            if header.incompatible & incompat::CORRUPT != 0 {
                return Err(Error::corrupt(
                    &path,
                    "corrupt bit set: cannot be opened for writing (run `qemu-img check -r all`)",
                ));
            }
            if header.incompatible & incompat::DIRTY != 0 {
                return Err(Error::corrupt(
                    &path,
                    "dirty bit set (lazy refcounts not flushed): repair with `qemu-img check -r all` first",
                ));
            }
            if header.nb_snapshots > 0 {
                return refuse("internal snapshots");
            }
            if header.has_extension(ext_kind::BITMAPS) {
                return refuse("persistent dirty bitmaps");
            }
            // Never write through damaged metadata: what `check` calls corrupt is refused.
            super::check::refuse_if_corrupt(&*storage, &header, &path)?;
        }
        let mut l1 = vec![0u8; header.l1_size as usize * 8];
        storage.read_at(&mut l1, header.l1_table_offset)?;
        let l1 = table::decode_table(&l1);
        let rc = Refcounts::load(&*storage, &header)?;
        let mut q = Qcow2 {
            geo,
            v3: header.version >= 3,
            size: header.size,
            compression: header.compression,
            writable: opts.write,
            meta: RwLock::new(Meta {
                header,
                l1,
                l1_dirty: BTreeSet::new(),
                l2: HashMap::new(),
                l2_dirty: 0,
                rc,
                pending_free: Vec::new(),
                new_l2: false,
            }),
            gate: RwLock::new(()),
            claims: Mutex::new(HashSet::new()),
            claimed: Condvar::new(),
            tick: AtomicU64::new(0),
            storage,
            preallocated: std::sync::OnceLock::new(),
            broken: AtomicBool::new(false),
            io_failed: AtomicBool::new(false),
        };
        if opts.write {
            let m = q.meta.get_mut().unwrap_or_else(|p| p.into_inner());
            m.rc.enable_overlap_checks(&*q.storage, &m.header, &m.l1)?;
            // Autoclear bits we do not maintain must be cleared by a writer (spec).
            if m.header.autoclear != 0 {
                m.header.autoclear = 0;
                let h = m.header.clone();
                write_header(&*q.storage, &h)?;
                q.storage.sync()?;
            }
        }
        Ok(q)
    }

    pub fn path(&self) -> &Path {
        self.storage.path()
    }

    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The metadata, exclusively (writes, loading L2 tables, flushes).
    fn lock(&self) -> RwLockWriteGuard<'_, Meta> {
        // A panic while holding the lock is a bug; the data on disk is still ordered.
        self.meta.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The metadata, shared (mapping reads whose L2 tables are cached).
    fn lock_shared(&self) -> std::sync::RwLockReadGuard<'_, Meta> {
        self.meta.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A shared guard of the I/O gate; the metadata guard proves the lock is held.
    fn gate(&self, _held: &Meta) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::corrupt(self.path(), what)
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::out_of_range(
                self.path(),
                format!(
                    "request {off:#x}+{len:#x} beyond the virtual size {:#x}",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn require_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only(self.path(), "image is open read-only"));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.corrupt(
                "image was marked corrupt while writing: no more writes (`qemu-img check -r all` repairs)",
            ));
        }
        if self.io_failed.load(Ordering::SeqCst) {
            return Err(Error::io(
                self.path(),
                "write",
                std::io::Error::other(
                    "an earlier write or sync of this image failed: no more writes until it is reopened",
                ),
            ));
        }
        Ok(())
    }
}

impl Layer for Qcow2 {
    fn path(&self) -> &Path {
        self.storage.path()
    }
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn map(&self, off: u64, len: u64, mode: MapMode) -> Result<Mapped<'_>> {
        self.map_range(off, len, mode)
    }
    fn read_run(&self, dst: &mut [u8], run: &Run) -> Result<()> {
        self.read_mapped(dst, run)
    }
    fn write_at(&self, buf: &[u8], off: u64, below: &dyn BackingRead) -> Result<()> {
        Qcow2::write_at(self, buf, off, below)
    }
    fn write_zeroes(&self, off: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        Qcow2::write_zeroes(self, off, len, below)
    }
    fn flush(&self, durable: bool) -> Result<()> {
        Qcow2::flush(self, durable)
    }
    fn stable(&self) -> bool {
        !self.writable
    }
    fn data_may_be_holes(&self) -> Result<bool> {
        self.metadata_preallocated()
    }
    fn cache_meta(&self) -> Result<Option<crate::format::ext::CacheMeta>> {
        Qcow2::cache_meta(self)
    }
}
