//! The walk of one check pass: counting every reference from the L1/L2 tables, snapshots and
//! refcount structures ([`Checker`]), and reading the on-disk refcounts through the refcount
//! table as QEMU reads them.

use super::CheckReport;
use crate::engine::storage::Storage;
use crate::format::header::{Header, MAX_L1_BYTES};
use crate::format::refcount::{self, RefTableEntry};
use crate::format::table::{
    self, COMPRESSED, COPIED, L1_RESERVED, L2_STD_RESERVED, OFFSET_MASK, ZERO,
};
use crate::format::{be_u16, be_u32, be_u64};
use crate::{Error, Result};
use std::path::Path;

pub(super) struct Checker<'a> {
    pub(super) st: &'a dyn Storage,
    pub(super) h: &'a Header,
    pub(super) cs: u64,
    pub(super) file_len: u64,
    pub(super) nb_clusters: u64,
    pub(super) computed: Vec<u32>,
    /// Refcount structures are broken beyond what leak repair may fix.
    pub(super) rebuild: bool,
    pub(super) r: CheckReport,
}

impl Checker<'_> {
    pub(super) fn msg(&mut self, s: String) {
        self.r.messages.push(s);
    }

    /// Count a reference to the byte range; refuse ranges a cluster or more past EOF.
    pub(super) fn inc(&mut self, off: u64, size: u64) {
        if size == 0 {
            return;
        }
        let end = off.saturating_add(size);
        if end.saturating_sub(self.file_len) >= self.cs || end < off {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {size:#x}"
            ));
            self.r.corruptions += 1;
            return;
        }
        for c in off / self.cs..=(end - 1) / self.cs {
            if let Some(v) = self.computed.get_mut(c as usize) {
                *v = v.saturating_add(1);
            }
        }
    }

    pub(super) fn read(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        self.st.read_at(&mut b, off)?;
        Ok(b)
    }

    pub(super) fn check_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) -> Result<()> {
        self.inc(l1_off, l1_size * 8);
        let l1 = table::decode_table(&self.read(l1_off, l1_size * 8)?);
        for e in l1 {
            if e == 0 {
                continue;
            }
            if e & L1_RESERVED != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                self.r.corruptions += 1;
            }
            let l2 = e & OFFSET_MASK;
            self.inc(l2, self.cs);
            if l2 % self.cs != 0 {
                self.msg(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.r.corruptions += 1;
            }
            let t = table::decode_table(&self.read(l2, self.cs)?);
            self.check_l2(&t, active);
        }
        Ok(())
    }

    fn check_l2(&mut self, t: &[u64], active: bool) {
        let cb = self.h.geometry.cluster_bits;
        let mut next = 0u64;
        for &e in t {
            if e & COMPRESSED != 0 {
                let (off, len) = table::compressed_descriptor(e, cb);
                if e & COPIED != 0 {
                    self.msg(format!(
                        "ERROR: coffset={off:#x}: copied flag must never be set for compressed clusters"
                    ));
                    self.r.corruptions += 1;
                }
                self.inc(off, len);
                if active {
                    self.r.allocated_clusters += 1;
                    self.r.compressed_clusters += 1;
                    self.r.fragmented_clusters += 1;
                }
                continue;
            }
            if e & L2_STD_RESERVED != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
                self.r.corruptions += 1;
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue; // unallocated or plain zero
            }
            if active {
                self.r.allocated_clusters += 1;
                if next != 0 && off != next {
                    self.r.fragmented_clusters += 1;
                }
                next = off + self.cs;
            }
            if off % self.cs != 0 {
                let what = if e & ZERO != 0 {
                    "Preallocated"
                } else {
                    "Data"
                };
                self.msg(format!(
                    "ERROR offset={off:x}: {what} cluster is not properly aligned; L2 entry corrupted."
                ));
                self.r.corruptions += 1;
            }
            self.inc(off, self.cs);
        }
    }

    pub(super) fn check_snapshots(&mut self) -> Result<()> {
        let n = self.h.nb_snapshots;
        if n == 0 {
            return Ok(());
        }
        let mut at = self.h.snapshots_offset;
        for _ in 0..n {
            if at >= self.file_len {
                return Err(Error::invalid(
                    self.st.path(),
                    "snapshot table runs past the end of the file",
                ));
            }
            let fixed = self.read(at, 40)?;
            let l1_off = be_u64(&fixed, 0);
            let l1_size = u64::from(be_u32(&fixed, 8));
            let id_len = u64::from(be_u16(&fixed, 12));
            let name_len = u64::from(be_u16(&fixed, 14));
            let extra = u64::from(be_u32(&fixed, 36));
            let strs = self.read(at + 40 + extra, id_len + name_len)?;
            let id = String::from_utf8_lossy(&strs[..id_len as usize]).into_owned();
            let name = String::from_utf8_lossy(&strs[id_len as usize..]).into_owned();
            at += (40 + extra + id_len + name_len).div_ceil(8) * 8;
            if l1_off % self.cs != 0 {
                self.msg(format!("ERROR snapshot {id} ({name}) l1_offset={l1_off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"));
                self.r.corruptions += 1;
                continue;
            }
            if l1_size * 8 > MAX_L1_BYTES {
                self.msg(format!("ERROR snapshot {id} ({name}) l1_size={l1_size:#x}: L1 table is too large; snapshot table entry corrupted"));
                self.r.corruptions += 1;
                continue;
            }
            self.check_l1(l1_off, l1_size, false)?;
        }
        self.inc(self.h.snapshots_offset, at - self.h.snapshots_offset);
        Ok(())
    }

    /// Validate the refcount table's entries ([`RefTableEntry::decode`], the allocator's rule)
    /// and count the blocks' own clusters. Returns how each entry can be read, as QEMU reads
    /// it (reserved bits masked, past the end of the file as zeroes).
    pub(super) fn check_refblocks(&mut self, reftable: &[u64]) -> Vec<Block> {
        let geo = self.h.geometry;
        let mut out = vec![Block::Absent; reftable.len()];
        for (i, &e) in reftable.iter().enumerate() {
            match RefTableEntry::decode(e, &geo, self.nb_clusters) {
                RefTableEntry::Unused => {}
                RefTableEntry::Reserved { offset } => {
                    self.msg(format!(
                        "ERROR refcount table entry {i} has reserved bits set"
                    ));
                    self.r.corruptions += 1;
                    self.rebuild = true;
                    if offset != 0 {
                        out[i] = if geo.is_aligned(offset) {
                            Block::At(offset)
                        } else {
                            Block::Unreadable
                        };
                    }
                }
                RefTableEntry::Unaligned { .. } => {
                    self.msg(format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                    ));
                    self.r.corruptions += 1;
                    self.rebuild = true;
                    out[i] = Block::Unreadable;
                }
                RefTableEntry::PastEnd { offset } => {
                    self.msg(format!("ERROR refcount block {i} is outside image"));
                    self.r.corruptions += 1;
                    out[i] = Block::At(offset);
                }
                RefTableEntry::Block(off) => {
                    out[i] = Block::At(off);
                    let c = off / self.cs;
                    self.inc(off, self.cs);
                    if self.computed[c as usize] != 1 {
                        self.msg(format!(
                            "ERROR refcount block {i} refcount={}",
                            self.computed[c as usize]
                        ));
                        self.r.corruptions += 1;
                        self.rebuild = true;
                    }
                }
            }
        }
        out
    }
}

