//! Writing: in-place writes, allocating writes, and zeroing.
//!
//! An allocating write follows the fill's protocol: it claims the guest clusters it gives new
//! homes (other writes and zeroing of them wait), allocates under the metadata lock, writes
//! the data without it (under the I/O gate), and links the new clusters under the lock again.
//! The old content of partial clusters unallocated here is read from below before any lock is
//! taken, so a slow base does not stall the other requests of the disk.

use super::{Meta, Qcow2};
use crate::engine::layer::{write_zero_bytes, BackingRead};
use crate::format::table::{L1Entry, L2Entry, L2Mapping};
use crate::format::types::{GuestOffset, HostOffset};
use crate::Result;
use std::ops::Range;

/// Guest clusters (by offset) claimed by one allocating write, released on drop.
struct Claim<'a> {
    q: &'a Qcow2,
    clusters: Vec<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut c = self.q.claims.lock().unwrap_or_else(|p| p.into_inner());
        for g in &self.clusters {
            c.remove(g);
        }
        drop(c);
        self.q.claimed.notify_all();
    }
}

/// A guest cluster an allocating write gives a new home.
struct NewCluster {
    /// Guest offset of the cluster.
    g: u64,
    host: u64,
    /// Its entry when planned (for the old content of a partial cluster).
    old: L2Entry,
    /// A preallocated zero cluster written in place (`host` is its own).
    reuse: bool,
}

/// A write planned under the lock.
#[derive(Default)]
struct Plan {
    /// (host offset, range of the buffer) of clusters written in place.
    in_place: Vec<(u64, Range<usize>)>,
    new: Vec<NewCluster>,
}

