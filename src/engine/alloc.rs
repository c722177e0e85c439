//! Refcounts: the refcount table and a cache of refcount blocks, cluster allocation, and
//! growth of the refcount table.
//!
//! New refcount blocks are self-describing: a block is placed inside the range it covers and
//! counts itself, so no other block has to change to make it valid. Growing the table writes the
//! new table and its blocks in an area past everything allocated, syncs, then switches the
//! header in one write; the old table is freed after that.

use super::overlap::{MetaKind, MetaMap};
use super::storage::Storage;
use crate::format::header::Header;
use crate::format::refcount;
use crate::format::table;
use crate::format::types::Geometry;
use crate::{Error, Result};
use std::collections::{BTreeSet, HashMap};

struct Block {
    off: u64,
    data: Vec<u8>,
    dirty: bool,
}

pub(crate) struct Refcounts {
    geo: Geometry,
    table: Vec<u64>,
    /// Where the table is on disk until it is first needed: (offset, bytes). Readers that
    /// never look at refcounts (a read-only base) never load it.
    unloaded: Option<(u64, u64)>,
    table_dirty: BTreeSet<usize>,
    blocks: HashMap<u64, Block>,
    /// How many cached blocks are dirty.
    dirty_blocks: usize,
    /// No free cluster below this index.
    hint: u64,
    /// One past the highest cluster in the file or allocated by us.
    high_water: u64,
    /// Where the metadata lies, for writable images ([`Refcounts::enable_overlap_checks`]).
    overlap: Option<MetaMap>,
}

const OFFSET_MASK: u64 = table::OFFSET_MASK;

impl Refcounts {
    pub(crate) fn load(st: &dyn Storage, h: &Header) -> Result<Refcounts> {
        let geo = h.geometry;
        let bytes = u64::from(h.refcount_table_clusters) * geo.cluster_size();
        let len = st.len()?;
        Ok(Refcounts {
            geo,
            table: Vec::new(),
            unloaded: Some((h.refcount_table_offset, bytes)),
            table_dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            dirty_blocks: 0,
            hint: 0,
            high_water: geo.clusters_for(len),
            overlap: None,
        })
    }

    /// Map the image's metadata (header, L1 table `l1`, refcount table and blocks, the L2
    /// tables `l1` points at) so that no later write lands on it; an image whose metadata
    /// already overlaps, or whose metadata clusters are counted as free, is corrupt.
    pub(crate) fn enable_overlap_checks(
        &mut self,
        st: &dyn Storage,
        h: &Header,
        l1: &[u64],
    ) -> Result<()> {
        self.load_table(st)?;
        let geo = self.geo;
        let cs = geo.cluster_size();
        let span = |off: u64, bytes: u64| (off / cs, (off % cs + bytes).div_ceil(cs).max(1));
        let mut m = MetaMap::default();
        let add = |m: &mut MetaMap, (first, n): (u64, u64), kind| {
            m.insert(first, n, kind)
                .map_err(|what| Error::corrupt(st.path(), format!("metadata overlap: {what}")))
        };
        add(&mut m, (0, 1), MetaKind::Header)?;
        add(
            &mut m,
            span(h.l1_table_offset, u64::from(h.l1_size) * 8),
            MetaKind::L1,
        )?;
        add(
            &mut m,
            span(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            ),
            MetaKind::RefTable,
        )?;
        for &e in &self.table {
            use refcount::RefTableEntry as R;
            // Where a damaged entry points counts as metadata too (never written over).
            match R::decode(e, &self.geo, self.high_water) {
                R::Unused => {}
                R::Block(off)
                | R::Reserved { offset: off }
                | R::Unaligned { offset: off }
                | R::PastEnd { offset: off } => add(&mut m, span(off, cs), MetaKind::RefBlock)?,
            }
        }
        for &e in l1 {
            let off = e & OFFSET_MASK;
            if off != 0 {
                add(&mut m, span(off, cs), MetaKind::L2)?;
            }
        }
        // Metadata counted as free would be handed out again by the allocator.
        let clusters: Vec<(u64, MetaKind)> = m.map_iter().collect();
        for (c, kind) in clusters {
            if self.get(st, c)? == 0 {
                return Err(Error::corrupt(
                    st.path(),
                    format!(
                        "the {} at cluster {c} has refcount 0 (run `vmicache check`)",
                        kind.name()
                    ),
                ));
            }
        }
        self.overlap = Some(m);
        Ok(())
    }