/// How a refcount table entry can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Block {
    Absent,
    At(u64),
    /// Unaligned: QEMU fails to read refcounts through it.
    Unreadable,
}

/// On-disk refcounts of clusters [0, n), block by block; None where they cannot be read.
pub(super) fn disk_refcounts(
    st: &dyn Storage,
    h: &Header,
    blocks: &[Block],
    n: u64,
) -> Result<Vec<Option<u64>>> {
    let geo = h.geometry;
    let per = geo.refblock_entries();
    let mut out = vec![Some(0u64); n as usize];
    let mut buf = vec![0u8; geo.cluster_size() as usize];
    for (i, b) in blocks.iter().enumerate() {
        let first = i as u64 * per;
        if first >= n {
            break;
        }
        let count = per.min(n - first);
        match b {
            Block::Absent => {}
            Block::Unreadable => {
                for s in 0..count {
                    out[(first + s) as usize] = None;
                }
            }
            Block::At(off) => {
                st.read_at(&mut buf, *off)?;
                for s in 0..count {
                    out[(first + s) as usize] =
                        Some(refcount::get(&buf, geo.refcount_order, s as usize));
                }
            }
        }
    }
    Ok(out)
}

/// On-disk refcount of any cluster (also past the end of the file), through the table.
pub(super) struct RefLookup<'a> {
    pub(super) st: &'a dyn Storage,
    pub(super) h: &'a Header,
    pub(super) blocks: &'a [Block],
    pub(super) cache: std::collections::HashMap<usize, Vec<u8>>,
}

