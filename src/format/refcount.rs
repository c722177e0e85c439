//! Refcount block entries of every width the spec allows (1 to 64 bits).
//!
//! Sub-byte widths pack entries from the least significant bits of each byte upward, as QEMU
//! does (`get_refcount_ro0` .. `ro2` in block/qcow2-refcount.c); 8..64-bit entries are
//! big-endian.

use super::table::OFFSET_MASK;
use super::types::Geometry;
use super::{be_u16, be_u32, be_u64};

/// Bits 0..=8 of a refcount table entry: reserved, zero in a valid entry. Bits 9..=63 hold
/// the refcount block's offset.
pub const REFT_RESERVED: u64 = 0x1ff;

/// What a refcount table entry points at, by the one rule that says whether a refcount block
/// may be used: no reserved bit, cluster aligned, and inside the image. Anything else is a
/// corruption; the variants say which, for messages in qemu-img's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefTableEntry {
    /// Zero: no refcount block, the clusters it would count have refcount 0.
    Unused,
    /// A usable refcount block at this offset.
    Block(u64),
    /// Reserved bits set; `offset` is the entry with them masked (what QEMU reads through).
    Reserved { offset: u64 },
    /// The offset is not cluster aligned.
    Unaligned { offset: u64 },
    /// The block would lie past the end of the image, or past the 56 bits of a host offset.
    PastEnd { offset: u64 },
}

impl RefTableEntry {
    /// Decode entry `e` of an image of geometry `g` whose clusters (in the file, or
    /// allocated since) are `0..clusters`.
    pub fn decode(e: u64, g: &Geometry, clusters: u64) -> RefTableEntry {
        let offset = e & !REFT_RESERVED;
        if e & REFT_RESERVED != 0 {
            RefTableEntry::Reserved { offset }
        } else if offset == 0 {
            RefTableEntry::Unused
        } else if !g.is_aligned(offset) {
            RefTableEntry::Unaligned { offset }
        } else if offset & !OFFSET_MASK != 0 || offset >> g.cluster_bits >= clusters {
            RefTableEntry::PastEnd { offset }
        } else {
            RefTableEntry::Block(offset)
        }
    }
}

/// Read entry `i` of a refcount block with the given refcount_order.
pub fn get(block: &[u8], order: u32, i: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            let shift = (i % per_byte) * bits;
            u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[i]),
        4 => u64::from(be_u16(block, 2 * i)),
        5 => u64::from(be_u32(block, 4 * i)),
        _ => be_u64(block, 8 * i),
    }
}

/// Write entry `i`; the caller has checked `v` fits the width.
pub fn set(block: &mut [u8], order: u32, i: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | (((v as u8) << shift) & mask);
        }
        3 => block[i] = v as u8,
        4 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn reftable_entries() {
        let g = Geometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        let d = |e| RefTableEntry::decode(e, &g, 4);
        assert_eq!(d(0), RefTableEntry::Unused);
        assert_eq!(d(0x3_0000), RefTableEntry::Block(0x3_0000));
        assert_eq!(d(0x4_0000), RefTableEntry::PastEnd { offset: 0x4_0000 });
        assert_eq!(d(0x1_0200), RefTableEntry::Unaligned { offset: 0x1_0200 });
        assert_eq!(d(0x1_0001), RefTableEntry::Reserved { offset: 0x1_0000 });
        assert_eq!(d(1), RefTableEntry::Reserved { offset: 0 });
        let high = (1 << 60) | 0x1_0000;
        assert_eq!(d(high), RefTableEntry::PastEnd { offset: high });
        assert_eq!(
            RefTableEntry::decode(high, &g, u64::MAX),
            RefTableEntry::PastEnd { offset: high }
        );
    }

    #[test]
    fn all_widths_roundtrip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut b = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set(&mut b, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get(&b, order, i),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // QEMU's 1-bit layout: entry 0 is bit 0 of byte 0.
        let mut b = vec![0u8; 1];
        set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set(&mut b, 0, 7, 1);
        assert_eq!(b[0], 0x81);
    }
}
