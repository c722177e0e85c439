//! `vmicache analyze`: Squirrel's storage metrics over a set of images or caches, for anyone
//! to run on their own: per block size and codec, the deduplication ratio, the compression
//! ratio, their product (CCR), and the cross-similarity of the set; and the two baselines the
//! hoard is measured against, computed on the same data.
//!
//! Definitions (docs/hoard.md says more):
//! - the data of an image: a cache's own data (what its layer holds), any other image's
//!   whole content; blocks of zeros are not counted (every store keeps them as holes);
//! - blocks: fixed size, aligned to guest offsets; unique: distinct by BLAKE3;
//! - dedup ratio = data blocks / unique blocks; compression ratio = unique bytes / their
//!   stored bytes, each block compressed on its own (ZFS's rule: kept uncompressed unless
//!   compression saves 1/8, rounded up to 512 B sectors); CCR = data bytes / stored bytes;
//! - cross-similarity: for each image, the share of its distinct blocks that also occur in
//!   another image of the set, averaged over the images.

use crate::engine::layer::{MapMode, Mapping};
use crate::engine::{Image, OpenOptions};
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

/// The window read at a time: every block size divides it.
const WINDOW: u64 = 1 << 20;
/// Most images in one set (a bit each).
pub const MAX_IMAGES: usize = 128;
const SECTOR: u64 = 512;

/// How blocks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Codec {
    #[serde(rename = "gzip-6")]
    Gzip6,
    #[serde(rename = "zstd-3")]
    Zstd3,
}

impl Codec {
    pub fn name(self) -> &'static str {
        match self {
            Codec::Gzip6 => "gzip-6",
            Codec::Zstd3 => "zstd-3",
        }
    }
    fn compressed_len(self, b: &[u8]) -> u64 {
        match self {
            Codec::Gzip6 => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                let _ = e.write_all(b);
                e.finish().map_or(b.len() as u64, |v| v.len() as u64)
            }
            Codec::Zstd3 => zstd::bulk::compress(b, 3).map_or(b.len() as u64, |v| v.len() as u64),
        }
    }
    /// Bytes a block takes stored: compressed when that saves at least 1/8, in sectors.
    fn stored(self, b: &[u8]) -> u64 {
        let n = b.len() as u64;
        let c = self.compressed_len(b);
        let kept = if c <= n - n / 8 { c } else { n };
        kept.div_ceil(SECTOR) * SECTOR
    }
}