impl RefLookup<'_> {
    pub(super) fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
        let geo = self.h.geometry;
        let (bi, slot) = geo.refcount_slot(cluster);
        let Some(b) = self.blocks.get(bi as usize) else {
            return Ok(Some(0));
        };
        match *b {
            Block::Absent => Ok(Some(0)),
            Block::Unreadable => Ok(None),
            Block::At(off) => {
                if !self.cache.contains_key(&(bi as usize)) {
                    let mut buf = vec![0u8; geo.cluster_size() as usize];
                    self.st.read_at(&mut buf, off)?;
                    self.cache.insert(bi as usize, buf);
                }
                Ok(Some(refcount::get(
                    &self.cache[&(bi as usize)],
                    geo.refcount_order,
                    slot,
                )))
            }
        }
    }
}

/// Slots of one refcount block counting clusters past the end of the file.
pub(super) struct PastEof {
    /// Offset of the block.
    pub(super) block: u64,
    /// The cluster its slot 0 counts.
    pub(super) first: u64,
    /// Slots with a refcount above zero (ascending).
    pub(super) slots: Vec<u32>,
}

/// The refcount slots above zero that count clusters past the end of the file (`nb`
/// clusters). Each block is read once; blocks themselves past the end are errors elsewhere.
pub(super) fn counted_past_eof(
    st: &dyn Storage,
    h: &Header,
    blocks: &[Block],
    nb: u64,
) -> Result<Vec<PastEof>> {
    let geo = h.geometry;
    let per = geo.refblock_entries();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; geo.cluster_size() as usize];
    for (i, b) in blocks.iter().enumerate() {
        let first = i as u64 * per;
        let Block::At(off) = *b else { continue };
        if first + per <= nb || off / geo.cluster_size() >= nb || !seen.insert(off) {
            continue;
        }
        st.read_at(&mut buf, off)?;
        let slots: Vec<u32> = (nb.saturating_sub(first)..per)
            .filter(|&s| refcount::get(&buf, geo.refcount_order, s as usize) > 0)
            .map(|s| s as u32)
            .collect();
        if !slots.is_empty() {
            out.push(PastEof {
                block: off,
                first,
                slots,
            });
        }
    }
    Ok(out)
}

pub(super) fn new_checker<'a>(
    st: &'a dyn Storage,
    h: &'a Header,
    path: &Path,
) -> Result<Checker<'a>> {
    let cs = h.geometry.cluster_size();
    let file_len = st.len()?;
    let nb_clusters = file_len.div_ceil(cs);
    Ok(Checker {
        st,
        h,
        cs,
        file_len,
        nb_clusters,
        computed: vec![0; nb_clusters as usize],
        rebuild: false,
        r: CheckReport {
            filename: path.display().to_string(),
            format: "qcow2".into(),
            total_clusters: h.size.div_ceil(cs),
            ..Default::default()
        },
    })
}
