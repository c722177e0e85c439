//! The metadata cache: L2 tables kept by LRU, when they are flushed, and the crash-safe flush
//! order.

use super::{L2Table, Meta, Qcow2};
use crate::engine::overlap::MetaKind;
use crate::format::table;
use crate::Result;
use std::sync::atomic::{AtomicU64, Ordering};

/// Dirty metadata above half this many bytes is flushed; cached L2 tables above it make room
/// by dropping the least recently used clean ones.
pub(super) const L2_CACHE_BYTES: usize = 32 << 20;

impl Qcow2 {
    pub(super) fn maybe_flush(&self, m: &mut Meta) -> Result<()> {
        let dirty = m.l2_dirty * self.geo.cluster_size() as usize;
        if dirty > L2_CACHE_BYTES / 2 || m.rc.dirty_bytes() > L2_CACHE_BYTES / 2 {
            self.flush_locked(m, false)?;
        }
        m.rc.shrink(L2_CACHE_BYTES);
        Ok(())
    }

    /// Mark the cached table at `off` used now (LRU); works under the shared lock.
    pub(super) fn stamp(&self, m: &Meta, off: u64) {
        if let Some(t) = m.l2.get(&off) {
            t.used
                .store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// The L2 table at host offset `off`, read into the cache if it is not there; stamped
    /// used.
    pub(super) fn load_l2<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut L2Table> {
        if !m.l2.contains_key(&off) {
            self.make_room(m)?;
            let mut b = vec![0u8; self.geo.cluster_size() as usize];
            self.storage.read_at(&mut b, off)?;
            m.l2.insert(
                off,
                L2Table {
                    entries: table::decode_table(&b),
                    dirty: false,
                    used: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
                },
            );
        }
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let t = m.l2.get_mut(&off).expect("just inserted");
        *t.used.get_mut() = tick;
        Ok(t)
    }

    /// A new, empty (dirty) L2 table at host offset `off`.
    pub(super) fn insert_l2(&self, m: &mut Meta, off: u64) -> Result<()> {
        self.make_room(m)?;
        let t = L2Table {
            entries: vec![0; self.geo.l2_entries() as usize],
            dirty: true,
            used: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
        };
        m.l2.insert(off, t);
        m.l2_dirty += 1;
        Ok(())
    }

    /// Before a table is added to a full cache: drop the least recently used clean quarter
    /// (flushing first when too few are clean).
    fn make_room(&self, m: &mut Meta) -> Result<()> {
        let cap = (L2_CACHE_BYTES / self.geo.cluster_size() as usize).max(4);
        if m.l2.len() < cap {
            return Ok(());
        }
        if m.l2.len() - m.l2_dirty < cap / 4 {
            self.flush_locked(m, false)?;
        }
        let mut clean: Vec<(u64, u64)> =
            m.l2.iter()
                .filter(|(_, t)| !t.dirty)
                .map(|(o, t)| (t.used.load(Ordering::Relaxed), *o))
                .collect();
        clean.sort_unstable();
        let drop_n = (m.l2.len() + 1)
            .saturating_sub(cap * 3 / 4)
            .min(clean.len());
        for (_, o) in &clean[..drop_n] {
            m.l2.remove(o);
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

    pub(super) fn flush_locked(&self, m: &mut Meta, durable: bool) -> Result<()> {
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
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        // A corrupt-marked image is written no more (the error was reported when found).
        if self.writable
            && !self.broken.load(Ordering::SeqCst)
            && !self.io_failed.load(Ordering::SeqCst)
        {
            // Callers that must know flush first; what fails here can only be reported, which
            // the library leaves to the program (the `log` facade; the command line prints it).
            if let Err(e) = self.flush(true) {
                log::error!("flushing {} on close: {e}", self.path().display());
            }
        }
    }
}
