//! Creating new qcow2 images.
//!
//! Layout as QEMU lays out a new image: header cluster, refcount table, refcount block(s), L1
//! table. Everything is written before the header, and the header last, so a crash leaves no
//! half image that looks valid.

use super::storage::{FileStorage, Storage};
use crate::format::header::{self, CompressionType, Extension, Header};
use crate::format::refcount;
use crate::format::table;
use crate::format::types::{Geometry, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::{Error, Result};
use std::path::Path;

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    /// 2 or 3.
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub compression: CompressionType,
    /// Extra header extensions (e.g. the vmicache extension).
    pub extensions: Vec<Extension>,
}

impl CreateOptions {
    /// v3, 64 KiB clusters, 16-bit refcounts: QEMU's defaults.
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_size: 64 << 10,
            refcount_bits: 16,
            version: 3,
            backing_file: None,
            backing_format: None,
            compression: CompressionType::Deflate,
            extensions: Vec::new(),
        }
    }
}

/// Create `path` (which must not exist).
pub fn create(path: &Path, o: &CreateOptions) -> Result<()> {
    let bad = |w: String| Error::invalid(path, w);
    if !o.cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&o.cluster_size.trailing_zeros())
    {
        return Err(bad(format!(
            "cluster size {} must be a power of two from 512 B to 2 MiB",
            o.cluster_size
        )));
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err(bad(format!(
            "refcount bits {} must be a power of two up to 64",
            o.refcount_bits
        )));
    }
    if o.version == 2 && o.refcount_bits != 16 {
        return Err(bad("version 2 images need 16-bit refcounts".into()));
    }
    if o.version == 2 && o.compression != CompressionType::Deflate {
        return Err(bad("version 2 images only compress with zlib".into()));
    }
    let geo = Geometry {
        cluster_bits: o.cluster_size.trailing_zeros(),
        refcount_order: o.refcount_bits.trailing_zeros(),
    };
    let cs = geo.cluster_size();
    let l1_size = geo.l1_entries_for(o.size);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(bad(format!(
            "virtual size {} is too large for {} clusters",
            o.size, cs
        )));
    }
    let l1_clusters = geo.clusters_for(l1_size * 8);
    // Fixpoint: enough refcount blocks to count all metadata, and table clusters for them.
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters;
        let rb2 = total.div_ceil(geo.refblock_entries());
        let rt2 = geo.clusters_for(rb2 * 8).max(1);
        if (rb2, rt2) == (rb, rt) {
            break;
        }
        (rb, rt) = (rb2, rt2);
    }
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = rb_off + rb * cs;
    let total = 1 + rt + rb + l1_clusters;

    let mut h = Header {
        version: o.version,
        geometry: geo,
        size: o.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        header_length: 0,
        compression: o.compression,
        header_tail: Vec::new(),
        backing_file: o.backing_file.clone(),
        backing_format: o.backing_format.clone(),
        feature_names: if o.version == 3 {
            Header::default_feature_names()
        } else {
            Vec::new()
        },
        extensions: o.extensions.clone(),
    };
    if o.compression == CompressionType::Zstd {
        h.incompatible |= header::incompat::COMPRESSION;
    }
    let hb = h.encode().map_err(|e| e.at(path))?;

    let st = FileStorage::create(path)?;
    let result = (|| -> Result<()> {
        let mut table_b = vec![0u64; (rt * cs / 8) as usize];
        for i in 0..rb {
            table_b[i as usize] = rb_off + i * cs;
        }
        st.write_at(&table::encode_table(&table_b), rt_off)?;
        let mut blocks = vec![0u8; (rb * cs) as usize];
        let per = geo.refblock_entries();
        for c in 0..total {
            let (bi, slot) = ((c / per) as usize, (c % per) as usize);
            let blk = &mut blocks[bi * cs as usize..(bi + 1) * cs as usize];
            refcount::set(blk, geo.refcount_order, slot, 1);
        }
        st.write_at(&blocks, rb_off)?;
        st.set_len(l1_off + (l1_size * 8).max(8))?;
        st.sync()?;
        st.write_at(&hb, 0)?;
        st.sync()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}
