//! Where each guest byte of a chain lives: extents with the layer (depth) that holds them, in
//! the shape and with the merge rules of `qemu-img map --output=json`.

use crate::engine::Image;
use crate::Result;
use std::fmt::Write;

/// One extent of the map. Field meanings follow `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    /// 0 is the top image, 1 its backing file, ...
    pub depth: usize,
    /// Allocated at `depth` (false: nothing in the chain holds it, reads as zeros).
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the file at `depth`, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl Extent {
    fn mergeable(&self, n: &Extent) -> bool {
        self.depth == n.depth
            && self.present == n.present
            && self.zero == n.zero
            && self.data == n.data
            && self.compressed == n.compressed
            && match (self.offset, n.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Status of `[off, off+len)` walking down the chain; returns the extent for a prefix.
fn status(top: &Image, off: u64, len: u64) -> Result<Extent> {
    let st = top.chain_status(off, len)?;
    Ok(Extent {
        start: off,
        length: st.length,
        depth: st.depth,
        present: st.present,
        zero: st.zero,
        data: st.data,
        compressed: st.compressed,
        offset: st.offset,
    })
}

/// The map of the whole chain under `top`, merged as qemu-img merges.
pub fn map(top: &Image) -> Result<Vec<Extent>> {
    map_range(top, 0, top.virtual_size())
}

pub fn map_range(top: &Image, start: u64, end: u64) -> Result<Vec<Extent>> {
    if start >= end {
        // qemu-img map prints one empty entry for an empty range.
        return Ok(vec![Extent {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        }]);
    }
    let mut out: Vec<Extent> = Vec::new();
    let mut off = start;
    while off < end {
        let e = status(top, off, end - off)?;
        off += e.length;
        match out.last_mut() {
            Some(last) if last.mergeable(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// Render as `qemu-img map --output=json` does, byte for byte.
pub fn to_qemu_json(map: &[Extent]) -> String {
    let mut s = String::from("[");
    for (i, e) in map.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
    }
    s.push_str("]\n");
    s
}
