//! Refcount block entries of every width the spec allows (1 to 64 bits).
//!
//! Sub-byte widths pack entries from the least significant bits of each byte upward, as QEMU
//! does (`get_refcount_ro0` .. `ro2` in block/qcow2-refcount.c); 8..64-bit entries are
//! big-endian.

use super::{be_u16, be_u32, be_u64};

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
