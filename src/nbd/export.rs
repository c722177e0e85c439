//! What the server exports: the [`Export`] trait, and [`MemExport`], an in-memory export for
//! tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use super::proto;
use crate::engine::image::{push_run, SparseRun};
use crate::engine::Piece;
use crate::{Error, Result, Subject};

/// What the errors of a [`MemExport`] are about.
fn memory() -> Subject {
    Subject::Other("<memory>".into())
}

/// `base:allocation` status bit: the extent is not allocated.
pub const STATE_HOLE: u32 = proto::STATE_HOLE;
/// `base:allocation` status bit: the extent reads as zeroes.
pub const STATE_ZERO: u32 = proto::STATE_ZERO;

/// Something the server can export: a fixed-size array of bytes.
///
/// All methods may be called concurrently, from several worker threads of several
/// connections. The server checks every request against [`Export::size`] and
/// [`Export::read_only`] before calling the export, so implementations see only in-range
/// requests, and writes only when writable.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused (advertised to clients as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`; with `fua`, the data must be durable on return.
    fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// The client no longer needs `len` bytes at `offset`; may do nothing.
    fn trim(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes; `may_trim` allows deallocating them.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()>;
    /// Extents from `offset` covering at most `len` bytes: (length, flags) with
    /// [`STATE_HOLE`] = 1 and [`STATE_ZERO`] = 2. Fewer bytes than `len` may be described
    /// (at least one extent); adjacent extents with equal flags are merged by the server.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>>;

    /// Preferred I/O size advertised in `NBD_INFO_BLOCK_SIZE` (a power of two between
    /// 512 and 32 MiB, e.g. the cluster size); 4096 unless overridden.
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// A human-readable description for `NBD_INFO_DESCRIPTION`; none unless overridden.
    fn description(&self) -> Option<String> {
        None
    }
    /// The bytes at `offset` as pieces (zero runs, bytes, ranges of files that do not change
    /// while open) that the server sends as they are, file ranges by `sendfile(2)` without
    /// copying them through memory; `None` (the default): the server reads with
    /// [`Export::read_sparse`] instead.
    fn read_pieces(&self, _offset: u64, _len: u64) -> Result<Option<Vec<Piece<'_>>>> {
        Ok(None)
    }
    /// [`Export::read_pieces`] when the export can answer from memory and local files alone,
    /// quickly: the server then answers the read on the thread that read it, with no hand-off.
    /// `None` (the default): not now.
    fn read_pieces_local(&self, _offset: u64, _len: u64) -> Result<Option<Vec<Piece<'_>>>> {
        Ok(None)
    }
    /// Fills `buf` from `offset` as [`Export::read`] does and says which parts are known to
    /// read as zeroes: consecutive runs covering `buf`; the zero runs
    /// of `buf` need not be written (the server hands in zeroes). The server sends zero runs
    /// as `NBD_REPLY_TYPE_OFFSET_HOLE` chunks instead of bytes. The default reads everything
    /// and takes the runs from [`Export::block_status`] (all data if that fails: the bytes
    /// were read).
    fn read_sparse(&self, buf: &mut [u8], offset: u64) -> Result<Vec<SparseRun>> {
        self.read(buf, offset)?;
        let mut runs: Vec<SparseRun> = Vec::new();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let before = pos;
            let Ok(extents) = self.block_status(pos, end - pos) else {
                return Ok(vec![SparseRun {
                    len: buf.len() as u64,
                    zero: false,
                }]);
            };
            for (l, flags) in extents {
                let l = l.min(end - pos);
                if l > 0 {
                    push_run(&mut runs, l, flags & STATE_ZERO != 0);
                    pos += l;
                }
            }
            if pos == before {
                // An export that describes nothing: the rest may hold data.
                push_run(&mut runs, end - pos, false);
                break;
            }
        }
        Ok(runs)
    }
}

/// Allocation granularity of [`MemExport`].
pub const MEM_BLOCK: u64 = 64 << 10;

/// State of one [`MEM_BLOCK`] of a [`MemExport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockState {
    /// Never written (or trimmed): reads as zeroes, reported as hole + zero.
    Hole,
    /// Allocated but known to be zero (written with `write_zeroes` without trimming).
    Zero,
    /// Written data.
    Data,
}

