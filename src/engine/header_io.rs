//! Writing the qcow2 header, shared by the image driver and the refcount code (which
//! switches the header to a grown refcount table).

use super::storage::Storage;
use crate::format::header::Header;
use crate::Result;

/// Encode and write the header at offset 0 (one write of the header area).
pub(crate) fn write_header(st: &dyn Storage, h: &Header) -> Result<()> {
    let b = h.encode().map_err(|e| e.at(st.path()))?;
    st.write_at(&b, 0)
}

/// Parse the header of `storage` (no backing opened yet).
pub fn read_header(storage: &dyn Storage) -> Result<Header> {
    let path = storage.path();
    let len = storage.len()?;
    let mut first = vec![0u8; 512];
    storage.read_at(&mut first, 0)?;
    let bits =
        Header::peek_cluster_bits(&first[..len.min(512) as usize]).map_err(|e| e.at(path))?;
    let cs = 1usize << bits;
    let want = cs.min(len as usize);
    let mut b = vec![0u8; want];
    storage.read_at(&mut b, 0)?;
    Header::parse(&b, len).map_err(|e| e.at(path))
}
