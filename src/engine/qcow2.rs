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
//! Concurrency: the metadata (header, L1, cached L2 tables, refcounts, deferred frees) sits
//! behind one mutex. Data I/O at host offsets found in the L2 tables (reads, in-place writes)
//! runs without it, under a shared guard of the I/O gate taken before the mutex is let go;
//! applying deferred frees takes the gate exclusively, so no cluster is reused while a request
//! still reads or writes it. Allocating writes write and link their new clusters under the
//! mutex; the old content of partial clusters they copy from the backing file is read before.

use super::alloc::Refcounts;
use super::image::Image;
use super::image::ZeroNotes;
use super::overlap::MetaKind;
use super::storage::Storage;
use crate::format::compress;
use crate::format::ext as vext;
use crate::format::header::{self, CompressionType, Header};
use crate::format::table::{self, L1Entry, L2Entry, L2Mapping};
use crate::format::types::{Geometry, GuestOffset, HostOffset};
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

/// Write `len` zero bytes at `off` through `write`, in bounded pieces.
pub(crate) fn write_zero_bytes(
    off: u64,
    len: u64,
    write: impl Fn(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let zeros = vec![0u8; len.min(4 << 20) as usize];
    let mut p = off;
    while p < off + len {
        let n = (off + len - p).min(zeros.len() as u64) as usize;
        write(&zeros[..n], p)?;
        p += n as u64;
    }
    Ok(())
}

/// All-zero check at memcmp speed.
pub fn is_zero(b: &[u8]) -> bool {
    static ZEROS: [u8; 65536] = [0; 65536];
    b.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// Dirty metadata above this many bytes is flushed; clean tables above it are dropped.
const L2_CACHE_BYTES: usize = 32 << 20;

/// Where the bytes of a piece of a guest range come from, at one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Plain data in this file.
    Data(HostOffset),
    /// Zeros, decided at this layer (zero flag).
    Zero,
    /// A compressed cluster: descriptor plus the offset within the cluster.
    Compressed { host: HostOffset, len: u64 },
    /// Not allocated here: ask the backing file.
    Backing,
}

/// Allocation status of a guest range at this layer, for `map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerStatus {
    Unallocated,
    /// Zero flag; `offset` is the preallocated host offset, if any.
    Zero {
        offset: Option<u64>,
    },
    Data {
        offset: u64,
    },
    Compressed,
}

pub struct Qcow2 {
    storage: Box<dyn Storage>,
    geo: Geometry,
    v3: bool,
    size: u64,
    compression: CompressionType,
    writable: bool,
    meta: Mutex<Meta>,
    /// Data I/O at host offsets taken from the L2 tables happens without the metadata lock,
    /// under a shared guard of this gate taken while the lock was still held; applying
    /// deferred frees (which lets a host cluster be reused) takes it exclusively. So a request
    /// never reads or writes a cluster that has meanwhile been given to another guest offset.
    /// Rule that keeps it deadlock-free: the gate is taken shared only under the metadata
    /// lock, and its holder never waits for the metadata lock.
    gate: RwLock<()>,
    backing: Option<Arc<Image>>,
    preallocated: std::sync::OnceLock<bool>,
    cor: std::sync::OnceLock<Cor>,
    /// Corruption was found while writing (a metadata overlap): the corrupt bit is set and
    /// nothing more is written, as QEMU does.
    broken: AtomicBool,
}

/// Copy-on-read counters of a cache layer.
#[derive(Debug, Default)]
pub struct CorStats {
    /// Read requests that reached this layer.
    pub requests: AtomicU64,
    /// Requests served without the base.
    pub hits: AtomicU64,
    /// Requests that needed the base.
    pub misses: AtomicU64,
    /// Bytes read from the base (holes its metadata proves zero are not read).
    pub base_bytes: AtomicU64,
    pub data_clusters: AtomicU64,
    pub zero_clusters: AtomicU64,
}

/// Copy-on-read state: reads of clusters this layer lacks fetch them from the backing file
/// and store them here, exactly once per cluster however many readers race for it.
#[derive(Debug)]
pub struct Cor {
    /// Data clusters still allowed by the quota.
    budget: Mutex<u64>,
    /// Guest clusters being filled right now.
    inflight: Mutex<std::collections::HashSet<u64>>,
    cv: std::sync::Condvar,
    /// Base reads in order, when recording.
    record: Option<Mutex<Vec<(u64, u64)>>>,
    pub stats: CorStats,
}

