//! Metadata-overlap checks, as QEMU's `qcow2_check_metadata_overlap`: a writable image knows
//! which host clusters hold its metadata (header, L1 table, refcount table, refcount blocks,
//! L2 tables), and no write of guest data, and no metadata write of another kind, may land on
//! them. Damaged refcounts (a metadata cluster counted as free) or a damaged L2 entry (guest
//! data "at" the L1 table) would otherwise let a guest overwrite the header — and with it the
//! backing file name — from inside the VM.
//!
//! The map is built when an image is opened for writing (an image whose metadata already
//! overlaps is refused then) and kept up to date as L2 tables and refcount blocks are created
//! and the refcount table moves. Read-only opens have none.

use std::collections::BTreeMap;

/// What a metadata cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaKind {
    Header,
    L1,
    RefTable,
    RefBlock,
    L2,
}

impl MetaKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "header",
            MetaKind::L1 => "L1 table",
            MetaKind::RefTable => "refcount table",
            MetaKind::RefBlock => "refcount block",
            MetaKind::L2 => "L2 table",
        }
    }
}

/// Host clusters holding metadata, by cluster index.
#[derive(Debug, Default)]
pub(crate) struct MetaMap {
    map: BTreeMap<u64, MetaKind>,
}

impl MetaMap {
    /// Record `n` clusters from `first` as `kind`; fails (naming both) when one of them
    /// already holds metadata.
    pub(crate) fn insert(&mut self, first: u64, n: u64, kind: MetaKind) -> Result<(), String> {
        if let Some((&c, &k)) = self.map.range(first..first.saturating_add(n)).next() {
            return Err(format!(
                "{} at cluster {first} overlaps the {} at cluster {c}",
                kind.name(),
                k.name()
            ));
        }
        for c in first..first.saturating_add(n) {
            self.map.insert(c, kind);
        }
        Ok(())
    }

    /// Forget `n` clusters from `first` (a moved refcount table).
    pub(crate) fn remove(&mut self, first: u64, n: u64) {
        for c in first..first.saturating_add(n) {
            self.map.remove(&c);
        }
    }

    /// The first metadata cluster among clusters `[first, first+n)`, if any.
    pub(crate) fn hit(&self, first: u64, n: u64) -> Option<(u64, MetaKind)> {
        self.map
            .range(first..first.saturating_add(n))
            .next()
            .map(|(&c, &k)| (c, k))
    }

    /// Every metadata cluster and what it holds.
    pub(crate) fn map_iter(&self) -> impl Iterator<Item = (u64, MetaKind)> + '_ {
        self.map.iter().map(|(&c, &k)| (c, k))
    }

    /// Whether cluster `c` holds exactly `kind`.
    pub(crate) fn is(&self, c: u64, kind: MetaKind) -> bool {
        self.map.get(&c) == Some(&kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_are_found_and_named() {
        let mut m = MetaMap::default();
        m.insert(0, 1, MetaKind::Header).unwrap();
        m.insert(3, 2, MetaKind::L1).unwrap();
        m.insert(7, 1, MetaKind::L2).unwrap();
        let e = m.insert(4, 1, MetaKind::L2).unwrap_err();
        assert!(e.contains("overlaps the L1 table at cluster 4"), "{e}");
        assert_eq!(m.hit(5, 3), Some((7, MetaKind::L2)));
        assert_eq!(m.hit(5, 2), None);
        assert_eq!(m.hit(0, 1), Some((0, MetaKind::Header)));
        assert!(m.is(3, MetaKind::L1) && !m.is(3, MetaKind::L2));
        m.remove(3, 2);
        assert_eq!(m.hit(1, 6), None);
        assert_eq!(m.hit(u64::MAX - 1, 5), None);
    }
}
