//! Writing: in-place writes, allocating runs with copy-on-write of partial clusters, and
//! zeroing.

use super::{L2Table, Meta, Qcow2};
use crate::engine::overlap::MetaKind;
use crate::format::table::{L1Entry, L2Entry, L2Mapping};
use crate::format::types::{GuestOffset, HostOffset};
use crate::Result;

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

impl Qcow2 {
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
    pub(super) fn ensure_l2(&self, m: &mut Meta, g: GuestOffset) -> Result<u64> {
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

    pub(super) fn set_entry(&self, m: &mut Meta, g: GuestOffset, e: L2Entry) -> Result<()> {
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
}
