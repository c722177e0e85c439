//! Metadata consistency check, counting as `qemu-img check` counts (block/qcow2-refcount.c):
//! rebuild every reference from the L1/L2 tables, snapshots and refcount structures, compare
//! with the refcounts on disk, and check the COPIED flags.
//!
//! A cluster whose on-disk refcount is below its references is a corruption; above is a leak.
//! `Repair::Leaks` lowers leaked refcounts, nothing else.

mod walk;

use super::storage::{FileStorage, Storage};
use crate::format::header::{self, Header};
use crate::format::refcount;
use crate::format::table::{self, COMPRESSED, COPIED, OFFSET_MASK};
use crate::{Error, Result};
use std::path::Path;
use walk::{counted_past_eof, disk_refcounts, new_checker, Block, PastEof, RefLookup};

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

/// The full picture of one pass.
struct Analysis {
    r: CheckReport,
    computed: Vec<u32>,
    disk: Vec<Option<u64>>,
    blocks: Vec<Block>,
    rebuild: bool,
    past_eof: Vec<PastEof>,
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
