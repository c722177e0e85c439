//! Where each guest byte of a chain lives: extents with the layer (depth) that holds them, in
//! the shape and with the merge rules of `qemu-img map --output=json`.

use crate::engine::Image;
use crate::Result;
use std::fmt::Write;

pub use crate::engine::layer::Extent;

/// Whether qemu-img would print `n` as part of `e` (it follows `e`).
fn mergeable(e: &Extent, n: &Extent) -> bool {
    e.depth == n.depth
        && e.present == n.present
        && e.zero == n.zero
        && e.data == n.data
        && e.compressed == n.compressed
        && match (e.offset, n.offset) {
            (None, None) => true,
            (Some(a), Some(b)) => a + e.length == b,
            _ => false,
        }
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
        let e = top.chain_status(off, end - off)?;
        off += e.length;
        match out.last_mut() {
            Some(last) if mergeable(last, &e) => last.length += e.length,
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
