//! The guest disk as the inventory reads it: the chain's guest bytes, read-only; what the
//! layers above an unreachable base do not hold cannot be read and is counted, never invented.

use crate::engine::layer::{MapMode, Mapping};
use crate::engine::Image;
use std::cell::Cell;

/// The chain under inspection and what reading it met.
pub struct Disk {
    img: Image,
    len: u64,
    /// Reads that failed (a base that cannot be reached, an I/O error), and the first reason.
    failed: Cell<u64>,
    first_failure: std::cell::RefCell<Option<String>>,
    /// Bytes read, for the figures.
    read: Cell<u64>,
}

impl Disk {
    pub fn new(img: Image) -> Disk {
        let len = img.virtual_size();
        Disk {
            img,
            len,
            failed: Cell::new(0),
            first_failure: Default::default(),
            read: Cell::new(0),
        }
    }

    pub fn size(&self) -> u64 {
        self.len
    }

    pub fn image(&self) -> &Image {
        &self.img
    }

    /// `len` bytes at `off`; past the end of the disk is an error, as is a read the chain
    /// cannot answer.
    pub fn read(&self, off: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        self.read_into(off, &mut buf)?;
        Ok(buf)
    }

    pub fn read_into(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(format!(
                "read of {} bytes at {off} is past the end of the disk ({} bytes)",
                buf.len(),
                self.len
            ));
        }
        self.read.set(self.read.get() + buf.len() as u64);
        self.img.read_at(buf, off).map_err(|e| {
            let msg = e.to_string();
            self.failed.set(self.failed.get() + 1);
            self.first_failure
                .borrow_mut()
                .get_or_insert_with(|| msg.clone());
            msg
        })
    }

    /// Reads that failed, and the first reason.
    pub fn failures(&self) -> (u64, Option<String>) {
        (self.failed.get(), self.first_failure.borrow().clone())
    }

    pub fn bytes_read(&self) -> u64 {
        self.read.get()
    }

    /// The guest ranges the layers above the bottom one hold (a cache's and an instance's
    /// clusters), sorted and merged; None when the chain has one layer (nothing is cached).
    pub fn held(&self) -> crate::Result<Option<Vec<(u64, u64)>>> {
        let layers = self.img.layers();
        if layers.len() < 2 {
            return Ok(None);
        }
        let mode = MapMode {
            max_runs: usize::MAX,
            status: true,
            holes: false,
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for l in &layers[..layers.len() - 1] {
            let size = l.virtual_size().min(self.len);
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

/// ext4-view reads through the disk, within one partition. Its read-ahead may run into what
/// an offline cache lacks: then the first block it asked for is read alone and the rest left
/// as zeros, which its checksums refuse if it ever uses them.
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
        if self.disk.read_into(at, dst).is_ok() {
            return Ok(());
        }
        dst.fill(0);
        let first = (self.block as usize).min(dst.len());
        self.disk.read_into(at, &mut dst[..first])?;
        let mut pos = first;
        while pos < dst.len() {
            let n = (self.block as usize).min(dst.len() - pos);
            if self
                .disk
                .read_into(at + pos as u64, &mut dst[pos..pos + n])
                .is_err()
            {
                dst[pos..pos + n].fill(0);
            }
            pos += n;
        }
        Ok(())
    }
}