impl Qcow2 {
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
        use crate::engine::overlap::MetaKind;
        let l1i = self.geo.l1_index(g) as usize;
        if let Some(off) = self.l2_offset(m, l1i)? {
            if L1Entry(m.l1[l1i]).copied() {
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
        self.insert_l2(m, off)?;
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

    /// The first of `clusters` (guest offsets) that an allocating write has claimed.
    fn first_claimed(&self, mut clusters: impl Iterator<Item = u64>) -> Option<u64> {
        let c = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        clusters.find(|g| c.contains(g))
    }

    /// Whether an allocating write has claimed guest cluster `g` (a fill leaves it alone).
    pub(super) fn is_claimed(&self, g: u64) -> bool {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&g)
    }

    /// Wait until guest cluster `g` is no longer claimed (no metadata lock held).
    fn wait_unclaimed(&self, g: u64) {
        let mut c = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        while c.contains(&g) {
            c = self.claimed.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Write guest bytes at this layer: in place where clusters are allocated here, into new
    /// clusters elsewhere (partial ones filled with their old content, from `below` where
    /// they are unallocated here).
    pub fn write_at(&self, buf: &[u8], off: u64, below: &dyn BackingRead) -> Result<()> {
        self.signal(self.write_at_inner(buf, off, below))
    }

    fn write_at_inner(&self, buf: &[u8], off: u64, below: &dyn BackingRead) -> Result<()> {
        self.require_writable()?;
        self.check_range(off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = off + buf.len() as u64;
        let pre = self.cow_preread(off, end, below)?;
        let (plan, claim, mut m) = loop {
            let mut m = self.lock();
            let plan = self.plan_write(&mut m, off, end)?;
            let wanted = plan.new.iter().map(|n| n.g);
            if let Some(g) = self.first_claimed(wanted) {
                drop(m);
                self.wait_unclaimed(g);
                continue;
            }
            let clusters: Vec<u64> = plan.new.iter().map(|n| n.g).collect();
            self.claims
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(clusters.iter().copied());
            let claim = Claim { q: self, clusters };
            break (plan, claim, m);
        };
        let plan = self.allocate(&mut m, plan)?;
        // Unlocked, under the gate (no cluster named by the plan is freed meanwhile).
        let gate = self.gate(&m);
        drop(m);
        for (host, r) in &plan.in_place {
            self.storage.write_at(&buf[r.clone()], *host)?;
        }
        self.write_new(&plan.new, buf, off, &pre, below)?;
        drop(gate);
        if plan.new.is_empty() {
            return Ok(());
        }
        let mut m = self.lock();
        for n in &plan.new {
            let g = GuestOffset(n.g);
            let now = self.entry(&mut m, g)?;
            self.set_entry(&mut m, g, L2Entry::data(HostOffset(n.host)))?;
            if !n.reuse {
                // What is replaced (as planned, or linked by a fill meanwhile) is freed once
                // the new entry is on disk.
                let freed = self.referenced_clusters(now);
                m.pending_free.extend(freed);
            }
        }
        drop(claim);
        self.maybe_flush(&mut m)
    }

    /// Sort the clusters of `[off, end)` into in-place writes and clusters needing a new home
    /// (not yet allocated: `host` 0).
    fn plan_write(&self, m: &mut Meta, off: u64, end: u64) -> Result<Plan> {
        let cs = self.geo.cluster_size();
        let mut plan = Plan::default();
        let mut pos = off;
        while pos < end {
            let g = self.geo.align_down(pos);
            let inc = pos - g;
            let n = (cs - inc).min(end - pos);
            self.ensure_l2(m, GuestOffset(g))?;
            let e = self.entry(m, GuestOffset(g))?;
            let r = (pos - off) as usize..(pos - off + n) as usize;
            match self.decode(m, e)? {
                L2Mapping::Data { host, copied: true } => {
                    let h = host.0 + inc;
                    m.rc.check_write(&*self.storage, h, n, None)?;
                    match plan.in_place.last_mut() {
                        Some((lh, lr)) if *lh + lr.len() as u64 == h && lr.end == r.start => {
                            lr.end = r.end
                        }
                        _ => plan.in_place.push((h, r)),
                    }
                }
                L2Mapping::Zero {
                    prealloc: Some(host),
                    copied: true,
                } => {
                    m.rc.check_write(&*self.storage, host.0, cs, None)?;
                    plan.new.push(NewCluster {
                        g,
                        host: host.0,
                        old: e,
                        reuse: true,
                    });
                }
                _ => plan.new.push(NewCluster {
                    g,
                    host: 0,
                    old: e,
                    reuse: false,
                }),
            }
            pos += n;
        }
        Ok(plan)
    }

    /// Give the planned clusters that need one a new host cluster: consecutive guest
    /// clusters get contiguous runs.
    fn allocate(&self, m: &mut Meta, mut plan: Plan) -> Result<Plan> {
        const MAX_RUN: u64 = 64 << 20;
        let cs = self.geo.cluster_size();
        // New refcount blocks sit at the start of the range they cover, so a contiguous run in
        // fresh space holds at most one block's range minus one cluster.
        let max = (MAX_RUN / cs).min(self.geo.refblock_entries() - 1).max(1) as usize;
        let mut i = 0;
        while i < plan.new.len() {
            if plan.new[i].reuse {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < plan.new.len()
                && j - i < max
                && !plan.new[j].reuse
                && plan.new[j].g == plan.new[j - 1].g + cs
            {
                j += 1;
            }
            let k = (j - i) as u64;
            let host = m.rc.alloc(&*self.storage, &mut m.header, k)? << self.geo.cluster_bits;
            m.rc.check_write(&*self.storage, host, k * cs, None)?;
            for (x, n) in plan.new[i..j].iter_mut().enumerate() {
                n.host = host + x as u64 * cs;
            }
            i = j;
        }
        Ok(plan)
    }

    /// Write the new clusters' content: `buf`'s bytes, and for partial clusters their old
    /// content (`pre`: what was read from below beforehand).
    fn write_new(
        &self,
        new: &[NewCluster],
        buf: &[u8],
        off: u64,
        pre: &[(u64, Vec<u8>)],
        below: &dyn BackingRead,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = off + buf.len() as u64;
        let mut i = 0;
        while i < new.len() {
            // A run of clusters contiguous in guest and host space, written at once.
            let mut j = i + 1;
            while j < new.len()
                && new[j].g == new[j - 1].g + cs
                && new[j].host == new[j - 1].host + cs
            {
                j += 1;
            }
            // Clusters the buffer covers whole are written from it as they are: no copy (a
            // checkout or a full copy writes megabytes at a time).
            let (first, last) = (new[i].g, new[j - 1].g + cs);
            if first >= off && last <= end {
                let at = (first - off) as usize;
                self.storage
                    .write_at(&buf[at..at + (last - first) as usize], new[i].host)?;
                i = j;
                continue;
            }
            let mut data = vec![0u8; (j - i) * cs as usize];
            for (x, n) in new[i..j].iter().enumerate() {
                let c = &mut data[x * cs as usize..(x + 1) * cs as usize];
                let (a, b) = (n.g.max(off), (n.g + cs).min(end));
                if a > n.g || b < n.g + cs {
                    self.old_content(n, pre, below, c)?;
                }
                c[(a - n.g) as usize..(b - n.g) as usize]
                    .copy_from_slice(&buf[(a - off) as usize..(b - off) as usize]);
            }
            self.storage.write_at(&data, new[i].host)?;
            i = j;
        }
        Ok(())
    }

    /// The old guest content of a partial cluster being given a new home.
    fn old_content(
        &self,
        n: &NewCluster,
        pre: &[(u64, Vec<u8>)],
        below: &dyn BackingRead,
        out: &mut [u8],
    ) -> Result<()> {
        let map = n
            .old
            .mapping(&self.geo, self.v3)
            .map_err(|e| e.at(self.path()))?;
        match map {
            L2Mapping::Unallocated => match pre.iter().find(|(g, _)| *g == n.g) {
                Some((_, c)) => {
                    out.copy_from_slice(c);
                    Ok(())
                }
                // Allocated when read beforehand, unallocated now (never, without discard).
                None => below.read_below(out, n.g),
            },
            L2Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            L2Mapping::Data { host, .. } => self.storage.read_at(out, host.0),
            L2Mapping::Compressed { host, len } => self.read_compressed(host, len, out),
        }
    }

    /// The old content of the partial first and last clusters of a write of `[off, end)`
    /// that are unallocated here, read from below without any lock: (guest cluster offset,
    /// content).
    fn cow_preread(
        &self,
        off: u64,
        end: u64,
        below: &dyn BackingRead,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
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
                below.read_below(&mut c, g)?;
                out.push((g, c));
            }
        }
        Ok(out)
    }

    /// Make `[off, off+len)` read as zeros: whole clusters become zero clusters (their old
    /// clusters are freed after the new entries are on disk), partial ones are written.
    pub fn write_zeroes(&self, off: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        self.signal(self.write_zeroes_inner(off, len, below))
    }

    fn write_zeroes_inner(&self, off: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
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
            return write_zero_bytes(off, len, |b, p| self.write_at_inner(b, p, below));
        }
        if off < a {
            self.write_at_inner(&zeros(a - off), off, below)?;
        }
        if b < end {
            self.write_at_inner(&zeros(end - b), b, below)?;
        }
        let mut g = a;
        while g < b {
            // In bounded steps, each under the lock once no write is working on them.
            let step = (b - g).min(64 << 20);
            let mut m = loop {
                let m = self.lock();
                let clusters = (g..g + step).step_by(cs as usize);
                match self.first_claimed(clusters) {
                    Some(c) => {
                        drop(m);
                        self.wait_unclaimed(c);
                    }
                    None => break m,
                }
            };
            for x in (g..g + step).step_by(cs as usize) {
                let e = self.entry(&mut m, GuestOffset(x))?;
                if e != L2Entry::zero() {
                    self.set_entry(&mut m, GuestOffset(x), L2Entry::zero())?;
                    let freed = self.referenced_clusters(e);
                    m.pending_free.extend(freed);
                }
            }
            self.maybe_flush(&mut m)?;
            g += step;
        }
        Ok(())
    }
}
