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
