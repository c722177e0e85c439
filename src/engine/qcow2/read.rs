//! Reading this layer's own clusters (what [`super::Qcow2::map_range`] mapped here).

use super::Qcow2;
use crate::engine::layer::{Mapping, Run};
use crate::format::compress;
use crate::format::types::HostOffset;
use crate::{Error, Result};

impl Qcow2 {
    /// Read the bytes of `run` into `dst`; the caller holds the run's `Mapped` guard
    /// (`crate::engine::layer::Mapped`), so its clusters are not reused meanwhile.
    pub(super) fn read_mapped(&self, dst: &mut [u8], run: &Run) -> Result<()> {
        match run.map {
            Mapping::Data { host } => self.storage.read_at(dst, host),
            Mapping::Zero { .. } => {
                dst.fill(0);
                Ok(())
            }
            Mapping::Compressed { host, len } => {
                let mut c = vec![0u8; self.geo.cluster_size() as usize];
                self.read_compressed(HostOffset(host), len, &mut c)?;
                let inc = self.geo.in_cluster(run.off) as usize;
                dst.copy_from_slice(&c[inc..inc + dst.len()]);
                Ok(())
            }
            Mapping::Unallocated | Mapping::Stored => Err(Error::request(
                self.path(),
                format!("read of {:#x}+{:#x}: not allocated here", run.off, run.len),
            )),
        }
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