    /// Note `n` new metadata clusters from `first` (a new L2 table).
    pub(crate) fn note_metadata(
        &mut self,
        st: &dyn Storage,
        first: u64,
        n: u64,
        kind: MetaKind,
    ) -> Result<()> {
        match &mut self.overlap {
            Some(m) => m
                .insert(first, n, kind)
                .map_err(|what| Error::corrupt(st.path(), format!("metadata overlap: {what}"))),
            None => Ok(()),
        }
    }

    /// Refuse a write of `len` bytes at host offset `off` that would land on metadata:
    /// `kind` None for guest data (no metadata at all), else every cluster must hold `kind`.
    pub(crate) fn check_write(
        &self,
        st: &dyn Storage,
        off: u64,
        len: u64,
        kind: Option<MetaKind>,
    ) -> Result<()> {
        let Some(m) = &self.overlap else {
            return Ok(());
        };
        let cb = self.geo.cluster_bits;
        let first = off >> cb;
        let n = ((off + len.max(1) - 1) >> cb) - first + 1;
        let bad = match kind {
            None => m
                .hit(first, n)
                .map(|(c, k)| format!("the {} at cluster {c}", k.name())),
            Some(k) => (first..first + n)
                .find(|&c| !m.is(c, k))
                .map(|c| match m.hit(c, 1) {
                    Some((_, have)) => format!("the {} at cluster {c}", have.name()),
                    None => format!("cluster {c}, which holds no {}", k.name()),
                }),
        };
        if let Some(at) = bad {
            let what = kind.map_or("guest data", MetaKind::name);
            return Err(Error::corrupt(
                st.path(),
                format!("metadata overlap: a write of {what} at host offset {off:#x} would land on {at}"),
            ));
        }
        Ok(())
    }

    pub(crate) fn high_water(&self) -> u64 {
        self.high_water
    }

    pub(crate) fn is_dirty(&self) -> bool {
        !self.table_dirty.is_empty() || self.dirty_blocks > 0
    }

    pub(crate) fn dirty_bytes(&self) -> usize {
        self.dirty_blocks * self.geo.cluster_size() as usize
    }

    /// Drop clean blocks when the cache holds more than `limit` bytes.
    pub(crate) fn shrink(&mut self, limit: usize) {
        if self.blocks.len() * self.geo.cluster_size() as usize > limit {
            self.blocks.retain(|_, b| b.dirty);
        }
    }

    /// Read the refcount table, the first time it is needed.
    fn load_table(&mut self, st: &dyn Storage) -> Result<()> {
        if let Some((off, bytes)) = self.unloaded {
            let mut b = vec![0u8; bytes as usize];
            st.read_at(&mut b, off)?;
            self.table = table::decode_table(&b);
            self.unloaded = None;
        }
        Ok(())
    }

    /// Load block `idx` (refcount table index); None when the table has no block there.
    fn block(&mut self, st: &dyn Storage, idx: u64) -> Result<Option<&mut Block>> {
        if !self.blocks.contains_key(&idx) {
            self.load_table(st)?;
            let Some(&e) = self.table.get(idx as usize) else {
                return Ok(None);
            };
            // The rule `check` applies too (format::refcount::RefTableEntry).
            let off = match refcount::RefTableEntry::decode(e, &self.geo, self.high_water) {
                refcount::RefTableEntry::Unused => return Ok(None),
                refcount::RefTableEntry::Block(off) => off,
                _ => {
                    return Err(Error::corrupt(
                        st.path(),
                        format!("refcount table entry {idx} ({e:#x}) is invalid"),
                    ))
                }
            };
            let mut data = vec![0u8; self.geo.cluster_size() as usize];
            st.read_at(&mut data, off)?;
            self.blocks.insert(
                idx,
                Block {
                    off,
                    data,
                    dirty: false,
                },
            );
        }
        Ok(self.blocks.get_mut(&idx))
    }

    pub(crate) fn get(&mut self, st: &dyn Storage, cluster: u64) -> Result<u64> {
        let (idx, slot) = self.geo.refcount_slot(cluster);
        let order = self.geo.refcount_order;
        Ok(match self.block(st, idx)? {
            None => 0,
            Some(b) => refcount::get(&b.data, order, slot),
        })
    }

