//! Offsets and cluster geometry as distinct types, so a guest offset can never be used where a
//! host (file) offset is meant.

use std::fmt;

/// A byte offset in the guest's view of the disk (virtual disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {:#x}", self.0)
    }
}
impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {:#x}", self.0)
    }
}

/// Smallest and largest cluster size QEMU accepts (512 B and 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// The shape of an image's tables: cluster size and refcount width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Offset within the cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    pub fn align_down(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }
    pub fn align_up(&self, off: u64) -> u64 {
        off.div_ceil(self.cluster_size()) << self.cluster_bits
    }
    pub fn is_aligned(&self, off: u64) -> bool {
        self.in_cluster(off) == 0
    }
    /// Number of clusters needed for `bytes`.
    pub fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }
    /// log2 of entries per L2 table (8-byte entries).
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits()
    }
    pub fn l1_index(&self, g: GuestOffset) -> u64 {
        g.0 >> (self.cluster_bits + self.l2_bits())
    }
    pub fn l2_index(&self, g: GuestOffset) -> usize {
        ((g.0 >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits())
    }
    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_span())
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Refcount entries per refcount block.
    pub fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << self.refcount_bits()) - 1
        }
    }
    /// (refcount table index, index within the refcount block) for a host cluster index.
    pub fn refcount_slot(&self, cluster: u64) -> (u64, usize) {
        let per = self.refblock_entries();
        (cluster / per, (cluster % per) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn geometry_64k() {
        let g = Geometry {
            cluster_bits: 16,
            refcount_order: 4,
        };
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_span(), 512 << 20);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.l1_index(GuestOffset(512 << 20)), 1);
        assert_eq!(g.l2_index(GuestOffset(65536 * 3 + 5)), 3);
        assert_eq!(g.max_refcount(), 65535);
        assert_eq!(g.refcount_slot(32769), (1, 1));
    }
}
