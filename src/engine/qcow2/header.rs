//! Header and header-extension I/O of an open image, and marking it corrupt.

use super::Qcow2;
use crate::engine::header_io::write_header;
use crate::format::ext as vext;
use crate::format::header;
use crate::{Error, Result};
use std::sync::atomic::Ordering;

impl Qcow2 {
    /// Pass `r` on; a corruption found while writing marks the image corrupt first (the
    /// corrupt bit in the header, then no more writes), as QEMU's qcow2_signal_corruption.
    pub(super) fn signal<T>(&self, r: Result<T>) -> Result<T> {
        // A failed write or sync of this image stops its writing (see `io_failed`).
        if let Err(Error::Io { path, .. }) = &r {
            if path == self.path() {
                self.io_failed.store(true, Ordering::SeqCst);
            }
        }
        // Only this image's own damage: a corrupt backing file is not this image's fault.
        if let Err(Error::Corrupt { what, path }) = &r {
            if path != self.path() {
                return r;
            }
            if !self.broken.swap(true, Ordering::SeqCst) {
                let mut m = self.lock();
                m.header.incompatible |= header::incompat::CORRUPT;
                let h = m.header.clone();
                let marked = write_header(&*self.storage, &h).and_then(|()| self.storage.sync());
                return Err(self.corrupt(match marked {
                    Ok(()) => format!(
                        "{what}; image marked corrupt, no more writes (`qemu-img check -r all` repairs)"
                    ),
                    Err(e) => format!("{what}; marking the image corrupt failed too: {e}"),
                }));
            }
        }
        r
    }

    /// Replace the vmicache header extension (None removes it) and rewrite the header.
    pub fn set_cache_meta(&self, meta: Option<&vext::CacheMeta>) -> Result<()> {
        self.require_writable()?;
        let mut m = self.lock();
        self.flush_locked(&mut m, false)?;
        m.header.extensions.retain(|e| e.kind != vext::KIND);
        if let Some(cm) = meta {
            m.header.extensions.push(header::Extension {
                kind: vext::KIND,
                data: cm.encode(),
            });
        }
        let h = m.header.clone();
        write_header(&*self.storage, &h)?;
        self.storage.sync()
    }

    pub fn cache_meta(&self) -> Result<Option<vext::CacheMeta>> {
        let m = self.lock();
        match m.header.extensions.iter().find(|e| e.kind == vext::KIND) {
            None => Ok(None),
            Some(e) => vext::CacheMeta::decode(&e.data)
                .map(Some)
                .map_err(|e| e.at(self.path())),
        }
    }
}
