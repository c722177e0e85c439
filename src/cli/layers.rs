//! `vmicache build` and `vmicache chain`.

use super::exit;
use super::util::human;
use anyhow::Result;
use std::path::Path;
use vmicache::chain::build::{build_cache, make_instance_verified, BuildOptions};
use vmicache::engine::Format;
use vmicache::format::ext::hex;

pub fn build(
    base: &Path,
    out: &Path,
    quota: u64,
    cluster_size: u64,
    base_format: Option<String>,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    // Later commands open the base as the cache's backing file: will they need it allowed?
    let outside = vmicache::engine::open::place_backing(out, base).is_err();
    // The base named here is trusted: the new cache may name it from wherever it lies.
    allow_dir_of(base)?;
    let o = BuildOptions {
        cluster_size,
        quota,
        base_format: base_format.as_deref().and_then(Format::parse),
    };
    let id = build_cache(base, out, &o)?;
    if outside && !quiet {
        let dir = std::fs::canonicalize(base)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        errln!(
            "vmicache: note: the base lies outside the cache's directory: later commands need --allow-backing {} (or VMICACHE_ALLOW_BACKING, or the directory in /etc/vmicache/config.yaml)",
            dir.display()
        );
    }
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "cache": out.display().to_string(),
                "base": id,
                "cluster-size": cluster_size,
                "quota": quota,
            })
        );
    } else if !quiet {
        outln!(
            "built cache {} over {} ({}, {}), {} clusters, quota {}, fingerprint {}",
            out.display(),
            id.path,
            id.format,
            human(id.virtual_size),
            human(cluster_size),
            if quota == 0 {
                "none".into()
            } else {
                human(quota)
            },
            hex(&id.fingerprint[..8])
        );
    }
    Ok(exit::OK)
}

pub fn chain(
    cache: &Path,
    out: &Path,
    cluster_size: u64,
    json: bool,
    verify: bool,
    quiet: bool,
) -> Result<i32> {
    let resolved = super::hoard::resolve_cache(cache)?;
    let cache = resolved.as_path();
    make_instance_verified(cache, out, cluster_size, verify)?;
    if json {
        outln!(
            "{}",
            serde_json::json!({"instance": out.display().to_string(), "cache": cache.display().to_string()})
        );
    } else if !quiet {
        outln!(
            "created instance {} over cache {} (base {})",
            out.display(),
            cache.display(),
            if verify {
                "fingerprint verified"
            } else {
                "checked"
            }
        );
    }
    Ok(exit::OK)
}

/// Allow backing files in the directory of `image` (a path or an NBD URI's socket), which the
/// user named on the command line.
fn allow_dir_of(image: &Path) -> Result<()> {
    let s = image.to_string_lossy();
    let file = match vmicache::nbd::client::NbdUri::parse(&s) {
        Some(u) => u.socket,
        None => image.to_path_buf(),
    };
    let dir = std::fs::canonicalize(&file)
        .ok()
        .and_then(|c| c.parent().map(Path::to_path_buf));
    if let Some(dir) = dir {
        vmicache::engine::open::allow_backing_in(&dir)?;
    }
    Ok(())
}
