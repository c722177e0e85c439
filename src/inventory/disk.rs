//! The guest disk as the inventory reads it: the chain's guest bytes, read-only; what the
//! layers above an unreachable base do not hold cannot be read and is counted, never invented.

use crate::engine::layer::{MapMode, Mapping};
use crate::engine::Image;
use std::cell::{Cell, RefCell};

/// The chain under inspection and what reading it met.
pub struct Disk {
    img: Image,
    size: u64,
    /// Reads that failed (a base that cannot be reached, an I/O error), and the first reason.
    failed: Cell<u64>,
    first_failure: RefCell<Option<String>>,
    /// Disk ranges handed to ext4-view as zeros because they could not be read (its
    /// read-ahead past what an offline cache holds); whatever used them is unknown.
    zero_filled: RefCell<std::collections::BTreeMap<u64, u64>>,
}

impl Disk {
    pub fn new(img: Image) -> Disk {
        let size = img.virtual_size();
        Disk {
            img,
            size,
            failed: Cell::new(0),
            first_failure: Default::default(),
            zero_filled: Default::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// `len` bytes at `off`; past the end of the disk is an error, as is a read the chain
    /// cannot answer (counted).
    pub fn read(&self, off: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        self.read_into(off, &mut buf)?;
        Ok(buf)
    }

    pub fn read_into(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.try_read(off, buf).inspect_err(|msg| {
            self.failed.set(self.failed.get() + 1);
            self.first_failure
                .borrow_mut()
                .get_or_insert_with(|| msg.clone());
        })
    }

    /// [`Self::read_into`] without counting a failure (a speculative read).
    fn try_read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(format!(
                "read of {} bytes at {off} is past the end of the disk ({} bytes)",
                buf.len(),
                self.size
            ));
        }
        self.img.read_at(buf, off).map_err(|e| e.to_string())
    }

    /// Reads that failed, and the first reason.
    pub fn failures(&self) -> (u64, Option<String>) {
        (self.failed.get(), self.first_failure.borrow().clone())
    }

    /// Whether any of `ranges` (disk bytes) was handed out as zeros it could not read.
    pub fn zero_filled(&self, ranges: &[(u64, u64)]) -> bool {
        let z = self.zero_filled.borrow();
        // Kept merged: only the last range starting before `e` may reach past `s`.
        ranges
            .iter()
            .any(|&(s, e)| z.range(..e).next_back().is_some_and(|(_, &end)| end > s))
    }

    /// Note `[s, e)` as handed out as zeros, merged with its neighbours.
    fn note_zeros(&self, mut s: u64, mut e: u64) {
        let mut z = self.zero_filled.borrow_mut();
        let touching: Vec<(u64, u64)> = z
            .range(..=e)
            .rev()
            .take_while(|(_, &end)| end >= s)
            .map(|(&a, &b)| (a, b))
            .collect();
        for (a, b) in touching {
            z.remove(&a);
            s = s.min(a);
            e = e.max(b);
        }
        z.insert(s, e);
    }

    /// The guest ranges the cache holds, with the layers above it (an instance), sorted and
    /// merged: the layers down to the topmost one that is a vmicache cache, or, with none,
    /// all but the bottom one. None when the chain has one layer (nothing is cached).
    pub fn held(&self) -> crate::Result<Option<Vec<(u64, u64)>>> {
        let layers = self.img.layers();
        if layers.len() < 2 {
            return Ok(None);
        }
        let cache = layers
            .iter()
            .position(|l| l.layer().cache_meta().ok().flatten().is_some());
        let above_base = cache.map_or(layers.len() - 1, |i| i + 1);
        let mode = MapMode {
            max_runs: usize::MAX,
            status: true,
            holes: false,
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for l in &layers[..above_base] {
            let size = l.virtual_size().min(self.size);
            let mapped = l.layer().map(0, size, mode)?;
            for r in mapped.runs.iter().filter(|r| r.map != Mapping::Unallocated) {
                ranges.push((r.off, r.end()));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Ok(Some(merged))
    }
}

/// Bytes of `[start, end)` within the sorted, disjoint `ranges`.
pub fn overlap(ranges: &[(u64, u64)], start: u64, end: u64) -> u64 {
    let i = ranges.partition_point(|r| r.1 <= start);
    ranges[i..]
        .iter()
        .take_while(|r| r.0 < end)
        .map(|r| r.1.min(end) - r.0.max(start))
        .sum()
}

/// ext4-view reads through the disk, within one partition. Its read-ahead (up to 8 blocks) may
/// run into what an offline cache lacks: then the block it asked for is read alone (a failure
/// of that one is an error, counted) and the rest is handed out as zeros and recorded, so that
/// whatever ext4-view makes of them is reported unknown.
pub struct PartReader {
    pub disk: std::rc::Rc<Disk>,
    pub start: u64,
    pub len: u64,
    pub block: u64,
}

impl ext4_view::Ext4Read for PartReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        if start_byte
            .checked_add(dst.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(format!("read at {start_byte} is past the end of the partition").into());
        }
        let at = self.start + start_byte;
        if self.disk.try_read(at, dst).is_ok() {
            return Ok(());
        }
        let first = (self.block as usize).min(dst.len());
        self.disk.read_into(at, &mut dst[..first])?;
        let mut pos = first;
        while pos < dst.len() {
            let n = (self.block as usize).min(dst.len() - pos);
            let piece = &mut dst[pos..pos + n];
            if self.disk.try_read(at + pos as u64, piece).is_err() {
                piece.fill(0);
                let off = at + pos as u64;
                self.disk.note_zeros(off, off + n as u64);
            }
            pos += n;
        }
        Ok(())
    }
}