struct MemInner {
    bytes: Vec<u8>,
    blocks: Vec<BlockState>,
}

/// An in-memory export for tests: a `Vec<u8>` behind a `RwLock`, with allocation tracked per
/// 64 KiB block so that `block_status` reports holes and data.
///
/// Writes allocate the blocks they touch; `trim` and `write_zeroes` (when trimming is
/// allowed) deallocate the blocks they cover entirely; `write_zeroes` without trimming leaves
/// allocated zero blocks. Flushes are counted ([`MemExport::flushes`]).
pub struct MemExport {
    inner: RwLock<MemInner>,
    read_only: bool,
    flushes: AtomicU64,
}

impl MemExport {
    /// A writable export of `size` zero bytes, entirely unallocated.
    pub fn new(size: u64) -> MemExport {
        let len = usize::try_from(size).expect("MemExport size fits in memory");
        let nblocks = len.div_ceil(MEM_BLOCK as usize);
        MemExport {
            inner: RwLock::new(MemInner {
                bytes: vec![0; len],
                blocks: vec![BlockState::Hole; nblocks],
            }),
            read_only: false,
            flushes: AtomicU64::new(0),
        }
    }

    /// A writable export holding `bytes`; blocks that are all zero are left unallocated.
    pub fn from_vec(bytes: Vec<u8>) -> MemExport {
        let blocks = bytes
            .chunks(MEM_BLOCK as usize)
            .map(|b| {
                if b.iter().all(|&x| x == 0) {
                    BlockState::Hole
                } else {
                    BlockState::Data
                }
            })
            .collect();
        MemExport {
            inner: RwLock::new(MemInner { bytes, blocks }),
            read_only: false,
            flushes: AtomicU64::new(0),
        }
    }

    /// The same export, read-only (or writable) for clients.
    pub fn with_read_only(mut self, read_only: bool) -> MemExport {
        self.read_only = read_only;
        self
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock_read().bytes.clone()
    }

    /// How many times [`Export::flush`] was called.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn lock_read(&self) -> std::sync::RwLockReadGuard<'_, MemInner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_write(&self) -> std::sync::RwLockWriteGuard<'_, MemInner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// `offset..offset+len` as indices into the byte vector, or a request error.
    fn range(&self, len_total: usize, offset: u64, len: u64) -> Result<(usize, usize)> {
        let end = offset.checked_add(len);
        match end {
            Some(end) if end <= len_total as u64 => Ok((offset as usize, end as usize)),
            _ => Err(Error::out_of_range(
                memory(),
                format!("request {offset}+{len} beyond the end ({len_total} bytes)"),
            )),
        }
    }

