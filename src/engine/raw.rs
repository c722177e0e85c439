//! A raw image: guest offset = file offset. A layer driver ([`Layer`]).

use super::layer::{BackingRead, Format, Layer, MapMode, Mapped, Mapping, Run};
use super::storage::{FileStatus, Storage};
use crate::{Error, Result};
use std::path::Path;

#[derive(Debug)]
pub struct Raw {
    storage: Box<dyn Storage>,
    size: u64,
    writable: bool,
}

impl Raw {
    pub(crate) fn open(storage: Box<dyn Storage>, writable: bool) -> Result<Raw> {
        let size = storage.len()?;
        Ok(Raw {
            storage,
            size,
            writable,
        })
    }
    fn check(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::out_of_range(
                self.path(),
                format!("request {off:#x}+{len:#x} beyond the size {:#x}", self.size),
            ));
        }
        Ok(())
    }
}

impl Layer for Raw {
    fn path(&self) -> &Path {
        self.storage.path()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    /// All data for reads (no lseek on the hot path); the file system's holes as zeros for
    /// block status and sparse reads.
    fn map(&self, off: u64, len: u64, mode: MapMode) -> Result<Mapped<'_>> {
        self.check(off, len)?;
        let mut runs = Vec::new();
        if !mode.holes {
            runs.push(Run {
                off,
                len,
                map: Mapping::Data { host: off },
            });
        }
        let end = off + len;
        let mut pos = off;
        while mode.holes && pos < end && runs.len() < mode.max_runs {
            let (st, n) = self.storage.status(pos, end - pos)?;
            let n = n.clamp(1, end - pos);
            let map = match st {
                FileStatus::Data => Mapping::Data { host: pos },
                FileStatus::Hole | FileStatus::Eof => Mapping::Zero { host: Some(pos) },
            };
            runs.push(Run {
                off: pos,
                len: n,
                map,
            });
            pos += n;
        }
        Ok(Mapped { runs, guard: None })
    }
    fn read_run(&self, dst: &mut [u8], run: &Run) -> Result<()> {
        match run.map {
            Mapping::Data { host } => self.storage.read_at(dst, host),
            _ => {
                dst.fill(0);
                Ok(())
            }
        }
    }
    fn write_at(&self, buf: &[u8], off: u64, _below: &dyn BackingRead) -> Result<()> {
        if !self.writable {
            return Err(Error::read_only(self.path(), "image is open read-only"));
        }
        self.check(off, buf.len() as u64)?;
        self.storage.write_at(buf, off)
    }
    fn write_zeroes(&self, off: u64, len: u64, below: &dyn BackingRead) -> Result<()> {
        super::layer::write_zero_bytes(off, len, |b, p| self.write_at(b, p, below))
    }
    fn stable(&self) -> bool {
        !self.writable
    }
    fn flush(&self, durable: bool) -> Result<()> {
        if self.writable && durable {
            self.storage.sync()?;
        }
        Ok(())
    }
}