/// Figures for one block size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub block_size: u64,
    pub blocks: u64,
    pub unique: u64,
    pub dedup_ratio: f64,
    /// Per codec: stored bytes of the unique blocks, compression ratio, CCR.
    pub codecs: Vec<CodecRow>,
    pub cross_similarity: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CodecRow {
    pub codec: Codec,
    pub stored_bytes: u64,
    pub compression_ratio: f64,
    pub ccr: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Analysis {
    pub images: Vec<String>,
    /// Bytes of data (non-zero blocks of 4 KiB) over all images.
    pub data_bytes: u64,
    pub rows: Vec<Row>,
}

impl Analysis {
    pub fn row(&self, bs: u64) -> Option<&Row> {
        self.rows.iter().find(|r| r.block_size == bs)
    }
    /// Stored bytes at block size `bs` with `codec` (a baseline).
    pub fn stored(&self, bs: u64, codec: Codec) -> Option<u64> {
        self.row(bs)?
            .codecs
            .iter()
            .find(|c| c.codec == codec)
            .map(|c| c.stored_bytes)
    }
}

/// Distinct blocks of one size: key → (images holding it, stored bytes per codec).
struct Table {
    bs: u64,
    codecs: Vec<Codec>,
    seen: HashMap<[u8; 16], u128>,
    blocks: u64,
    stored: Vec<u64>,
}

impl Table {
    fn take(&mut self, img: usize, w: &[u8]) {
        for b in w.chunks_exact(self.bs as usize) {
            if b.iter().all(|&x| x == 0) {
                continue;
            }
            self.blocks += 1;
            let mut k = [0u8; 16];
            k.copy_from_slice(&blake3::hash(b).as_bytes()[..16]);
            let e = self.seen.entry(k).or_insert(0);
            if *e == 0 {
                for (i, c) in self.codecs.iter().enumerate() {
                    self.stored[i] += c.stored(b);
                }
            }
            *e |= 1u128 << img;
        }
    }
    fn row(&self, images: usize) -> Row {
        let unique = self.seen.len() as u64;
        let data = self.blocks * self.bs;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mut distinct = vec![0u64; images];
        let mut shared = vec![0u64; images];
        for m in self.seen.values() {
            let many = m.count_ones() > 1;
            for (i, (d, s)) in distinct.iter_mut().zip(shared.iter_mut()).enumerate() {
                if m & (1u128 << i) != 0 {
                    *d += 1;
                    *s += u64::from(many);
                }
            }
        }
        let cross: f64 = if images > 1 {
            (0..images)
                .map(|i| ratio(shared[i] as f64, distinct[i] as f64))
                .sum::<f64>()
                / images as f64
        } else {
            0.0
        };
        Row {
            block_size: self.bs,
            blocks: self.blocks,
            unique,
            dedup_ratio: ratio(self.blocks as f64, unique as f64),
            codecs: self
                .codecs
                .iter()
                .zip(&self.stored)
                .map(|(&codec, &s)| CodecRow {
                    codec,
                    stored_bytes: s,
                    compression_ratio: ratio((unique * self.bs) as f64, s as f64),
                    ccr: ratio(data as f64, s as f64),
                })
                .collect(),
            cross_similarity: cross,
        }
    }
}

/// What of `img` is analysed: (offset, length) ranges holding data — a cache's own layer,
/// else the whole chain — widened to windows.
fn windows(img: &Image, own_layer: bool) -> Result<Vec<u64>> {
    let size = img.virtual_size();
    let mut out: Vec<u64> = Vec::new();
    let mut add = |off: u64, len: u64| {
        let (a, b) = (off / WINDOW, (off + len).div_ceil(WINDOW));
        for w in a..b {
            if out.last() != Some(&w) {
                out.push(w);
            }
        }
    };
    if own_layer {
        let m = img.layer().map(0, size, MapMode::READ)?;
        for r in m
            .runs
            .iter()
            .filter(|r| !matches!(r.map, Mapping::Unallocated | Mapping::Zero { .. }))
        {
            add(r.off, r.len);
        }
    } else {
        let mut pos = 0;
        while pos < size {
            let e = img.chain_status(pos, (size - pos).min(1 << 30))?;
            if e.data && !e.zero {
                add(e.start, e.length);
            }
            pos = e.start + e.length;
        }
    }
    Ok(out)
}

/// Analyse `images` (as caches: their own data, when `bases` is false and they are caches;
/// with `bases`, the base beneath each cache). `progress`: (images done, images).
pub fn analyze(
    images: &[PathBuf],
    bases: bool,
    block_sizes: &[u64],
    codecs: &[Codec],
    progress: Option<&(dyn Fn(usize, usize) + Sync)>,
) -> Result<Analysis> {
    if images.is_empty() || images.len() > MAX_IMAGES {
        return Err(Error::refused(
            crate::Subject::Other("analyze".into()),
            format!("1 to {MAX_IMAGES} images, not {}", images.len()),
        ));
    }
    for &bs in block_sizes {
        if !bs.is_power_of_two() || !(4096..=WINDOW).contains(&bs) {
            return Err(Error::refused(
                crate::Subject::Other("analyze".into()),
                format!("block size {bs}: a power of two from 4 KiB to 1 MiB"),
            ));
        }
    }
    let mut tables: Vec<Table> = block_sizes
        .iter()
        .map(|&bs| Table {
            bs,
            codecs: codecs.to_vec(),
            seen: HashMap::new(),
            blocks: 0,
            stored: vec![0; codecs.len()],
        })
        .collect();
    // Two groups of tables, one per thread, each fed every window.
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let mut groups: Vec<Vec<Table>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, t) in tables.drain(..).enumerate() {
        groups[i % workers].push(t);
    }
    let mut data_bytes = 0u64;
    let names: Vec<String> = images.iter().map(|p| p.display().to_string()).collect();
    let groups = std::thread::scope(|s| -> Result<Vec<Vec<Table>>> {
        let mut txs = Vec::new();
        let mut hs = Vec::new();
        for mut g in groups {
            let (tx, rx) = sync_channel::<(usize, Arc<Vec<u8>>)>(4);
            txs.push(tx);
            hs.push(s.spawn(move || {
                for (img, w) in rx {
                    for t in g.iter_mut() {
                        t.take(img, &w);
                    }
                }
                g
            }));
        }
        for (i, path) in images.iter().enumerate() {
            let opts = OpenOptions {
                lazy_backing: true,
                ..OpenOptions::read_only()
            };
            let top = Image::open(path, &opts)?;
            let is_cache = top.layer().cache_meta()?.is_some();
            let (img, own): (&Image, bool) = match (bases, is_cache) {
                (true, true) => (
                    top.backing()
                        .ok_or_else(|| Error::chain(path, "cache without a base"))?,
                    false,
                ),
                (true, false) => return Err(Error::refused(path, "not a cache (--bases)")),
                (false, c) => (&top, c),
            };
            let size = img.virtual_size();
            for w in windows(img, own)? {
                let off = w * WINDOW;
                let len = WINDOW.min(size - off);
                let mut buf = vec![0u8; WINDOW as usize];
                if own {
                    // The layer alone: what it does not hold reads as zeros (not counted).
                    let m = img.layer().map(off, len, MapMode::READ)?;
                    for r in &m.runs {
                        if matches!(r.map, Mapping::Unallocated | Mapping::Zero { .. }) {
                            continue;
                        }
                        let at = (r.off - off) as usize;
                        img.layer().read_run(&mut buf[at..at + r.len as usize], r)?;
                    }
                } else {
                    img.read_at(&mut buf[..len as usize], off)?;
                }
                data_bytes += buf
                    .chunks_exact(4096)
                    .filter(|b| b.iter().any(|&x| x != 0))
                    .count() as u64
                    * 4096;
                let w = Arc::new(buf);
                for tx in &txs {
                    tx.send((i, Arc::clone(&w)))
                        .map_err(|_| Error::refused(path, "analyze: a worker stopped"))?;
                }
            }
            if let Some(p) = progress {
                p(i + 1, images.len());
            }
        }
        drop(txs);
        Ok(hs
            .into_iter()
            .map(|h| h.join().expect("analyze worker"))
            .collect())
    })?;
    let mut rows: Vec<Row> = groups
        .iter()
        .flatten()
        .map(|t| t.row(images.len()))
        .collect();
    rows.sort_by_key(|r| r.block_size);
    Ok(Analysis {
        images: names,
        data_bytes,
        rows,
    })
}

/// Paths of images given on the command line, checked to exist.
pub fn check_paths(images: &[PathBuf]) -> Result<()> {
    for p in images {
        if !Path::new(p).exists() {
            return Err(Error::io(p, "open", std::io::ErrorKind::NotFound.into()));
        }
    }
    Ok(())
}