    /// Zeroes `start..end` and sets the state of the blocks it touches: blocks covered
    /// entirely become `full`, partly covered ones `partial` (or keep their state when
    /// `partial` is `None`).
    fn zero_range(
        inner: &mut MemInner,
        start: usize,
        end: usize,
        full: BlockState,
        partial: Option<BlockState>,
    ) {
        inner.bytes[start..end].fill(0);
        if start == end {
            return;
        }
        let bs = MEM_BLOCK as usize;
        let len_total = inner.bytes.len();
        for b in start / bs..=(end - 1) / bs {
            let (bstart, bend) = (b * bs, ((b + 1) * bs).min(len_total));
            if start <= bstart && bend <= end {
                inner.blocks[b] = full;
            } else if let Some(p) = partial {
                if inner.blocks[b] == BlockState::Hole {
                    inner.blocks[b] = p;
                }
            }
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::read_only(memory(), "write to a read-only export"));
        }
        Ok(())
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.lock_read().bytes.len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let inner = self.lock_read();
        let (start, end) = self.range(inner.bytes.len(), offset, buf.len() as u64)?;
        buf.copy_from_slice(&inner.bytes[start..end]);
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        self.check_writable()?;
        let mut inner = self.lock_write();
        let (start, end) = self.range(inner.bytes.len(), offset, buf.len() as u64)?;
        inner.bytes[start..end].copy_from_slice(buf);
        if start < end {
            let bs = MEM_BLOCK as usize;
            for b in start / bs..=(end - 1) / bs {
                inner.blocks[b] = BlockState::Data;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let mut inner = self.lock_write();
        let (start, end) = self.range(inner.bytes.len(), offset, len)?;
        // Only whole blocks are discarded; the bytes of partly covered blocks stay.
        let bs = MEM_BLOCK as usize;
        let (first, last) = (start.div_ceil(bs) * bs, (end / bs) * bs);
        let last = if end == inner.bytes.len() { end } else { last };
        if first < last {
            Self::zero_range(&mut inner, first, last, BlockState::Hole, None);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.check_writable()?;
        let mut inner = self.lock_write();
        let (start, end) = self.range(inner.bytes.len(), offset, len)?;
        let full = if may_trim {
            BlockState::Hole
        } else {
            BlockState::Zero
        };
        // A partly zeroed hole stays all zeroes; a partly zeroed data block stays data.
        Self::zero_range(&mut inner, start, end, full, None);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>> {
        let inner = self.lock_read();
        let (start, end) = self.range(inner.bytes.len(), offset, len)?;
        let bs = MEM_BLOCK as usize;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let b = pos / bs;
            let next = ((b + 1) * bs).min(end);
            let flags = match inner.blocks[b] {
                BlockState::Hole => STATE_HOLE | STATE_ZERO,
                BlockState::Zero => STATE_ZERO,
                BlockState::Data => 0,
            };
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += (next - pos) as u64,
                _ => out.push(((next - pos) as u64, flags)),
            }
            pos = next;
        }
        Ok(out)
    }

    fn description(&self) -> Option<String> {
        Some("vmicache in-memory export".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A [`MemExport`] whose block status always fails.
    struct NoStatus(MemExport);

    impl Export for NoStatus {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            self.0.read(buf, offset)
        }
        fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
            self.0.write(buf, offset, fua)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
        fn trim(&self, offset: u64, len: u64) -> Result<()> {
            self.0.trim(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
            self.0.write_zeroes(offset, len, may_trim)
        }
        fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<(u64, u32)>> {
            Err(Error::refused(memory(), "no block status"))
        }
    }

    #[test]
    fn default_read_sparse_finds_holes_or_says_data() {
        let mut data = vec![7u8; 3 * MEM_BLOCK as usize];
        data[MEM_BLOCK as usize..2 * MEM_BLOCK as usize].fill(0);
        let m = MemExport::from_vec(data.clone());
        let mut buf = vec![0u8; data.len()];
        let runs = m.read_sparse(&mut buf, 0).unwrap();
        let r = |len, zero| SparseRun { len, zero };
        assert_eq!(
            runs,
            vec![r(MEM_BLOCK, false), r(MEM_BLOCK, true), r(MEM_BLOCK, false)]
        );
        assert!(buf == data);
        // Without block status the bytes read still go out, as data.
        let n = NoStatus(MemExport::from_vec(data.clone()));
        let mut buf = vec![0u8; data.len()];
        assert_eq!(
            n.read_sparse(&mut buf, 0).unwrap(),
            vec![r(3 * MEM_BLOCK, false)]
        );
        assert!(buf == data);
    }

    #[test]
    fn mem_export_tracks_allocation() {
        let m = MemExport::new(4 * MEM_BLOCK);
        assert_eq!(
            m.block_status(0, 4 * MEM_BLOCK).unwrap(),
            vec![(4 * MEM_BLOCK, STATE_HOLE | STATE_ZERO)]
        );
        m.write(&[1; 10], MEM_BLOCK + 5, false).unwrap();
        m.write_zeroes(2 * MEM_BLOCK, MEM_BLOCK, false).unwrap();
        assert_eq!(
            m.block_status(0, 4 * MEM_BLOCK).unwrap(),
            vec![
                (MEM_BLOCK, STATE_HOLE | STATE_ZERO),
                (MEM_BLOCK, 0),
                (MEM_BLOCK, STATE_ZERO),
                (MEM_BLOCK, STATE_HOLE | STATE_ZERO),
            ]
        );
        m.trim(MEM_BLOCK, MEM_BLOCK).unwrap();
        let mut buf = [9u8; 16];
        m.read(&mut buf, MEM_BLOCK).unwrap();
        assert_eq!(buf, [0; 16]);
        assert!(m.read(&mut buf, 4 * MEM_BLOCK - 8).is_err());
    }
}
