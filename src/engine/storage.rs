//! Where image bytes live. The engine talks to a `Storage`, never to a file directly, so the
//! same code runs on files and on in-memory storage in tests.

use crate::{Error, Result};

mod crash;
mod opener;
mod resident;
#[doc(hidden)]
pub use crash::{CrashStorage, Fault, OpKind};
pub use opener::{is_uri, opener_for, register_opener, Opener};
pub use resident::resident;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Byte-addressed storage under one image.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn path(&self) -> &Path;
    fn len(&self) -> Result<u64>;
    /// Fill `buf` from `off`; bytes past the end read as zeros (as QEMU's file driver does).
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()>;
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()>;
    /// Make everything written so far durable.
    fn sync(&self) -> Result<()>;
    fn set_len(&self, len: u64) -> Result<()>;
    /// Start of the next data at or after `off` (SEEK_DATA); None when only holes follow.
    fn seek_data(&self, off: u64) -> Result<Option<u64>>;
    /// Start of the next hole at or after `off` (SEEK_HOLE; the end of the file counts).
    fn seek_hole(&self, off: u64) -> Result<u64>;
    /// Data/hole status of the run at `off`; see [`file_status`].
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)>;
    /// Bytes the storage really takes (a file's allocated blocks); its length by default.
    fn allocated_bytes(&self) -> Result<u64> {
        self.len()
    }
    /// The open file, when the storage is one (for sending its bytes without copying them
    /// through memory, `sendfile(2)`).
    fn file(&self) -> Option<&File> {
        None
    }
    /// Start writing what was written so far to the disk, without waiting for it: a long
    /// write (a checkout) calls it as it goes, so that its closing [`Storage::sync`] has
    /// little left to wait for. A hint: storage without a disk ignores it.
    fn start_writeback(&self) -> Result<()> {
        Ok(())
    }
}

/// What the file system says of a byte range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileStatus {
    Data,
    Hole,
    /// At or past the end of the file.
    Eof,
}

/// Status of the run at `off` (at most `len` bytes), as QEMU's file driver reports it.
pub fn file_status(st: &dyn Storage, off: u64, len: u64) -> Result<(FileStatus, u64)> {
    st.status(off, len)
}

/// [`Storage::status`] from SEEK_DATA/SEEK_HOLE, without caching.
pub fn seek_status(st: &dyn Storage, off: u64, len: u64) -> Result<(FileStatus, u64)> {
    let flen = st.len()?;
    if off >= flen {
        return Ok((FileStatus::Eof, len));
    }
    let end = (off + len).min(flen);
    Ok(match st.seek_data(off)? {
        None => (FileStatus::Hole, end - off),
        Some(s) if s <= off => (
            FileStatus::Data,
            st.seek_hole(off)?.clamp(off + 1, end) - off,
        ),
        Some(s) => (FileStatus::Hole, s.min(end) - off),
    })
}

/// A plain file, read and written with pread/pwrite.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    /// Length of a file opened read-only, taken at open (base images do not change under
    /// their readers; a writer's length is always asked).
    fixed_len: Option<u64>,
    /// Data extents of a read-only file, scanned once on the first `status` call (None when
    /// the file has too many to keep).
    data_extents: std::sync::OnceLock<Option<Vec<(u64, u64)>>>,
}

