//! Metadata consistency check, counting as `qemu-img check` counts (block/qcow2-refcount.c):
//! rebuild every reference from the L1/L2 tables, snapshots and refcount structures, compare
//! with the refcounts on disk, and check the COPIED flags.
//!
//! A cluster whose on-disk refcount is below its references is a corruption; above is a leak.
//! `Repair::Leaks` lowers leaked refcounts, nothing else.

use super::storage::{FileStorage, Storage};
use crate::format::header::{self, Header, MAX_L1_BYTES};
use crate::format::refcount::{self, RefTableEntry};
use crate::format::table::{
    self, COMPRESSED, COPIED, L1_RESERVED, L2_STD_RESERVED, OFFSET_MASK, ZERO,
};
use crate::format::{be_u16, be_u32, be_u64};
use crate::{Error, Result};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    Leaks,
}

/// Result of a check, with the fields of `qemu-img check --output=json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: String,
    pub check_errors: u64,
    pub image_end_offset: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// One line per finding, in the words qemu-img uses.
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    /// 0 clean, 2 corruptions, 3 leaks only, 1 if the check could not complete (as qemu-img).
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

struct Checker<'a> {
    st: &'a dyn Storage,
    h: &'a Header,
    cs: u64,
    file_len: u64,
    nb_clusters: u64,
    computed: Vec<u32>,
    /// Refcount structures are broken beyond what leak repair may fix.
    rebuild: bool,
    r: CheckReport,
}

