//! Reading guest bytes: this layer's own clusters, then the backing file for the rest.

use super::{Qcow2, Source};
use crate::engine::image::ZeroNotes;
use crate::format::compress;
use crate::format::types::HostOffset;
use crate::{Error, Result};

/// A filter over the reads of one layer (copy-on-read, `crate::engine::cor`), installed from
/// above with [`Qcow2::set_read_filter`]; the driver calls it and knows nothing else of it.
pub(crate) trait ReadFilter: Send + Sync {
    /// A read request reached this layer; `miss`: some of it is unallocated here.
    fn request(&self, miss: bool);
    /// Read `dst` at guest offset `pos`, a run unallocated here when the read was planned
    /// (without the metadata lock or the I/O gate held).
    fn read_unallocated(&self, q: &Qcow2, dst: &mut [u8], pos: u64) -> Result<()>;
    /// For finding the filter's own type again.
    fn as_any(&self) -> &dyn std::any::Any;
}

impl Qcow2 {
    /// Install the read filter; it stays for the life of the image. Gives it back when one
    /// is installed already.
    pub(crate) fn set_read_filter(
        &self,
        f: Box<dyn ReadFilter>,
    ) -> std::result::Result<(), Box<dyn ReadFilter>> {
        self.filter.set(f)
    }

    /// The read filter, when one is installed.
    pub(crate) fn read_filter(&self) -> Option<&dyn ReadFilter> {
        self.filter.get().map(|f| &**f)
    }

    /// Read guest bytes through this layer and its backing chain (filling this layer from
    /// the backing file when copy-on-read is on).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.read_noting_zeros(buf, off, None)
    }

    /// [`Self::read_at`], also noting in `zeros` the (offset, length) ranges that metadata
    /// proves zero (zero clusters here or below, holes of a raw base), in no particular order;
    /// those ranges of `buf` are then left as they were. What copy-on-read fetches is data,
    /// whatever it holds.
    pub(crate) fn read_noting_zeros(
        &self,
        buf: &mut [u8],
        off: u64,
        mut zeros: ZeroNotes,
    ) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        let (plan, gate) = {
            let mut m = self.lock();
            self.maybe_shrink(&mut m)?;
            let plan = self.plan(&mut m, off, buf.len() as u64)?;
            (plan, self.gate(&mut m))
        };
        let filter = self.filter.get();
        if let Some(f) = filter {
            f.request(plan.iter().any(|p| p.2 == Source::Backing));
        }
        // This layer's own pieces under the gate, then (without it) what comes from below.
        self.read_local(buf, off, &plan, zeros.is_none())?;
        drop(gate);
        for &(pos, n, src) in &plan {
            let dst = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
            match (src, filter) {
                (Source::Backing, Some(f)) => f.read_unallocated(self, dst, pos)?,
                (Source::Backing, None) => {
                    self.read_backing_noting(dst, pos, zeros.as_deref_mut())?
                }
                (Source::Zero, _) => {
                    if let Some(z) = zeros.as_deref_mut() {
                        z.push((pos, n));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Read `dst` at `pos` as it is now: this layer's clusters, what is unallocated here from
    /// the backing file, never through the read filter (the filter's own reads).
    pub(crate) fn read_unfiltered(&self, dst: &mut [u8], pos: u64) -> Result<()> {
        let (plan, gate) = {
            let mut m = self.lock();
            let plan = self.plan(&mut m, pos, dst.len() as u64)?;
            (plan, self.gate(&mut m))
        };
        self.read_local(dst, pos, &plan, true)?;
        drop(gate);
        for (q, n, src) in plan {
            if src == Source::Backing {
                let d = &mut dst[(q - pos) as usize..(q - pos + n) as usize];
                self.read_backing(d, q)?;
            }
        }
        Ok(())
    }

    /// The pieces of `plan` (for `buf` at guest offset `off`) that this layer holds (zero
    /// clusters only with `fill_zeros`); the caller holds the I/O gate.
    fn read_local(
        &self,
        buf: &mut [u8],
        off: u64,
        plan: &[(u64, u64, Source)],
        fill_zeros: bool,
    ) -> Result<()> {
        for &(pos, n, src) in plan {
            if src != Source::Backing && (fill_zeros || src != Source::Zero) {
                let dst = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
                self.read_source(dst, pos, src)?;
            }
        }
        Ok(())
    }

    fn read_source(&self, dst: &mut [u8], pos: u64, src: Source) -> Result<()> {
        match src {
            Source::Data(h) => self.storage.read_at(dst, h.0),
            Source::Zero => {
                dst.fill(0);
                Ok(())
            }
            Source::Backing => self.read_backing(dst, pos),
            Source::Compressed { host, len } => {
                let mut c = vec![0u8; self.geo.cluster_size() as usize];
                self.read_compressed(host, len, &mut c)?;
                let inc = self.geo.in_cluster(pos) as usize;
                dst.copy_from_slice(&c[inc..inc + dst.len()]);
                Ok(())
            }
        }
    }

    /// Read from the backing file; past its end (or without one) reads zeros.
    pub fn read_backing(&self, dst: &mut [u8], pos: u64) -> Result<()> {
        self.read_backing_noting(dst, pos, None)
    }

    /// [`Self::read_backing`], noting proven zeros as [`Self::read_noting_zeros`] does.
    fn read_backing_noting(&self, dst: &mut [u8], pos: u64, mut zeros: ZeroNotes) -> Result<()> {
        let have = match &self.backing {
            None => 0,
            Some(b) => {
                let have = b.virtual_size().saturating_sub(pos).min(dst.len() as u64) as usize;
                if have > 0 {
                    b.read_noting_zeros(&mut dst[..have], pos, zeros.as_deref_mut())?;
                }
                have
            }
        };
        match zeros {
            Some(z) if have < dst.len() => z.push((pos + have as u64, (dst.len() - have) as u64)),
            Some(_) => {}
            None => dst[have..].fill(0),
        }
        Ok(())
    }

    pub(super) fn read_compressed(&self, host: HostOffset, len: u64, out: &mut [u8]) -> Result<()> {
        let mut c = vec![0u8; len as usize];
        self.storage.read_at(&mut c, host.0)?;
        compress::decompress(self.compression, &c, out).map_err(|what| Error::Decompress {
            path: self.path().to_path_buf(),
            offset: host.0,
            what,
        })
    }
}