/// Releases claimed clusters when a fill ends, even by error.
struct Claim<'a> {
    cor: &'a Cor,
    clusters: std::ops::Range<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut g = self.cor.inflight.lock().unwrap_or_else(|p| p.into_inner());
        for c in self.clusters.clone() {
            g.remove(&c);
        }
        drop(g);
        self.cor.cv.notify_all();
    }
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
    /// Parse the header of `storage` (no backing opened yet).
    pub(crate) fn read_header(storage: &dyn Storage) -> Result<Header> {
        let path = storage.path();
        let len = storage.len()?;
        let mut first = vec![0u8; 512];
        storage.read_at(&mut first, 0)?;
        let bits =
            Header::peek_cluster_bits(&first[..len.min(512) as usize]).map_err(|e| e.at(path))?;
        let cs = 1usize << bits;
        let want = cs.min(len as usize);
        let mut b = vec![0u8; want];
        storage.read_at(&mut b, 0)?;
        Header::parse(&b, len).map_err(|e| e.at(path))
    }

    /// Open the image over `storage`; `backing` is the already opened backing image.
    pub(crate) fn open(
        storage: Box<dyn Storage>,
        header: Header,
        backing: Option<Arc<Image>>,
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
            if header.incompatible & header::incompat::CORRUPT != 0 {
                return Err(Error::corrupt(
                    &path,
                    "corrupt bit set: cannot be opened for writing (run `qemu-img check -r all`)",
                ));
            }
            if header.incompatible & header::incompat::DIRTY != 0 {
                return Err(Error::corrupt(
                    &path,
                    "dirty bit set (lazy refcounts not flushed): repair with `qemu-img check -r all` first",
                ));
            }
            if header.nb_snapshots > 0 {
                return refuse("internal snapshots");
            }
            if header.has_extension(header::ext_kind::BITMAPS) {
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
            meta: Mutex::new(Meta {
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
            backing,
            storage,
            preallocated: std::sync::OnceLock::new(),
            cor: std::sync::OnceLock::new(),
            broken: AtomicBool::new(false),
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
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }
    /// The backing image, shareable (several instances over one cache).
    pub fn backing_arc(&self) -> Option<Arc<Image>> {
        self.backing.clone()
    }
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // A panic while holding the lock is a bug; the data on disk is still ordered.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A shared guard of the I/O gate; the metadata guard proves the lock is held.
    fn gate(&self, _held: &mut Meta) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::corrupt(self.path(), what)
    }

    /// Pass `r` on; a corruption found while writing marks the image corrupt first (the
    /// corrupt bit in the header, then no more writes), as QEMU's qcow2_signal_corruption.
    fn signal<T>(&self, r: Result<T>) -> Result<T> {
        // Only this image's own damage: a corrupt backing file is not this image's fault.
        if let Err(Error::Corrupt { what, path }) = &r {
            if path != self.path() {
                return r;
            }
            if !self.broken.swap(true, Ordering::SeqCst) {
                let mut m = self.lock();
                m.header.incompatible |= header::incompat::CORRUPT;
                let h = m.header.clone();
                let marked = write_header(&*self.storage, &h).and_then(|()| self.storage.sync());
                return Err(self.corrupt(match marked {
                    Ok(()) => format!(
                        "{what}; image marked corrupt, no more writes (`qemu-img check -r all` repairs)"
                    ),
                    Err(e) => format!("{what}; marking the image corrupt failed too: {e}"),
                }));
            }
        }
        r
    }

    // ----- mapping -------------------------------------------------------------------------

    /// The L2 entry for a guest cluster, loading its table if needed; None if no L2 table.
    fn entry(&self, m: &mut Meta, g: GuestOffset) -> Result<L2Entry> {
        let l1i = self.geo.l1_index(g) as usize;
        let Some(l2off) = self.l2_offset(m, l1i)? else {
            return Ok(L2Entry::UNALLOCATED);
        };
        let t = self.load_l2(m, l2off)?;
        Ok(L2Entry(t.entries[self.geo.l2_index(g)]))
    }

    fn l2_offset(&self, m: &Meta, l1i: usize) -> Result<Option<u64>> {
        let Some(&e) = m.l1.get(l1i) else {
            return Ok(None);
        };
        let off = L1Entry(e)
            .l2_offset(&self.geo)
            .map_err(|e| e.at(self.path()))?;
        if let Some(o) = off {
            if o.0 == 0 || o.0 >= self.file_bound(m) {
                return Err(self.corrupt(format!(
                    "L1 entry {l1i} points at {:#x}, outside the image",
                    o.0
                )));
            }
        }
        Ok(off.map(|o| o.0))
    }

    /// Host offsets at or past this are outside the image (allowing for our own unflushed
    /// allocations).
    fn file_bound(&self, m: &Meta) -> u64 {
        m.rc.high_water() << self.geo.cluster_bits
    }

    fn load_l2<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut L2Table> {
        use std::collections::hash_map::Entry;
        match m.l2.entry(off) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let mut b = vec![0u8; self.geo.cluster_size() as usize];
                self.storage.read_at(&mut b, off)?;
                Ok(v.insert(L2Table {
                    entries: table::decode_table(&b),
                    dirty: false,
                }))
            }
        }
    }

    fn decode(&self, m: &Meta, e: L2Entry) -> Result<L2Mapping> {
        let map = e
            .mapping(&self.geo, self.v3)
            .map_err(|e| e.at(self.path()))?;
        let bound = self.file_bound(m);
        match map {
            L2Mapping::Data { host, .. }
            | L2Mapping::Zero {
                prealloc: Some(host),
                ..
            } if host.0 >= bound => Err(self.corrupt(format!(
                "data cluster at {:#x} lies past the end of the image",
                host.0
            ))),
            L2Mapping::Compressed { host, .. } if host.0 >= bound => Err(self.corrupt(format!(
                "compressed cluster at {:#x} lies past the end of the image",
                host.0
            ))),
            _ => Ok(map),
        }
    }

    /// Split `[off, off+len)` into runs with one source each (contiguous host data merged).
    fn plan(&self, m: &mut Meta, off: u64, len: u64) -> Result<Vec<(u64, u64, Source)>> {
        let mut out: Vec<(u64, u64, Source)> = Vec::new();
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let inc = self.geo.in_cluster(pos);
            let n = (self.geo.cluster_size() - inc).min(end - pos);
            let e = self.entry(m, GuestOffset(pos))?;
            let src = match self.decode(m, e)? {
                L2Mapping::Unallocated => Source::Backing,
                L2Mapping::Zero { .. } => Source::Zero,
                L2Mapping::Data { host, .. } => Source::Data(HostOffset(host.0 + inc)),
                L2Mapping::Compressed { host, len } => Source::Compressed { host, len },
            };
            if let Some(last) = out.last_mut() {
                let merged = match (last.2, src) {
                    (Source::Data(a), Source::Data(b)) => a.0 + last.1 == b.0,
                    (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
                    _ => false,
                };
                if merged {
                    last.1 += n;
                    pos += n;
                    continue;
                }
            }
            out.push((pos, n, src));
            pos += n;
        }
        Ok(out)
    }

    fn check_range(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::request(
                self.path(),
                format!(
                    "request {off:#x}+{len:#x} beyond the virtual size {:#x}",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    /// Read guest bytes through this layer and its backing chain (filling this layer from
    /// the backing file when copy-on-read is on).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_noting_zeros(buf, off, None)
    }

    /// [`Self::read_at`], also noting in `zeros` the (offset, length) ranges that metadata
    /// proves zero (zero clusters here or below, holes of a raw base), in no particular order;
    /// those ranges of `buf` are then left as they were. What copy-on-read fetches is data,
    /// whatever it holds.
    pub(crate) fn read_noting_zeros(
        &self,
        buf: &mut [u8],
        off: u64,
        mut zeros: ZeroNotes,
    ) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let (plan, gate) = {
            let mut m = self.lock();
            self.maybe_shrink(&mut m)?;
            let plan = self.plan(&mut m, off, buf.len() as u64)?;
            (plan, self.gate(&mut m))
        };
        let cor = self.cor.get();
        if let Some(c) = cor {
            c.stats.requests.fetch_add(1, Ordering::Relaxed);
            let miss = plan.iter().any(|p| p.2 == Source::Backing);
            let counter = if miss { &c.stats.misses } else { &c.stats.hits };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // This layer's own pieces under the gate, then (without it) what comes from below.
        self.read_local(buf, off, &plan, zeros.is_none())?;
        drop(gate);
        for &(pos, n, src) in &plan {
            let dst = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
            match (src, cor) {
                (Source::Backing, Some(c)) => self.cor_read(c, dst, pos)?,
                (Source::Backing, None) => {
                    self.read_backing_noting(dst, pos, zeros.as_deref_mut())?
                }
                (Source::Zero, _) => {
                    if let Some(z) = zeros.as_deref_mut() {
                        z.push((pos, n));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The pieces of `plan` (for `buf` at guest offset `off`) that this layer holds (zero
    /// clusters only with `fill_zeros`); the caller holds the I/O gate.
    fn read_local(
        &self,
        buf: &mut [u8],
        off: u64,
        plan: &[(u64, u64, Source)],
        fill_zeros: bool,
    ) -> Result<()> {
        for &(pos, n, src) in plan {
            if src != Source::Backing && (fill_zeros || src != Source::Zero) {
                let dst = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
                self.read_source(dst, pos, src)?;
            }
        }
        Ok(())
    }

    /// Turn copy-on-read on: reads of clusters missing here fill them from the backing file,
    /// storing at most `quota` bytes of data (0: no limit). `record` keeps the base reads.
    pub fn enable_cor(&self, quota: u64, record: bool) -> Result<()> {
        self.require_writable()?;
        if self.backing.is_none() {
            return Err(Error::request(
                self.path(),
                "copy-on-read needs a backing file",
            ));
        }
        let budget = self.quota_budget(quota)?;
        let cor = Cor {
            budget: Mutex::new(budget),
            inflight: Mutex::new(Default::default()),
            cv: std::sync::Condvar::new(),
            record: record.then(|| Mutex::new(Vec::new())),
            stats: CorStats::default(),
        };
        self.cor
            .set(cor)
            .map_err(|_| Error::request(self.path(), "copy-on-read already on"))
    }

    /// Copy-on-read state, when on.
    pub fn cor(&self) -> Option<&Cor> {
        self.cor.get()
    }

    /// The base reads recorded so far (empty unless recording).
    pub fn take_record(&self) -> Vec<(u64, u64)> {
        self.cor
            .get()
            .and_then(|c| c.record.as_ref())
            .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default()
    }

    /// Data clusters the quota (bytes; 0 = none) still allows this layer to store.
    pub fn quota_budget(&self, quota: u64) -> Result<u64> {
        if quota == 0 {
            return Ok(u64::MAX);
        }
        let have = self.allocated_clusters()?;
        Ok((quota / self.geo.cluster_size()).saturating_sub(have.data + have.compressed))
    }

    /// Fill the clusters of `[off, off+len)` still unallocated here from the backing file:
    /// read what the backing file's metadata does not prove zero, store it (taking data
    /// clusters from `budget`), and hand each run's content to `sink(offset, bytes)`. The
    /// caller keeps others off these clusters (a copy-on-read claim, or the image's write
    /// lock held by one warming process).
    pub fn fill_from_backing(
        &self,
        off: u64,
        len: u64,
        budget: &Mutex<u64>,
        mut sink: impl FnMut(u64, &[u8]),
    ) -> Result<FillFromBacking> {
        let cs = self.geo.cluster_size();
        let backing = self
            .backing
            .as_deref()
            .ok_or_else(|| Error::request(self.path(), "filling needs a backing file"))?;
        let mut out = FillFromBacking::default();
        for (s, n) in self.unallocated_runs(off, len)? {
            let mut buf = vec![0u8; n as usize];
            let mut nonzero = 0;
            for (zs, zn, zero) in backing.zero_runs(s, n)? {
                if !zero {
                    let at = (zs - s) as usize;
                    self.read_backing(&mut buf[at..at + zn as usize], zs)?;
                    out.base_bytes += zn;
                    nonzero += zn;
                }
            }
            let want = if nonzero == 0 { 0 } else { n.div_ceil(cs) };
            let granted = {
                let mut b = budget.lock().unwrap_or_else(|p| p.into_inner());
                let g = want.min(*b);
                *b -= g;
                g
            };
            let f = self.fill(s, &buf, granted);
            let used = f.as_ref().map_or(0, |f| f.data_clusters.min(granted));
            *budget.lock().unwrap_or_else(|p| p.into_inner()) += granted - used;
            let f = f?;
            out.stats.data_clusters += f.data_clusters;
            out.stats.zero_clusters += f.zero_clusters;
            out.stats.over_quota += f.over_quota;
            sink(s, &buf);
        }
        Ok(out)
    }

    /// Read `dst` at `pos` (a run unallocated here when planned) with copy-on-read.
    fn cor_read(&self, cor: &Cor, dst: &mut [u8], pos: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = pos + dst.len() as u64;
        let a = self.geo.align_down(pos);
        let b = self.geo.align_up(end).min(self.size);
        let clusters = a / cs..b.div_ceil(cs);
        {
            let mut g = cor.inflight.lock().unwrap_or_else(|p| p.into_inner());
            while clusters.clone().any(|c| g.contains(&c)) {
                g = cor.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.extend(clusters.clone());
        }
        let _claim = Claim { cor, clusters };
        // Under the claim nobody else changes these clusters: what is unallocated now is ours.
        let mut covered = Vec::new();
        let f = self.fill_from_backing(a, b - a, &cor.budget, |s, buf| {
            if let Some(r) = &cor.record {
                r.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((s, buf.len() as u64));
            }
            let (x, y) = (s.max(pos), (s + buf.len() as u64).min(end));
            if x < y {
                dst[(x - pos) as usize..(y - pos) as usize]
                    .copy_from_slice(&buf[(x - s) as usize..(y - s) as usize]);
                covered.push((x, y));
            }
        })?;
        cor.stats
            .base_bytes
            .fetch_add(f.base_bytes, Ordering::Relaxed);
        cor.stats
            .data_clusters
            .fetch_add(f.stats.data_clusters, Ordering::Relaxed);
        cor.stats
            .zero_clusters
            .fetch_add(f.stats.zero_clusters, Ordering::Relaxed);
        // The rest was filled by others before we claimed it: read it from here.
        let mut p = pos;
        for (x, y) in covered.into_iter().chain(std::iter::once((end, end))) {
            if p < x {
                let (plan, gate) = {
                    let mut m = self.lock();
                    let plan = self.plan(&mut m, p, x - p)?;
                    (plan, self.gate(&mut m))
                };
                let d = &mut dst[(p - pos) as usize..(x - pos) as usize];
                self.read_local(d, p, &plan, true)?;
                drop(gate);
                for (q, n, src) in plan {
                    if src == Source::Backing {
                        let d = &mut dst[(q - pos) as usize..(q - pos + n) as usize];
                        self.read_backing(d, q)?;
                    }
                }
            }
            p = p.max(y);
        }
        Ok(())
    }

    fn read_source(&self, dst: &mut [u8], pos: u64, src: Source) -> Result<()> {
        match src {
            Source::Data(h) => self.storage.read_at(dst, h.0),
            Source::Zero => {
                dst.fill(0);
                Ok(())
            }
            Source::Backing => self.read_backing(dst, pos),
            Source::Compressed { host, len } => {
                let mut c = vec![0u8; self.geo.cluster_size() as usize];
                self.read_compressed(host, len, &mut c)?;
                let inc = self.geo.in_cluster(pos) as usize;
                dst.copy_from_slice(&c[inc..inc + dst.len()]);
                Ok(())
            }
        }
    }

    /// Read from the backing file; past its end (or without one) reads zeros.
    pub fn read_backing(&self, dst: &mut [u8], pos: u64) -> Result<()> {
        self.read_backing_noting(dst, pos, None)
    }

    /// [`Self::read_backing`], noting proven zeros as [`Self::read_noting_zeros`] does.
    fn read_backing_noting(&self, dst: &mut [u8], pos: u64, mut zeros: ZeroNotes) -> Result<()> {
        let have = match &self.backing {
            None => 0,
            Some(b) => {
                let have = b.virtual_size().saturating_sub(pos).min(dst.len() as u64) as usize;
                if have > 0 {
                    b.read_noting_zeros(&mut dst[..have], pos, zeros.as_deref_mut())?;
                }
                have
            }
        };
        match zeros {
            Some(z) if have < dst.len() => z.push((pos + have as u64, (dst.len() - have) as u64)),
            Some(_) => {}
            None => dst[have..].fill(0),
        }
        Ok(())
    }

    fn read_compressed(&self, host: HostOffset, len: u64, out: &mut [u8]) -> Result<()> {
        let mut c = vec![0u8; len as usize];
        self.storage.read_at(&mut c, host.0)?;
        compress::decompress(self.compression, &c, out).map_err(|what| Error::Decompress {
            path: self.path().to_path_buf(),
            offset: host.0,
            what,
        })
    }

    /// Status of the run starting at `off` (at most `len` bytes) at this layer only.
    pub fn block_status(&self, off: u64, len: u64) -> Result<(LayerStatus, u64)> {
        self.check_range(off, len)?;
        let mut m = self.lock();
        self.maybe_shrink(&mut m)?;
        let end = off + len;
        let mut pos = off;
        let mut first: Option<LayerStatus> = None;
        while pos < end {
            // No L2 table: the whole span it would map is unallocated.
            let l1i = self.geo.l1_index(GuestOffset(pos)) as usize;
            if self.l2_offset(&m, l1i)?.is_none() {
                if first.is_some_and(|f| f != LayerStatus::Unallocated) {
                    break;
                }
                first = Some(LayerStatus::Unallocated);
                let span = self.geo.l2_span();
                pos = ((pos / span + 1) * span).min(end);
                continue;
            }
            let inc = self.geo.in_cluster(pos);
            let n = (self.geo.cluster_size() - inc).min(end - pos);
            let e = self.entry(&mut m, GuestOffset(pos))?;
            let st = match self.decode(&m, e)? {
                L2Mapping::Unallocated => LayerStatus::Unallocated,
                L2Mapping::Zero { prealloc, .. } => LayerStatus::Zero {
                    offset: prealloc.map(|h| h.0 + inc),
                },
                L2Mapping::Data { host, .. } => LayerStatus::Data {
                    offset: host.0 + inc,
                },
                L2Mapping::Compressed { .. } => LayerStatus::Compressed,
            };
            match first {
                None => first = Some(st),
                Some(f) => {
                    let cont = match (f, st) {
                        (LayerStatus::Data { offset: a }, LayerStatus::Data { offset: b }) => {
                            a + (pos - off) == b
                        }
                        (
                            LayerStatus::Zero { offset: Some(a) },
                            LayerStatus::Zero { offset: Some(b) },
                        ) => a + (pos - off) == b,
                        (a, b) => a == b,
                    };
                    if !cont {
                        break;
                    }
                }
            }
            pos += n;
        }
        Ok((first.unwrap_or(LayerStatus::Unallocated), pos - off))
    }

    /// Whether the image looks metadata-preallocated: far more clusters have a refcount than
    /// the file has blocks on disk. QEMU (`qcow2_detect_metadata_preallocation`) then asks the
    /// file system about data clusters in block-status queries, so `map` does too.
    pub fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.preallocated.get() {
            return Ok(v);
        }
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(self.path()).map_err(|e| Error::io(self.path(), "stat", e))?;
        let cs = self.geo.cluster_size();
        let real_clusters = md.blocks() * 512 / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end = md.len().div_ceil(cs);
        let mut m = self.lock();
        let mut count = 0;
        let mut c = 0;
        while c < end && count < threshold {
            if m.rc.get(&*self.storage, c)? != 0 {
                count += 1;
            }
            c += 1;
        }
        let v = count >= threshold;
        let _ = self.preallocated.set(v);
        Ok(v)
    }

    // ----- writing -------------------------------------------------------------------------

    fn require_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::request(self.path(), "image is open read-only"));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.corrupt(
                "image was marked corrupt while writing: no more writes (`qemu-img check -r all` repairs)",
            ));
        }
        Ok(())
    }

    /// The old guest content of one cluster at this layer (for copy-on-write fills).
    fn old_cluster(&self, m: &Meta, gc_off: u64, e: L2Entry, out: &mut [u8]) -> Result<()> {
        match self.decode(m, e)? {
            L2Mapping::Unallocated => self.read_backing(out, gc_off),
            L2Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Mapping::Data { host, .. } => self.storage.read_at(out, host.0),
            L2Mapping::Compressed { host, len } => self.read_compressed(host, len, out),
        }
    }

    /// [`Self::old_cluster`], taking the content of a cluster still unallocated here from
    /// `below` when it was read there beforehand.
    fn old_content(
        &self,
        m: &Meta,
        gc_off: u64,
        e: L2Entry,
        below: &[(u64, Vec<u8>)],
        out: &mut [u8],
    ) -> Result<()> {
        if self.decode(m, e)? == L2Mapping::Unallocated {
            if let Some((_, c)) = below.iter().find(|(g, _)| *g == gc_off) {
                out.copy_from_slice(c);
                return Ok(());
            }
        }
        self.old_cluster(m, gc_off, e, out)
    }

    /// Host clusters an entry references (freed when the entry is replaced).
    fn referenced_clusters(&self, e: L2Entry) -> Vec<u64> {
        let cb = self.geo.cluster_bits;
        match e.mapping(&self.geo, self.v3) {
            Ok(L2Mapping::Data { host, .. })
            | Ok(L2Mapping::Zero {
                prealloc: Some(host),
                ..
            }) => {
                vec![host.0 >> cb]
            }
            Ok(L2Mapping::Compressed { host, len }) => {
                ((host.0 >> cb)..=((host.0 + len - 1) >> cb)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Ensure the L2 table for guest offset `g` exists; returns its host offset.
    fn ensure_l2(&self, m: &mut Meta, g: GuestOffset) -> Result<u64> {
        let l1i = self.geo.l1_index(g) as usize;
        if let Some(off) = self.l2_offset(m, l1i)? {
            let copied = L1Entry(m.l1[l1i]).copied();
            if copied {
                return Ok(off);
            }
            // Shared L2 table (snapshots): we refuse such images for writing, so this is a
            // damaged image.
            return Err(self.corrupt(format!(
                "L1 entry {l1i} lacks the COPIED flag (shared L2 table)"
            )));
        }
        let c = m.rc.alloc(&*self.storage, &mut m.header, 1)?;
        m.rc.note_metadata(&*self.storage, c, 1, MetaKind::L2)?;
        let off = c << self.geo.cluster_bits;
        m.l2.insert(
            off,
            L2Table {
                entries: vec![0; self.geo.l2_entries() as usize],
                dirty: true,
            },
        );
        m.l2_dirty += 1;
        m.l1[l1i] = L1Entry::new(HostOffset(off)).0;
        m.l1_dirty.insert(l1i);
        m.new_l2 = true;
        Ok(off)
    }

    fn set_entry(&self, m: &mut Meta, g: GuestOffset, e: L2Entry) -> Result<()> {
        let off = self.ensure_l2(m, g)?;
        let i = self.geo.l2_index(g);
        let t = self.load_l2(m, off)?;
        t.entries[i] = e.0;
        if !t.dirty {
            t.dirty = true;
            m.l2_dirty += 1;
        }
        Ok(())
    }

    /// Write guest bytes at this layer (allocating and filling partial clusters from below).
    ///
    /// Clusters that need allocating are written and linked under the metadata lock; the old
    /// content of partial clusters unallocated here is read from below before taking it (a
    /// slow base does not stall the other requests of the disk). Clusters already allocated
    /// here are written in place after the lock is let go, under the I/O gate.
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.signal(self.write_at_inner(buf, off))
    }

    fn write_at_inner(&self, buf: &[u8], off: u64) -> Result<()> {
        self.require_writable()?;
        self.check_range(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let end = off + buf.len() as u64;
        let below = self.cow_preread(off, end)?;
        let mut m = self.lock();
        self.maybe_shrink(&mut m)?;
        // (host offset, range of buf) written in place once the lock is let go.
        let mut in_place: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
        let mut pos = off;
        while pos < end {
            let g = GuestOffset(pos);
            self.ensure_l2(&mut m, g)?;
            let e = self.entry(&mut m, g)?;
            let inc = self.geo.in_cluster(pos);
            let n = (cs - inc).min(end - pos);
            let src = &buf[(pos - off) as usize..(pos - off + n) as usize];
            match self.decode(&m, e)? {
                L2Mapping::Data { host, copied: true } => {
                    // In place: gather the following in-place clusters that are contiguous.
                    let mut run = n;
                    let mut next = pos + n;
                    while next < end {
                        let e2 = self.entry(&mut m, GuestOffset(next))?;
                        match self.decode(&m, e2)? {
                            L2Mapping::Data {
                                host: h2,
                                copied: true,
                            } if h2.0 == host.0 + inc + run => {
                                let k = cs.min(end - next);
                                run += k;
                                next += k;
                            }
                            _ => break,
                        }
                    }
                    m.rc.check_write(&*self.storage, host.0 + inc, run, None)?;
                    in_place.push((
                        host.0 + inc,
                        (pos - off) as usize..(pos - off + run) as usize,
                    ));
                    pos += run;
                }
                L2Mapping::Zero {
                    prealloc: Some(host),
                    copied: true,
                } => {
                    let mut c = vec![0u8; cs as usize];
                    c[inc as usize..(inc + n) as usize].copy_from_slice(src);
                    m.rc.check_write(&*self.storage, host.0, cs, None)?;
                    self.storage.write_at(&c, host.0)?;
                    self.set_entry(&mut m, g, L2Entry::data(host))?;
                    pos += n;
                }
                _ => {
                    pos = self.write_new_run(&mut m, buf, off, pos, &below)?;
                }
            }
            self.maybe_flush(&mut m)?;
        }
        // (Should a step above fail, the clusters collected for in-place writes are left
        // unwritten while later new ones are linked: the request fails, and its range then
        // holds old and new bytes, as a failed write may.)
        if in_place.is_empty() {
            return Ok(());
        }
        // The clusters stay ours while the gate is held (frees wait for it).
        let _gate = self.gate(&mut m);
        drop(m);
        for (host, r) in in_place {
            self.storage.write_at(&buf[r], host)?;
        }
        Ok(())
    }

    /// The old content of the partial first and last clusters of a write of `[off, end)`
    /// that are unallocated here, read from the backing file without the metadata lock:
    /// (guest cluster offset, content). Used by [`Self::write_new_run`] when the cluster is
    /// still unallocated once the lock is held (the backing content does not change).
    fn cow_preread(&self, off: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if self.backing.is_none() {
            return Ok(Vec::new());
        }
        let cs = self.geo.cluster_size();
        let head = self.geo.align_down(off);
        let tail = self.geo.align_down(end - 1);
        let mut partial = Vec::new();
        if off > head || end < head + cs {
            partial.push(head);
        }
        if tail != head && end < tail + cs {
            partial.push(tail);
        }
        let mut out = Vec::new();
        for g in partial {
            let unallocated = {
                let mut m = self.lock();
                let e = self.entry(&mut m, GuestOffset(g))?;
                self.decode(&m, e)? == L2Mapping::Unallocated
            };
            if unallocated {
                let mut c = vec![0u8; cs as usize];
                self.read_backing(&mut c, g)?;
                out.push((g, c));
            }
        }
        Ok(out)
    }

    /// Allocate a run of clusters for guest clusters that need new ones, starting at `pos`;
    /// returns the guest offset where the run ends.
    fn write_new_run(
        &self,
        m: &mut Meta,
        buf: &[u8],
        off: u64,
        pos: u64,
        below: &[(u64, Vec<u8>)],
    ) -> Result<u64> {
        const MAX_RUN: u64 = 64 << 20;
        let cs = self.geo.cluster_size();
        let end = off + buf.len() as u64;
        let first = self.geo.align_down(pos);
        // Guest clusters in the run and their old entries.
        let mut olds = vec![self.entry(m, GuestOffset(first))?];
        let mut gend = (first + cs).min(self.size);
        // New refcount blocks sit at the start of the range they cover, so a contiguous run in
        // fresh space holds at most one block's range minus one cluster.
        let max_clusters = (MAX_RUN / cs).min(self.geo.refblock_entries() - 1).max(1);
        while gend < end && (olds.len() as u64) < max_clusters {
            // Only extend into clusters that lie within the same allocation need.
            self.ensure_l2(m, GuestOffset(gend))?;
            let e = self.entry(m, GuestOffset(gend))?;
            let needs_new = !matches!(
                self.decode(m, e)?,
                L2Mapping::Data { copied: true, .. }
                    | L2Mapping::Zero {
                        prealloc: Some(_),
                        copied: true
                    }
            );
            if !needs_new {
                break;
            }
            olds.push(e);
            gend = (gend + cs).min(self.size);
        }
        let nclusters = olds.len() as u64;
        let mut data = vec![0u8; (nclusters * cs) as usize];
        let run_end = end.min(first + nclusters * cs);
        // Fill a partial head and tail from the old content (copy-on-write).
        if pos > first || run_end < first + cs {
            self.old_content(m, first, olds[0], below, &mut data[..cs as usize])?;
        }
        let last_g = first + (nclusters - 1) * cs;
        if nclusters > 1 && run_end < last_g + cs {
            let at = ((nclusters - 1) * cs) as usize;
            let out = &mut data[at..at + cs as usize];
            self.old_content(m, last_g, olds[olds.len() - 1], below, out)?;
        }
        let from = (pos - off) as usize;
        let to = (run_end - off) as usize;
        let d0 = (pos - first) as usize;
        data[d0..d0 + (to - from)].copy_from_slice(&buf[from..to]);
        // Clusters of a virtual size that is not cluster aligned are still whole clusters.
        let hc = m.rc.alloc(&*self.storage, &mut m.header, nclusters)?;
        let host = hc << self.geo.cluster_bits;
        m.rc.check_write(&*self.storage, host, data.len() as u64, None)?;
        self.storage.write_at(&data, host)?;
        for (i, old) in olds.iter().enumerate() {
            let g = GuestOffset(first + i as u64 * cs);
            self.set_entry(m, g, L2Entry::data(HostOffset(host + i as u64 * cs)))?;
            let freed = self.referenced_clusters(*old);
            m.pending_free.extend(freed);
        }
        Ok(run_end)
    }

    /// Make `[off, off+len)` read as zeros: whole clusters become zero clusters (their old
    /// clusters are freed after the new entries are on disk), partial ones are written.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        self.signal(self.write_zeroes_inner(off, len))
    }

    fn write_zeroes_inner(&self, off: u64, len: u64) -> Result<()> {
        self.require_writable()?;
        self.check_range(off, len)?;
        let cs = self.geo.cluster_size();
        let end = off + len;
        let a = self.geo.align_up(off).min(end);
        let b = if end == self.size {
            end
        } else {
            self.geo.align_down(end).max(a)
        };
        let zeros = |n: u64| vec![0u8; n as usize];
        if !self.v3 {
            // Version 2 has no zero flag.
            return write_zero_bytes(off, len, |b, p| self.write_at_inner(b, p));
        }
        if off < a {
            self.write_at_inner(&zeros(a - off), off)?;
        }
        if b < end {
            self.write_at_inner(&zeros(end - b), b)?;
        }
        let mut m = self.lock();
        let mut g = a;
        while g < b {
            let e = self.entry(&mut m, GuestOffset(g))?;
            if e != L2Entry::zero() {
                self.set_entry(&mut m, GuestOffset(g), L2Entry::zero())?;
                let freed = self.referenced_clusters(e);
                m.pending_free.extend(freed);
            }
            g += cs;
            self.maybe_flush(&mut m)?;
            self.maybe_shrink(&mut m)?;
        }
        Ok(())
    }

    /// Copy-on-read fill: `data` is guest content read from the backing file for the
    /// cluster-aligned range at `off` (whole clusters, the last one may end at the virtual
    /// size). Every cluster still unallocated here takes its content: all-zero clusters become
    /// zero clusters (nothing stored), others are written as data, at most `max_data` of them.
    pub fn fill(&self, off: u64, data: &[u8], max_data: u64) -> Result<FillStats> {
        self.signal(self.fill_inner(off, data, max_data))
    }

    fn fill_inner(&self, off: u64, data: &[u8], max_data: u64) -> Result<FillStats> {
        self.require_writable()?;
        let cs = self.geo.cluster_size();
        if !self.geo.is_aligned(off) {
            return Err(Error::request(
                self.path(),
                format!("fill at unaligned {off:#x}"),
            ));
        }
        self.check_range(off, data.len() as u64)?;
        let n = (data.len() as u64).div_ceil(cs) as usize;
        let chunk = |i: usize| &data[i * cs as usize..((i + 1) * cs as usize).min(data.len())];
        let zero: Vec<bool> = (0..n).map(|i| self.v3 && is_zero(chunk(i))).collect();
        let max_run = (64 << 20) / cs;
        let max_run = max_run.min(self.geo.refblock_entries() - 1).max(1) as usize;
        let mut st = FillStats::default();
        // Decide under the lock, write data without it, then link it under the lock: the
        // clusters are counted (refcount) before the data lands and linked (L2) after.
        let mut runs: Vec<(usize, usize, u64)> = Vec::new();
        {
            let mut guard = self.lock();
            let m: &mut Meta = &mut guard;
            self.maybe_shrink(m)?;
            let unalloc = |q: &Self, m: &mut Meta, i: usize| -> Result<bool> {
                let e = q.entry(m, GuestOffset(off + i as u64 * cs))?;
                Ok(q.decode(m, e)? == L2Mapping::Unallocated)
            };
            let mut i = 0;
            while i < n {
                if !unalloc(self, m, i)? {
                    i += 1;
                    continue;
                }
                if zero[i] {
                    self.set_entry(m, GuestOffset(off + i as u64 * cs), L2Entry::zero())?;
                    st.zero_clusters += 1;
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < n
                    && j - i < max_run
                    && st.data_clusters + ((j - i) as u64) < max_data
                    && !zero[j]
                    && unalloc(self, m, j)?
                {
                    j += 1;
                }
                if st.data_clusters >= max_data {
                    st.over_quota += 1;
                    i += 1;
                    continue;
                }
                let k = (j - i) as u64;
                for x in i..j {
                    self.ensure_l2(m, GuestOffset(off + x as u64 * cs))?;
                }
                let hc = m.rc.alloc(&*self.storage, &mut m.header, k)?;
                let host = hc << self.geo.cluster_bits;
                m.rc.check_write(&*self.storage, host, k * cs, None)?;
                runs.push((i, j, host));
                st.data_clusters += k;
                i = j;
            }
        }
        for &(i, j, host) in &runs {
            let start = i * cs as usize;
            let end = (j * cs as usize).min(data.len());
            if end - start == (j - i) * cs as usize {
                self.storage.write_at(&data[start..end], host)?;
            } else {
                let mut buf = vec![0u8; (j - i) * cs as usize];
                buf[..end - start].copy_from_slice(&data[start..end]);
                self.storage.write_at(&buf, host)?;
            }
        }
        let mut guard = self.lock();
        let m: &mut Meta = &mut guard;
        for &(i, j, host) in &runs {
            for x in i..j {
                let g = GuestOffset(off + x as u64 * cs);
                let h = HostOffset(host + (x - i) as u64 * cs);
                // Callers claim the clusters they fill; should two fills still meet, the
                // first link wins and the other's cluster is given back.
                let e = self.entry(m, g)?;
                if self.decode(m, e)? != L2Mapping::Unallocated {
                    m.pending_free.push(h.0 >> self.geo.cluster_bits);
                    st.data_clusters -= 1;
                    continue;
                }
                self.set_entry(m, g, L2Entry::data(h))?;
            }
        }
        self.maybe_flush(m)?;
        Ok(st)
    }

    /// Guest clusters in `[off, off+len)` that are unallocated at this layer, as
    /// cluster-aligned (offset, length) runs clipped to the virtual size.
    pub fn unallocated_runs(&self, off: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let end = (off + len).min(self.size);
        let mut pos = self.geo.align_down(off);
        while pos < end {
            let (st, n) = self.block_status(pos, end - pos)?;
            if st == LayerStatus::Unallocated {
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == pos => l.1 += n,
                    _ => out.push((pos, n)),
                }
            }
            pos += n;
        }
        Ok(out)
    }

    fn maybe_flush(&self, m: &mut Meta) -> Result<()> {
        let dirty = m.l2_dirty * self.geo.cluster_size() as usize;
        if dirty > L2_CACHE_BYTES / 2 || m.rc.dirty_bytes() > L2_CACHE_BYTES / 2 {
            self.flush_locked(m, false)?;
        }
        Ok(())
    }

    fn maybe_shrink(&self, m: &mut Meta) -> Result<()> {
        let bytes = m.l2.len() * self.geo.cluster_size() as usize;
        if bytes > L2_CACHE_BYTES {
            if m.l2_dirty > 0 || !m.l1_dirty.is_empty() {
                self.flush_locked(m, false)?;
            }
            m.l2.clear();
        }
        m.rc.shrink(L2_CACHE_BYTES);
        Ok(())
    }

    /// Write all cached metadata in crash-safe order; `durable` adds a final fdatasync.
    pub fn flush(&self, durable: bool) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.require_writable()?;
        let r = self.flush_locked(&mut self.lock(), durable);
        self.signal(r)
    }

    fn flush_locked(&self, m: &mut Meta, durable: bool) -> Result<()> {
        let st = &*self.storage;
        let l2_dirty = m.l2_dirty > 0 || !m.l1_dirty.is_empty();
        // 1. refcounts (and the data already written) before anything that points at them.
        if m.rc.is_dirty() {
            m.rc.write_dirty(st, &m.header)?;
        }
        if l2_dirty {
            st.sync()?;
            for (off, t) in m.l2.iter_mut().filter(|(_, t)| t.dirty) {
                m.rc.check_write(st, *off, self.geo.cluster_size(), Some(MetaKind::L2))?;
                st.write_at(&table::encode_table(&t.entries), *off)?;
                t.dirty = false;
                m.l2_dirty -= 1;
            }
            // 3. new L2 tables' contents before the L1 entries that point at them.
            if m.new_l2 {
                st.sync()?;
            }
            let l1_off = m.header.l1_table_offset;
            let dirty: Vec<usize> = m.l1_dirty.iter().copied().collect();
            for i in dirty {
                st.write_at(&m.l1[i].to_be_bytes(), l1_off + i as u64 * 8)?;
                m.l1_dirty.remove(&i);
            }
            m.new_l2 = false;
        }
        // 4. deferred frees, once the references are gone from disk.
        if !m.pending_free.is_empty() {
            st.sync()?;
            // No request may still be reading or writing a cluster about to become free.
            let _gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
            let frees = std::mem::take(&mut m.pending_free);
            for c in frees {
                m.rc.decrement(st, c)?;
            }
            m.rc.write_dirty(st, &m.header)?;
        }
        if durable {
            st.sync()?;
        }
        Ok(())
    }

    /// Replace the vmicache header extension (None removes it) and rewrite the header.
    pub fn set_cache_meta(&self, meta: Option<&vext::CacheMeta>) -> Result<()> {
        self.require_writable()?;
        let mut m = self.lock();
        self.flush_locked(&mut m, false)?;
        m.header.extensions.retain(|e| e.kind != vext::KIND);
        if let Some(cm) = meta {
            m.header.extensions.push(header::Extension {
                kind: vext::KIND,
                data: cm.encode(),
            });
        }
        let h = m.header.clone();
        write_header(&*self.storage, &h)?;
        self.storage.sync()
    }

    pub fn cache_meta(&self) -> Result<Option<vext::CacheMeta>> {
        let m = self.lock();
        match m.header.extensions.iter().find(|e| e.kind == vext::KIND) {
            None => Ok(None),
            Some(e) => vext::CacheMeta::decode(&e.data)
                .map(Some)
                .map_err(|e| e.at(self.path())),
        }
    }

    /// Every guest cluster this layer maps (data, zero or compressed), in guest order, as
    /// `f(guest cluster index, mapping)`; unallocated clusters are skipped. The metadata lock is
    /// not held while `f` runs, so `f` may read the image.
    pub fn for_each_mapping(&self, mut f: impl FnMut(u64, L2Mapping) -> Result<()>) -> Result<()> {
        let guest_clusters = self.geo.clusters_for(self.size);
        let per = self.geo.l2_entries();
        let l1n = self.geo.l1_entries_for(self.size) as usize;
        for l1i in 0..l1n {
            let maps = {
                let mut m = self.lock();
                let Some(off) = self.l2_offset(&m, l1i)? else {
                    continue;
                };
                let entries = self.load_l2(&mut m, off)?.entries.clone();
                let n = (guest_clusters - l1i as u64 * per).min(per) as usize;
                let maps = entries[..n]
                    .iter()
                    .map(|&e| self.decode(&m, L2Entry(e)))
                    .collect::<Result<Vec<_>>>()?;
                if m.l2.len() * self.geo.cluster_size() as usize > L2_CACHE_BYTES {
                    self.maybe_shrink(&mut m)?;
                }
                maps
            };
            for (i, map) in maps.into_iter().enumerate() {
                if map != L2Mapping::Unallocated {
                    f(l1i as u64 * per + i as u64, map)?;
                }
            }
        }
        Ok(())
    }

    /// Guest clusters of this layer by kind, how many share their stored data, and the host
    /// bytes that data takes: walks L2.
    pub fn allocated_clusters(&self) -> Result<AllocStats> {
        let mut s = AllocStats::default();
        // Plain data host offsets and compressed descriptors -> references at this layer.
        let mut plain: HashMap<u64, (u64, bool)> = HashMap::new();
        let mut packed: HashMap<(u64, u64), u64> = HashMap::new();
        self.for_each_mapping(|_, map| {
            match map {
                L2Mapping::Unallocated => {}
                L2Mapping::Zero { .. } => s.zero += 1,
                L2Mapping::Data { host, copied } => {
                    s.data += 1;
                    let e = plain.entry(host.0).or_insert((0, false));
                    e.0 += 1;
                    e.1 |= !copied;
                }
                L2Mapping::Compressed { host, len } => {
                    s.compressed += 1;
                    *packed.entry((host.0, len)).or_insert(0) += 1;
                }
            }
            Ok(())
        })?;
        let cs = self.geo.cluster_size();
        for (n, uncopied) in plain.values() {
            if *n > 1 || *uncopied {
                s.shared += n;
            }
            s.stored_bytes += cs;
        }
        for ((_, len), n) in &packed {
            if *n > 1 {
                s.shared += n;
            }
            s.stored_bytes += len.min(&cs);
        }
        Ok(s)
    }
}

/// What [`Qcow2::fill_from_backing`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct FillFromBacking {
    pub stats: FillStats,
    /// Bytes read from the backing file (holes its metadata proves zero are not read).
    pub base_bytes: u64,
}

/// What a copy-on-read fill stored.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct FillStats {
    pub data_clusters: u64,
    pub zero_clusters: u64,
    /// Clusters left unfilled because the quota was reached.
    pub over_quota: u64,
}

/// Guest clusters by kind at one layer.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct AllocStats {
    pub data: u64,
    pub zero: u64,
    pub compressed: u64,
    /// Data and compressed clusters whose stored bytes other guest clusters use too (an L2
    /// entry without COPIED, or a host cluster or descriptor referenced more than once).
    pub shared: u64,
    /// Host bytes the data takes: distinct data clusters, plus the distinct compressed
    /// descriptors' bytes (to the end of their last 512-byte sector).
    pub stored_bytes: u64,
}

impl AllocStats {
    /// Guest bytes of data (plain and compressed clusters) less the host bytes storing them.
    pub fn saved_bytes(&self, cluster_size: u64) -> u64 {
        ((self.data + self.compressed) * cluster_size).saturating_sub(self.stored_bytes)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // A corrupt-marked image is written no more (the error was reported when found).
        if self.writable && !self.broken.load(Ordering::SeqCst) {
            if let Err(e) = self.flush(true) {
                // Never panics on a closed stderr (eprintln! would).
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "vmicache: flushing {} on close: {e}",
                    self.path().display()
                );
            }
        }
    }
}

/// Encode and write the header at offset 0 (one write of the header area).
pub(crate) fn write_header(st: &dyn Storage, h: &Header) -> Result<()> {
    let b = h.encode().map_err(|e| e.at(st.path()))?;
    st.write_at(&b, 0)
}