impl Checker<'_> {
    fn msg(&mut self, s: String) {
        self.r.messages.push(s);
    }

    /// Count a reference to the byte range; refuse ranges a cluster or more past EOF.
    fn inc(&mut self, off: u64, size: u64) {
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

    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        self.st.read_at(&mut b, off)?;
        Ok(b)
    }

    fn check_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) -> Result<()> {
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

    fn check_snapshots(&mut self) -> Result<()> {
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
    fn check_refblocks(&mut self, reftable: &[u64]) -> Vec<Block> {
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
enum Block {
    Absent,
    At(u64),
    /// Unaligned: QEMU fails to read refcounts through it.
    Unreadable,
}

/// On-disk refcounts of clusters [0, n), block by block; None where they cannot be read.
fn disk_refcounts(
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
struct RefLookup<'a> {
    st: &'a dyn Storage,
    h: &'a Header,
    blocks: &'a [Block],
    cache: std::collections::HashMap<usize, Vec<u8>>,
}

impl RefLookup<'_> {
    fn get(&mut self, cluster: u64) -> Result<Option<u64>> {
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

/// The full picture of one pass.
struct Analysis {
    r: CheckReport,
    computed: Vec<u32>,
    disk: Vec<Option<u64>>,
    blocks: Vec<Block>,
    rebuild: bool,
    past_eof: Vec<PastEof>,
}

/// Slots of one refcount block counting clusters past the end of the file.
struct PastEof {
    /// Offset of the block.
    block: u64,
    /// The cluster its slot 0 counts.
    first: u64,
    /// Slots with a refcount above zero (ascending).
    slots: Vec<u32>,
}

/// The refcount slots above zero that count clusters past the end of the file (`nb`
/// clusters). Each block is read once; blocks themselves past the end are errors elsewhere.
fn counted_past_eof(
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

/// Check the qcow2 image at `path` (the image alone, not its backing files).
pub fn check(path: &Path, repair: Repair) -> Result<CheckReport> {
    let st = FileStorage::open(path, repair != Repair::None)?;
    if repair != Repair::None {
        // Never repair an image another process (a server, a QEMU) has open for writing: its
        // counted-but-unlinked clusters would look leaked.
        super::lock::lock(st.file(), path, super::lock::LockMode::Write)?;
    }
    let h = crate::engine::header_io::read_header(&st)?;
    if h.autoclear & header::autoclear::BITMAPS != 0 && h.has_extension(header::ext_kind::BITMAPS) {
        return Err(Error::unsupported(path, "persistent dirty bitmaps (check)"));
    }
    let first = analyze(&st, &h, path)?;
    if repair == Repair::None {
        return Ok(first.r);
    }
    if first.rebuild {
        return Err(Error::corrupt(
            path,
            "ERROR need to rebuild refcount structures: refcounts below their references or broken refcount blocks cannot be repaired as leaks (nothing was changed)",
        ));
    }
    if first.r.leaks == 0 {
        return Ok(first.r);
    }
    let mut fixed = 0;
    let mut buf = vec![0u8; h.geometry.cluster_size() as usize];
    for p in &first.past_eof {
        st.read_at(&mut buf, p.block)?;
        for &slot in &p.slots {
            refcount::set(&mut buf, h.geometry.refcount_order, slot as usize, 0);
        }
        st.write_at(&buf, p.block)?;
        fixed += p.slots.len() as u64;
    }
    // Lower leaked refcounts, then check again and report what the second pass sees.
    let per = h.geometry.refblock_entries();
    let nb = first.computed.len() as u64;
    let mut messages: Vec<String> = first
        .r
        .messages
        .iter()
        .filter(|m| m.starts_with("Leaked cluster") || m.starts_with("ERROR cluster"))
        .cloned()
        .collect();
    for (bi, b) in first.blocks.iter().enumerate() {
        let Block::At(off) = *b else { continue };
        let first_c = bi as u64 * per;
        if first_c >= nb {
            break;
        }
        st.read_at(&mut buf, off)?;
        let mut dirty = false;
        for s in 0..per.min(nb - first_c) {
            let i = (first_c + s) as usize;
            let want = u64::from(first.computed[i]);
            if let Some(d) = first.disk[i] {
                if d > want {
                    messages.push(format!(
                        "Repairing cluster {i} refcount={d} reference={want}"
                    ));
                    refcount::set(&mut buf, h.geometry.refcount_order, s as usize, want);
                    dirty = true;
                    fixed += 1;
                }
            }
        }
        if dirty {
            st.write_at(&buf, off)?;
        }
    }
    st.sync()?;
    let mut second = analyze(&st, &h, path)?.r;
    second.leaks_fixed = fixed;
    messages.append(&mut second.messages);
    second.messages = messages;
    Ok(second)
}

/// Above this many clusters in the file, opening for writing checks only the metadata's own
/// layout and refcounts (`Refcounts::enable_overlap_checks`), not every reference: the full
/// count needs 4 bytes per cluster.
const OPEN_CHECK_MAX_CLUSTERS: u64 = 1 << 22;

/// Refuse to write an image that `check` finds corrupt (or cannot check): a write through
/// damaged refcounts or tables can land on metadata or on another offset's data. Leaks are
/// fine (what a crash leaves). Run when an image is opened for writing.
pub(crate) fn refuse_if_corrupt(st: &dyn Storage, h: &Header, path: &Path) -> Result<()> {
    if st.len()?.div_ceil(h.geometry.cluster_size()) > OPEN_CHECK_MAX_CLUSTERS {
        return Ok(());
    }
    let a = analyze(st, h, path)?;
    let bad = a.r.corruptions + a.r.check_errors;
    if bad > 0 {
        let first =
            a.r.messages
                .iter()
                .find(|m| m.starts_with("ERROR") || m.starts_with("Can't"))
                .map(|m| format!(" (first: {m})"))
                .unwrap_or_default();
        return Err(Error::corrupt(
            path,
            format!(
                "{bad} errors in its metadata{first}: refusing to open it for writing (it can still be read; `vmicache check` lists them, `qemu-img check -r all` repairs)"
            ),
        ));
    }
    Ok(())
}

fn new_checker<'a>(st: &'a dyn Storage, h: &'a Header, path: &Path) -> Result<Checker<'a>> {
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

fn analyze(st: &dyn Storage, h: &Header, path: &Path) -> Result<Analysis> {
    let cs = h.geometry.cluster_size();
    let mut c = new_checker(st, h, path)?;
    let reftable = table::decode_table(&c.read(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    )?);
    c.inc(0, c.cs);
    c.check_l1(h.l1_table_offset, u64::from(h.l1_size), true)?;
    c.check_snapshots()?;
    c.inc(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    let blocks = c.check_refblocks(&reftable);
    let disk = disk_refcounts(st, h, &blocks, c.nb_clusters)?;
    // As QEMU (compare_refcounts): the highest cluster starts at 0, so the image end offset
    // is at least one cluster.
    let mut highest = 0u64;
    let computed = std::mem::take(&mut c.computed);
    for (i, (&d, &r)) in disk.iter().zip(&computed).enumerate() {
        let r = u64::from(r);
        let Some(d) = d else {
            c.msg(format!(
                "Can't get refcount for cluster {i}: Input/output error"
            ));
            c.r.check_errors += 1;
            continue;
        };
        if d > 0 || r > 0 {
            highest = i as u64;
        }
        if d == r {
            continue;
        }
        if d < r {
            c.msg(format!("ERROR cluster {i} refcount={d} reference={r}"));
            c.r.corruptions += 1;
            if d == 0 {
                c.rebuild = true;
            }
        } else {
            c.msg(format!("Leaked cluster {i} refcount={d} reference={r}"));
            c.r.leaks += 1;
        }
    }
    c.r.image_end_offset = (highest + 1) * cs;
    // Clusters counted past the end of the file: a crash after clusters were counted and
    // before their data was written leaves them. Nothing may refer to them (a reference past
    // the end is an error above), so they are leaks. qemu-img check does not look there, and
    // an allocator that trusts the counts never reuses them: after the image grows they show
    // up as leaks that no repair before could have reclaimed.
    // (Only on an otherwise sound image: on a damaged one, counts past the end may belong to
    // references past the end, which are reported as corruptions, as qemu-img does.)
    let past_eof = if c.rebuild || c.r.corruptions > 0 || c.r.check_errors > 0 {
        Vec::new()
    } else {
        counted_past_eof(st, h, &blocks, c.nb_clusters)?
    };
    for p in &past_eof {
        let n = p.slots.len() as u64;
        let first = p.first + u64::from(p.slots[0]);
        let last = p.first + u64::from(p.slots[p.slots.len() - 1]);
        c.msg(format!(
            "Leaked clusters past the end of the image: {n} between {first} and {last} (refcount above 0, no reference)"
        ));
        c.r.leaks += n;
    }
    // COPIED flags of the active tables, against the on-disk refcounts.
    let mut rc = RefLookup {
        st,
        h,
        blocks: &blocks,
        cache: Default::default(),
    };
    let l1 = table::decode_table(&c.read(h.l1_table_offset, u64::from(h.l1_size) * 8)?);
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if let Some(n) = rc.get(l2 / cs)? {
            if (n == 1) != (e & COPIED != 0) {
                c.msg(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={n}"
                ));
                c.r.corruptions += 1;
            }
        }
        let t = table::decode_table(&c.read(l2, cs)?);
        for &x in &t {
            if x & COMPRESSED != 0 {
                continue;
            }
            let off = x & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let Some(n) = rc.get(off / cs)? else { continue };
            if (n == 1) != (x & COPIED != 0) {
                c.msg(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={x:x} refcount={n}"
                ));
                c.r.corruptions += 1;
            }
        }
    }
    let rebuild = c.rebuild;
    Ok(Analysis {
        r: c.r,
        computed,
        disk,
        blocks,
        rebuild,
        past_eof,
    })
}
