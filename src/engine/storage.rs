//! Where image bytes live. The engine talks to a `Storage`, never to a file directly, so the
//! same code runs on files and on in-memory storage in tests.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Byte-addressed storage under one image.
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn path(&self) -> &Path;
    fn len(&self) -> Result<u64>;
    /// Fill `buf` from `off`; bytes past the end read as zeros (as QEMU's file driver does).
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()>;
    /// Make everything written so far durable.
    fn sync(&self) -> Result<()>;
    fn set_len(&self, len: u64) -> Result<()>;
    /// Next (data start, data end) at or after `off`, from the file system's view of holes;
    /// None when only holes follow.
    fn next_data(&self, off: u64) -> Result<Option<(u64, u64)>>;
}

/// A plain file, read and written with pread/pwrite.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
}

impl FileStorage {
    pub fn open(path: &Path, write: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        if meta.is_dir() {
            return Err(Error::invalid(path, "is a directory"));
        }
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> Result<u64> {
        use std::io::{Seek, SeekFrom};
        // Block devices report 0 in metadata; seeking to the end works for both.
        let mut f = &self.file;
        f.seek(SeekFrom::End(0))
            .map_err(|e| Error::io(&self.path, "seek", e))
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, "read", e)),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io(&self.path, "write", e))
    }
    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io(&self.path, "fdatasync", e))
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(&self.path, "truncate", e))
    }
    fn next_data(&self, off: u64) -> Result<Option<(u64, u64)>> {
        use nix::unistd::{lseek, Whence};
        let len = self.len()?;
        if off >= len {
            return Ok(None);
        }
        let start = match lseek(&self.file, off as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => return Ok(None),
            // File systems without SEEK_DATA: everything is data.
            Err(nix::errno::Errno::EINVAL) => return Ok(Some((off, len))),
            Err(e) => return Err(Error::io(&self.path, "lseek(SEEK_DATA)", e.into())),
        };
        let end = match lseek(&self.file, start as i64, Whence::SeekHole) {
            Ok(s) => s as u64,
            Err(e) => return Err(Error::io(&self.path, "lseek(SEEK_HOLE)", e.into())),
        };
        Ok(Some((start, end.min(len))))
    }
}