    fn set(&mut self, st: &dyn Storage, cluster: u64, v: u64) -> Result<()> {
        let (idx, slot) = self.geo.refcount_slot(cluster);
        let order = self.geo.refcount_order;
        let path = st.path().to_path_buf();
        let b = self.block(st, idx)?.ok_or_else(|| {
            Error::corrupt(&path, format!("no refcount block for cluster {cluster}"))
        })?;
        refcount::set(&mut b.data, order, slot, v);
        if !b.dirty {
            b.dirty = true;
            self.dirty_blocks += 1;
        }
        Ok(())
    }

    /// Drop one reference to `cluster`.
    pub(crate) fn decrement(&mut self, st: &dyn Storage, cluster: u64) -> Result<()> {
        let v = self.get(st, cluster)?;
        if v == 0 {
            return Err(Error::corrupt(
                st.path(),
                format!("refcount of cluster {cluster} would drop below zero"),
            ));
        }
        self.set(st, cluster, v - 1)?;
        if v == 1 {
            self.hint = self.hint.min(cluster);
        }
        Ok(())
    }

    /// Allocate `n` contiguous free clusters with refcount 1; returns the first index.
    pub(crate) fn alloc(&mut self, st: &dyn Storage, h: &mut Header, n: u64) -> Result<u64> {
        if n == 0 || n >= self.geo.refblock_entries() {
            // A fresh run must fit between two self-describing refcount blocks.
            return Err(Error::request(
                st.path(),
                format!("cannot allocate {n} contiguous clusters at once"),
            ));
        }
        loop {
            let start = self.find_free(st, n)?;
            // Creating a block (and maybe growing the table, which moves it past everything
            // allocated) changes what is free: search again, until the run needs no new block.
            let mut created = false;
            let (first_rb, _) = self.geo.refcount_slot(start);
            let (last_rb, _) = self.geo.refcount_slot(start + n - 1);
            for rb in first_rb..=last_rb {
                if self.block(st, rb)?.is_none() {
                    self.create_block(st, h, rb)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            if let Some((c, kind)) = self.overlap.as_ref().and_then(|m| m.hit(start, n)) {
                return Err(Error::corrupt(
                    st.path(),
                    format!(
                        "metadata overlap: refcounts say cluster {c} is free, but it holds the {}",
                        kind.name()
                    ),
                ));
            }
            for c in start..start + n {
                self.set(st, c, 1)?;
            }
            if start == self.hint {
                self.hint = start + n;
            }
            self.high_water = self.high_water.max(start + n);
            return Ok(start);
        }
    }

    fn find_free(&mut self, st: &dyn Storage, n: u64) -> Result<u64> {
        let mut c = self.hint;
        let mut run = 0;
        let mut first_free = None;
        loop {
            if self.get(st, c)? == 0 {
                first_free.get_or_insert(c);
                run += 1;
                if run == n {
                    let start = c + 1 - n;
                    if let Some(f) = first_free {
                        self.hint = f;
                    }
                    return Ok(start);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
    }

    /// Create the refcount block for table index `idx`, placed in the range it covers and
    /// counting itself. Returns the block's cluster index.
    fn create_block(&mut self, st: &dyn Storage, h: &mut Header, idx: u64) -> Result<u64> {
        self.load_table(st)?;
        if idx as usize >= self.table.len() {
            self.grow_table(st, h, idx as usize + 1)?;
            if let Some(b) = self.block(st, idx)? {
                return Ok(b.off >> self.geo.cluster_bits);
            }
        }
        let per = self.geo.refblock_entries();
        let c = (idx * per).max(1);
        let mut data = vec![0u8; self.geo.cluster_size() as usize];
        refcount::set(
            &mut data,
            self.geo.refcount_order,
            (c - idx * per) as usize,
            1,
        );
        let off = c << self.geo.cluster_bits;
        self.note_metadata(st, c, 1, MetaKind::RefBlock)?;
        self.blocks.insert(
            idx,
            Block {
                off,
                data,
                dirty: true,
            },
        );
        self.dirty_blocks += 1;
        self.table[idx as usize] = off;
        self.table_dirty.insert(idx as usize);
        self.high_water = self.high_water.max(c + 1);
        Ok(c)
    }

    /// Grow the refcount table to at least `min` entries, moving it past everything allocated.
    fn grow_table(&mut self, st: &dyn Storage, h: &mut Header, min: usize) -> Result<()> {
        let cs = self.geo.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let per = self.geo.refblock_entries();
        let mut entries = min.max(self.table.len() * 2).div_ceil(per_cluster) * per_cluster;
        let start = self.high_water;
        loop {
            let tc = (entries / per_cluster) as u64;
            // New blocks for the table's own clusters, and for those blocks, after the table.
            let mut new_blocks: Vec<(u64, u64)> = Vec::new();
            let mut next = start + tc;
            let mut c = start;
            while c < next {
                let rb = c / per;
                let have = (rb as usize) < self.table.len() && self.table[rb as usize] != 0;
                if !have && !new_blocks.iter().any(|&(r, _)| r == rb) {
                    new_blocks.push((rb, next));
                    next += 1;
                }
                c += 1;
            }
            let max_rb = new_blocks
                .iter()
                .map(|&(r, _)| r as usize)
                .max()
                .unwrap_or(0);
            if max_rb >= entries || (next - 1) / per >= entries as u64 {
                entries += per_cluster;
                continue;
            }
            if entries as u64 * 8 > crate::format::header::MAX_REFTABLE_BYTES {
                return Err(Error::unsupported(
                    st.path(),
                    "image too large: refcount table would exceed 8 MiB",
                ));
            }
            // Switch in memory.
            let old_off = h.refcount_table_offset;
            let old_clusters = u64::from(h.refcount_table_clusters);
            self.note_metadata(st, start, tc, MetaKind::RefTable)?;
            for &(_, at) in &new_blocks {
                self.note_metadata(st, at, 1, MetaKind::RefBlock)?;
            }
            self.table.resize(entries, 0);
            for &(rb, at) in &new_blocks {
                self.blocks.insert(
                    rb,
                    Block {
                        off: at * cs,
                        data: vec![0u8; cs as usize],
                        dirty: true,
                    },
                );
                self.dirty_blocks += 1;
                self.table[rb as usize] = at * cs;
            }
            for c in start..next {
                self.set(st, c, 1)?;
            }
            self.high_water = self.high_water.max(next);
            // Blocks first, then the table, then the header that points at it.
            self.write_blocks(st)?;
            st.write_at(&table::encode_table(&self.table), start * cs)?;
            st.sync()?;
            h.refcount_table_offset = start * cs;
            h.refcount_table_clusters = tc as u32;
            super::header_io::write_header(st, h)?;
            st.sync()?;
            self.table_dirty.clear();
            if let Some(m) = &mut self.overlap {
                m.remove(old_off / cs, old_clusters);
            }
            for c in (old_off / cs)..(old_off / cs + old_clusters) {
                self.decrement(st, c)?;
            }
            return Ok(());
        }
    }

    fn write_blocks(&mut self, st: &dyn Storage) -> Result<()> {
        let mut dirty: Vec<(&u64, &mut Block)> =
            self.blocks.iter_mut().filter(|(_, b)| b.dirty).collect();
        dirty.sort_by_key(|(_, b)| b.off);
        for (_, b) in dirty {
            if let Some(m) = &self.overlap {
                if !m.is(b.off >> self.geo.cluster_bits, MetaKind::RefBlock) {
                    return Err(Error::corrupt(
                        st.path(),
                        format!(
                            "metadata overlap: refcount block at {:#x} is not where the refcount table says",
                            b.off
                        ),
                    ));
                }
            }
            st.write_at(&b.data, b.off)?;
            b.dirty = false;
            self.dirty_blocks -= 1;
        }
        Ok(())
    }

    /// Write dirty blocks, then the table entries that point at new blocks.
    pub(crate) fn write_dirty(&mut self, st: &dyn Storage, h: &Header) -> Result<()> {
        self.write_blocks(st)?;
        if !self.table_dirty.is_empty() {
            // A new block's contents must be on disk before the entry that points at it.
            st.sync()?;
            // An entry stays dirty until its write succeeded: a failed write is retried by
            // the next flush, never forgotten (the crash-ordering test found it was).
            let dirty: Vec<usize> = self.table_dirty.iter().copied().collect();
            for i in dirty {
                st.write_at(
                    &self.table[i].to_be_bytes(),
                    h.refcount_table_offset + i as u64 * 8,
                )?;
                self.table_dirty.remove(&i);
            }
        }
        Ok(())
    }
}
