//! L1 and L2 table entries: the raw 64-bit words kept apart from what they mean.
//!
//! Every bit rule of the spec's "Cluster mapping" section lives here: reserved bits, the
//! COPIED flag, the zero flag, and the compressed-cluster descriptor.

use super::types::{Geometry, HostOffset};
use super::{be_u64, FormatError};

/// Bit 63 of L1 and standard L2 entries: refcount is exactly one (writable in place).
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3): reads as zeros.
pub const ZERO: u64 = 1;
/// Bits 9..=55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero (1..=8 and 56..=62).
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits of a standard (not compressed) L2 entry that must be zero (1..=8 and 56..=61).
pub const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// A raw L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    pub fn new(l2: HostOffset) -> Self {
        L1Entry(l2.0 | COPIED)
    }
    /// The L2 table's host offset, None when unallocated.
    pub fn l2_offset(&self, g: &Geometry) -> Result<Option<HostOffset>, FormatError> {
        if self.0 & L1_RESERVED != 0 {
            return Err(FormatError::invalid(format!(
                "L1 entry {:#x} has reserved bits set",
                self.0
            )));
        }
        let off = self.0 & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !g.is_aligned(off) {
            return Err(FormatError::invalid(format!(
                "L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(Some(HostOffset(off)))
    }
    pub fn copied(&self) -> bool {
        self.0 & COPIED != 0
    }
}

/// A raw L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry(pub u64);

/// What an L2 entry means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// Not allocated here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros. `prealloc` is a host cluster kept allocated for later writes.
    Zero {
        prealloc: Option<HostOffset>,
        copied: bool,
    },
    /// Plain data at a cluster-aligned host offset.
    Data { host: HostOffset, copied: bool },
    /// Compressed data: `len` bytes starting at `host` (may run past EOF; read as zeros).
    Compressed { host: HostOffset, len: u64 },
}

impl L2Entry {
    pub const UNALLOCATED: L2Entry = L2Entry(0);

    pub fn data(host: HostOffset) -> Self {
        L2Entry(host.0 | COPIED)
    }
    pub fn zero() -> Self {
        L2Entry(ZERO)
    }

    /// Decode with the image's geometry. `v3` enables the zero flag.
    pub fn mapping(&self, g: &Geometry, v3: bool) -> Result<L2Mapping, FormatError> {
        let e = self.0;
        if e & COMPRESSED != 0 {
            let (host, len) = compressed_descriptor(e, g.cluster_bits);
            return Ok(L2Mapping::Compressed {
                host: HostOffset(host),
                len,
            });
        }
        let copied = e & COPIED != 0;
        if e & L2_STD_RESERVED != 0 {
            return Err(FormatError::invalid(format!(
                "L2 entry {e:#x} has reserved bits set"
            )));
        }
        let off = e & OFFSET_MASK;
        if off != 0 && !g.is_aligned(off) {
            return Err(FormatError::invalid(format!(
                "data cluster offset {off:#x} is not cluster aligned"
            )));
        }
        if e & ZERO != 0 {
            if !v3 {
                return Err(FormatError::invalid(format!(
                    "L2 entry {e:#x}: zero flag in a version 2 image"
                )));
            }
            return Ok(L2Mapping::Zero {
                prealloc: (off != 0).then_some(HostOffset(off)),
                copied,
            });
        }
        if off == 0 {
            return Ok(L2Mapping::Unallocated);
        }
        Ok(L2Mapping::Data {
            host: HostOffset(off),
            copied,
        })
    }
}

/// (host byte offset, byte length) of a compressed cluster descriptor.
///
/// Bits 0..x-1 hold the byte offset, x..61 the count of additional 512-byte sectors, with
/// x = 62 - (cluster_bits - 8). The data starts at the offset and ends at the end of the last
/// counted sector.
pub fn compressed_descriptor(e: u64, cluster_bits: u32) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let off = e & ((1u64 << x) - 1);
    let sectors = (e >> x) & ((1u64 << (cluster_bits - 8)) - 1);
    let end = (off & !511) + (sectors + 1) * 512;
    (off, end - off)
}

/// Encode a compressed descriptor for `len` bytes at `off`.
pub fn compressed_entry(off: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let last = (off + len - 1) / 512;
    let sectors = last - off / 512;
    COMPRESSED | (sectors << x) | off
}

/// Decode a big-endian table into entries.
pub fn decode_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| be_u64(c, 0)).collect()
}

/// Encode entries as a big-endian table.
pub fn encode_table(t: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(t.len() * 8);
    for v in t {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    const G: Geometry = Geometry {
        cluster_bits: 16,
        refcount_order: 4,
    };

    #[test]
    fn mappings() {
        assert_eq!(L2Entry(0).mapping(&G, true), Ok(L2Mapping::Unallocated));
        assert_eq!(
            L2Entry::data(HostOffset(0x50000)).mapping(&G, true),
            Ok(L2Mapping::Data {
                host: HostOffset(0x50000),
                copied: true
            })
        );
        assert_eq!(
            L2Entry(1).mapping(&G, true),
            Ok(L2Mapping::Zero {
                prealloc: None,
                copied: false
            })
        );
        assert!(L2Entry(1).mapping(&G, false).is_err());
        assert!(L2Entry(0x50200).mapping(&G, true).is_err());
        assert!(L2Entry(2).mapping(&G, true).is_err());
    }

    #[test]
    fn compressed_roundtrip() {
        for bits in 9..=21 {
            for (off, len) in [(0x12345u64, 700u64), (0x200, 512), (0x1001, 1)] {
                let len = len.min(1 << bits);
                let e = compressed_entry(off, len, bits);
                let (o, l) = compressed_descriptor(e, bits);
                assert_eq!(o, off);
                assert!(
                    l >= len && l < len + 1024,
                    "bits {bits} off {off} len {len} -> {l}"
                );
            }
        }
    }
}
