//! A raw image: guest offset = file offset.

use super::image::ZeroNotes;
use super::storage::{file_status, FileStatus, Storage};
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
    pub fn path(&self) -> &Path {
        self.storage.path()
    }
    pub fn virtual_size(&self) -> u64 {
        self.size
    }
    pub fn storage(&self) -> &dyn Storage {
        &*self.storage
    }
    fn check(&self, off: u64, len: u64) -> Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::request(
                self.path(),
                format!("request {off:#x}+{len:#x} beyond the size {:#x}", self.size),
            ));
        }
        Ok(())
    }
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.check(off, buf.len() as u64)?;
        self.storage.read_at(buf, off)
    }
    /// [`Self::read_at`]; with `zeros`, holes of the file are not read (nor is `buf` touched
    /// there) but noted as (offset, length).
    pub(crate) fn read_noting_zeros(
        &self,
        buf: &mut [u8],
        off: u64,
        zeros: ZeroNotes,
    ) -> Result<()> {
        let Some(z) = zeros else {
            return self.read_at(buf, off);
        };
        self.check(off, buf.len() as u64)?;
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let (st, n) = file_status(&*self.storage, pos, end - pos)?;
            let n = n.min(end - pos);
            let dst = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
            if st == FileStatus::Data {
                self.storage.read_at(dst, pos)?;
            } else {
                z.push((pos, n));
            }
            pos += n;
        }
        Ok(())
    }
    pub fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::request(self.path(), "image is open read-only"));
        }
        self.check(off, buf.len() as u64)?;
        self.storage.write_at(buf, off)
    }
    pub fn flush(&self, durable: bool) -> Result<()> {
        if self.writable && durable {
            self.storage.sync()?;
        }
        Ok(())
    }
    /// (is data, length) of the run at `off`, from the file system's holes.
    pub fn block_status(&self, off: u64, len: u64) -> Result<(bool, u64)> {
        self.check(off, len)?;
        let (st, n) = file_status(&*self.storage, off, len)?;
        Ok((st == FileStatus::Data, n))
    }
}
