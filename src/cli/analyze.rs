//! `vmicache analyze`: Squirrel's metrics over images and caches, with the baselines.

use super::exit;
use super::hoard::{ratio, resolve_cache};
use super::util::human;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use vmicache::hoard::{self, Hoard};

#[derive(clap::Args, Debug)]
pub struct AnalyzeArgs {
    /// Caches (their own data; `hoard:NAME` for a hoarded one) or other images (all of
    /// their data).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Analyse the base beneath each cache instead of the cache.
    #[arg(long)]
    bases: bool,
    /// Block sizes, comma-separated (powers of two, 4K to 1M).
    #[arg(long, value_delimiter = ',', value_parser = super::util::parse_size, default_value = "4K,16K,64K,256K,1M")]
    block_sizes: Vec<u64>,
    /// Also compare with what this hoard stores (packs and indexes on disk).
    #[arg(long, value_name = "DIR")]
    hoard: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn analyze(a: AnalyzeArgs, quiet: bool) -> Result<i32> {
    use vmicache::hoard::analyze::{analyze, check_paths, Codec};
    let images = a
        .images
        .iter()
        .map(|p| resolve_cache(p))
        .collect::<Result<Vec<_>>>()?;
    check_paths(&images)?;
    let mut sizes = a.block_sizes.clone();
    for must in [4096, 64 << 10] {
        if !sizes.contains(&must) {
            sizes.push(must); // the baselines need them
        }
    }
    sizes.sort();
    let b = if quiet || a.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(images.len() as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} analysing [{bar:40}] {pos}/{len} images, {elapsed}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b
    };
    let progress = |done: usize, _all: usize| b.set_position(done as u64);
    let codecs = [Codec::Gzip6, Codec::Zstd3];
    let r = analyze(&images, a.bases, &sizes, &codecs, Some(&progress))?;
    b.finish_and_clear();
    let zfs = r.stored(64 << 10, Codec::Gzip6).unwrap_or(0);
    let fixed4k = r.stored(4096, Codec::Gzip6).unwrap_or(0);
    let hoard = match &a.hoard {
        None => None,
        Some(d) => Some(hoard::stats::stats(&Hoard::open(d)?)?),
    };
    let on_disk = hoard.as_ref().map(|s| s.pack_bytes + s.index_bytes);
    let rel = |x: u64, base: u64| {
        if base > 0 {
            x as f64 / base as f64
        } else {
            0.0
        }
    };
    if a.json {
        let j = serde_json::json!({
            "analysis": r,
            "baselines": {"zfs_style_64k_gzip6": zfs, "fixed_4k_gzip6": fixed4k},
            "hoard": hoard.as_ref().map(|s| serde_json::json!({
                "dir": s.dir,
                "bytes": on_disk,
                "vs_zfs_style": rel(on_disk.unwrap_or(0), zfs),
                "vs_fixed_4k_gzip6": rel(on_disk.unwrap_or(0), fixed4k),
            })),
        });
        outln!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(exit::OK);
    }
    outln!(
        "{} images, {} of data (non-zero 4 KiB blocks){}",
        r.images.len(),
        human(r.data_bytes),
        if a.bases {
            ", the bases beneath the caches"
        } else {
            ""
        }
    );
    outln!(
        "{:>6} {:>10} {:>10} {:>7}  {:>10} {:>7} {:>7}  {:>10} {:>7} {:>7}  {:>6}",
        "BLOCK",
        "BLOCKS",
        "UNIQUE",
        "DEDUP",
        "GZIP-6",
        "COMPR",
        "CCR",
        "ZSTD-3",
        "COMPR",
        "CCR",
        "CROSS"
    );
    for row in &r.rows {
        let mut line = format!(
            "{:>6} {:>10} {:>10} {:>7}",
            human(row.block_size).replace(" ", ""),
            row.blocks,
            row.unique,
            ratio(row.dedup_ratio)
        );
        for c in &row.codecs {
            line += &format!(
                "  {:>10} {:>7} {:>7}",
                human(c.stored_bytes),
                ratio(c.compression_ratio),
                ratio(c.ccr)
            );
        }
        line += &format!("  {:>5.1}%", row.cross_similarity * 100.0);
        outln!("{line}");
    }
    outln!(
        "baselines: ZFS-style (64 KiB blocks, dedup, gzip-6) {}; 4 KiB fixed + gzip-6 {}",
        human(zfs),
        human(fixed4k)
    );
    if let (Some(s), Some(n)) = (&hoard, on_disk) {
        outln!(
            "hoard {}: {} on disk (packs and indexes) = {:.2}x ZFS-style, {:.2}x 4 KiB + gzip-6",
            s.dir,
            human(n),
            rel(n, zfs),
            rel(n, fixed4k)
        );
    }
    Ok(exit::OK)
}