impl FileStorage {
    pub fn open(path: &Path, write: bool) -> Result<Self> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        // Only regular files and block devices (an LVM volume as a base): a FIFO would block
        // the open, a character device or socket is no image. Looked at before opening (no
        // side effects of opening a device), and again on what was opened (no race).
        let refuse = |ft: std::fs::FileType| {
            let kind = if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else if ft.is_char_device() {
                "a character device"
            } else {
                return Ok(());
            };
            Err(Error::invalid(
                path,
                format!("is {kind}, not a regular file"),
            ))
        };
        if let Ok(m) = std::fs::metadata(path) {
            refuse(m.file_type())?;
        }
        // O_NONBLOCK: should a FIFO be swapped in meanwhile, opening it does not wait.
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        refuse(meta.file_type())?;
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .map_err(|e| Error::io(path, "fcntl", e.into()))?;
        let mut st = FileStorage {
            file,
            path: path.to_path_buf(),
            fixed_len: None,
            data_extents: std::sync::OnceLock::new(),
        };
        if !write {
            st.fixed_len = Some(st.len()?);
        }
        Ok(st)
    }

    pub fn create(path: &Path) -> Result<Self> {
        Self::create_with_mode(path, 0o666)
    }

    /// [`Self::create`] with the permission bits `mode` (before the umask): 0o600 for a file
    /// only its writer may see until it is renamed into place.
    pub fn create_with_mode(path: &Path, mode: u32) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        Ok(FileStorage {
            file,
            path: path.to_path_buf(),
            fixed_len: None,
            data_extents: std::sync::OnceLock::new(),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Most data extents a read-only file's scan keeps (16 bytes each).
const MAX_SCANNED_EXTENTS: usize = 4 << 20;

impl FileStorage {
    /// One pass of SEEK_DATA/SEEK_HOLE over the whole file: two calls per data extent, where
    /// answering block-status queries one by one costs up to three per query.
    fn scan_extents(&self, flen: u64) -> Result<Option<Vec<(u64, u64)>>> {
        let mut v = Vec::new();
        let mut off = 0;
        while off < flen {
            let Some(s) = self.seek_data(off)? else { break };
            if s >= flen {
                break;
            }
            let e = self.seek_hole(s)?.clamp(s + 1, flen);
            v.push((s, e));
            if v.len() > MAX_SCANNED_EXTENTS {
                return Ok(None);
            }
            off = e;
        }
        Ok(Some(v))
    }
}

impl Storage for FileStorage {
    fn path(&self) -> &Path {
        &self.path
    }
    fn file(&self) -> Option<&File> {
        Some(&self.file)
    }
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file: writeback of its dirty
    /// pages starts, and the call returns without waiting for it (it durably stores nothing
    /// by itself: metadata and the disk's cache are left to [`Storage::sync`]).
    fn start_writeback(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on a descriptor this storage owns; no memory is passed.
        let r = unsafe {
            nix::libc::sync_file_range(
                self.file.as_raw_fd(),
                0,
                0,
                nix::libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io(&self.path, "start writeback", e));
        }
        Ok(())
    }
    /// From the open file, never by path (which may name another file after a rename).
    fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let md = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "stat", e))?;
        Ok(md.blocks() * 512)
    }
    fn len(&self) -> Result<u64> {
        use std::io::{Seek, SeekFrom};
        if let Some(l) = self.fixed_len {
            return Ok(l);
        }
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
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)> {
        let Some(flen) = self.fixed_len else {
            return seek_status(self, off, len);
        };
        if off >= flen {
            return Ok((FileStatus::Eof, len));
        }
        let ex = match self.data_extents.get() {
            Some(e) => e,
            None => {
                let scanned = self.scan_extents(flen)?;
                self.data_extents.get_or_init(|| scanned)
            }
        };
        let Some(ex) = ex else {
            return seek_status(self, off, len);
        };
        let end = (off + len).min(flen);
        let i = ex.partition_point(|&(_, e)| e <= off);
        Ok(match ex.get(i) {
            Some(&(s, e)) if s <= off => (FileStatus::Data, e.min(end) - off),
            Some(&(s, _)) => (FileStatus::Hole, s.min(end) - off),
            None => (FileStatus::Hole, end - off),
        })
    }
    fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        use nix::unistd::{lseek, Whence};
        match lseek(&self.file, off as i64, Whence::SeekData) {
            Ok(s) => Ok(Some(s as u64)),
            Err(nix::errno::Errno::ENXIO) => Ok(None),
            // File systems without SEEK_DATA: everything is data.
            Err(nix::errno::Errno::EINVAL) => Ok(Some(off)),
            Err(e) => Err(Error::io(&self.path, "lseek(SEEK_DATA)", e.into())),
        }
    }
    fn seek_hole(&self, off: u64) -> Result<u64> {
        use nix::unistd::{lseek, Whence};
        match lseek(&self.file, off as i64, Whence::SeekHole) {
            Ok(s) => Ok(s as u64),
            Err(nix::errno::Errno::EINVAL) => self.len(),
            Err(e) => Err(Error::io(&self.path, "lseek(SEEK_HOLE)", e.into())),
        }
    }
}

/// Storage in memory: for tests and fuzzing, where no file should be touched.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: std::sync::RwLock<Vec<u8>>,
    path: PathBuf,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage {
            data: std::sync::RwLock::new(data),
            path: PathBuf::from("<memory>"),
        }
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for MemStorage {
    fn path(&self) -> &Path {
        &self.path
    }
    fn len(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let start = (off.min(d.len() as u64)) as usize;
        let n = (d.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&d[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> Result<()> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let end = off as usize + buf.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.data
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .resize(len as usize, 0);
        Ok(())
    }
    fn seek_data(&self, off: u64) -> Result<Option<u64>> {
        Ok((off < self.len()?).then_some(off))
    }
    fn seek_hole(&self, _off: u64) -> Result<u64> {
        self.len()
    }
    fn status(&self, off: u64, len: u64) -> Result<(FileStatus, u64)> {
        seek_status(self, off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writeback_started_then_synced_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let st = FileStorage::create(&dir.path().join("f")).unwrap();
        st.write_at(&[7u8; 8192], 4096).unwrap();
        st.start_writeback().unwrap();
        st.write_at(&[9u8; 4096], 0).unwrap();
        st.sync().unwrap();
        let mut b = vec![0u8; 12288];
        st.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 9) && b[4096..].iter().all(|&x| x == 7));
    }
}
