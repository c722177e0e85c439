//! `vmicache warm` and `vmicache seal`.

use super::exit;
use super::util::human;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use vmicache::chain::build::cache_meta;
use vmicache::chain::trace::Trace;
use vmicache::chain::warm::{base_ranges, open_cache_rw, seal, warm, WarmOptions};

pub fn run_warm(
    cache: &Path,
    trace: Option<&Path>,
    full: bool,
    jobs: usize,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    let img = open_cache_rw(cache)?;
    let (reads, zeros) = match (trace, full) {
        (Some(t), false) => {
            let tr = Trace::load(t)?;
            let id = cache_meta(&img)?
                .and_then(|m| m.base)
                .context("cache records no base identity")?;
            if tr.base_size != id.virtual_size || tr.base_fingerprint != id.fingerprint {
                bail!(
                    "{}: trace was recorded over another base than {}'s ({})",
                    t.display(),
                    cache.display(),
                    id.path
                );
            }
            (tr.reads, Vec::new())
        }
        (None, true) => base_ranges(&img)?,
        _ => bail!("warm needs exactly one of --trace TRACE or --full"),
    };
    let total: u64 = reads.iter().chain(&zeros).map(|r| r.1).sum();
    let bar = if quiet || json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} warming [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        b
    };
    let o = WarmOptions {
        jobs,
        ..Default::default()
    };
    let st = warm(&img, &reads, &zeros, &o, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    if json {
        outln!("{}", serde_json::to_string_pretty(&st)?);
    } else if !quiet {
        let rate = st.base_bytes_read as f64 / st.seconds.max(1e-9);
        outln!(
            "warmed {}: read {} from the base in {:.2} s ({}/s); stored {} data and {} zero clusters{}",
            cache.display(),
            human(st.base_bytes_read),
            st.seconds,
            human(rate as u64),
            st.data_clusters,
            st.zero_clusters,
            if st.over_quota_clusters > 0 {
                format!("; {} clusters left out (quota reached)", st.over_quota_clusters)
            } else {
                String::new()
            }
        );
    }
    Ok(exit::OK)
}

pub fn run_compact(cache: &Path, compress: &str, json: bool, quiet: bool) -> Result<i32> {
    use vmicache::format::header::CompressionType;
    let kind = match compress {
        "zstd" => Some(CompressionType::Zstd),
        "zlib" => Some(CompressionType::Deflate),
        _ => None,
    };
    let s = vmicache::chain::compact::compact(cache, kind)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&s)?);
    } else if !quiet {
        outln!(
            "compacted {} ({}): {} -> {} ({} clusters -> {})",
            cache.display(),
            s.compression,
            human(s.bytes_before),
            human(s.bytes_after),
            s.clusters_before,
            s.clusters_after
        );
        outln!(
            "  {} data clusters stored as {} contents: {} shared, {} compressed (in {} host \
             clusters), {} plain; {} zero clusters ({} were zero-filled data)",
            s.data_clusters_after,
            s.stored_contents,
            s.shared_clusters,
            s.compressed_clusters,
            s.compressed_host_clusters,
            s.plain_host_clusters,
            s.zero_clusters,
            s.zeroed_clusters
        );
    }
    Ok(exit::OK)
}

pub fn run_seal(cache: &Path, quiet: bool) -> Result<i32> {
    seal(cache)?;
    if !quiet {
        outln!("sealed {}: shared read-only from now on", cache.display());
    }
    Ok(exit::OK)
}
