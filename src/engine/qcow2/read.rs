//! Reading guest bytes: this layer's own clusters, then the backing file for the rest.

use super::{Qcow2, Source};
use crate::engine::image::ZeroNotes;
use crate::format::compress;
use crate::format::types::HostOffset;
use crate::{Error, Result};
use std::sync::atomic::Ordering;

impl Qcow2 {
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
        let cor = self.cor.get();
        if let Some(c) = cor {
            c.stats.requests.fetch_add(1, Ordering::Relaxed);
            let miss = plan.iter().any(|p| p.2 == Source::Backing);
            let counter = if miss { &c.stats.misses } else { &c.stats.hits };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // This layer's own pieces under the gate, then (without it) what comes from below.
        self.read_local(buf, off, &plan, zeros.is_none())?;
        drop(gate);
        for &(pos, n, src) in &plan {
            let dst = &mut buf[(pos - off) as usize..(pos - off + n) as usize];
            match (src, cor) {
                (Source::Backing, Some(c)) => self.cor_read(c, dst, pos)?,
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

    /// The pieces of `plan` (for `buf` at guest offset `off`) that this layer holds (zero
    /// clusters only with `fill_zeros`); the caller holds the I/O gate.
    pub(super) fn read_local(
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
