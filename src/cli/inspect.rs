//! `vmicache inspect`: the layers of a chain, what a cache holds, and maps.

use super::exit;
use super::util::human;
use anyhow::Result;
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use vmicache::chain::build::{cache_meta, verify_base, verify_base_content};
use vmicache::chain::map::{map, to_qemu_json};
use vmicache::engine::{Image, OpenOptions};
use vmicache::format::ext::{hex, BaseIdentity};
use vmicache::hoard::layer::HoardLayer;

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct Layer {
    depth: usize,
    role: &'static str,
    path: String,
    format: &'static str,
    virtual_size: u64,
    file_size: u64,
    disk_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refcount_bits: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compression_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zero_clusters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compressed_clusters: Option<u64>,
    /// Guest bytes allocated at this layer (data + compressed clusters).
    #[serde(skip_serializing_if = "Option::is_none")]
    allocated_bytes: Option<u64>,
    /// Data and compressed clusters whose stored bytes other guest clusters share (a
    /// compacted cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_clusters: Option<u64>,
    /// Host bytes storing the allocated data, and the guest bytes it saves by sharing and
    /// compression.
    #[serde(skip_serializing_if = "Option::is_none")]
    stored_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    saved_bytes: Option<u64>,
    /// Why this layer (a base) could not be reached; nothing else of it is known then.
    #[serde(skip_serializing_if = "Option::is_none")]
    unreachable: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct CacheReport {
    depth: usize,
    path: String,
    state: &'static str,
    quota: u64,
    cached_bytes: u64,
    cached_clusters: u64,
    base: Option<BaseIdentity>,
    /// "ok", the fields that changed, or "not done: <why>".
    base_check: serde_json::Value,
    /// Bytes of data the base holds (its allocated extents); null when it is unreachable.
    base_data_bytes: Option<u64>,
    /// Of those, bytes the cache holds.
    covered_bytes: Option<u64>,
    coverage: Option<f64>,
    created: u64,
    sealed: u64,
    /// The last copy-on-read session (recorded boot).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_fill: Option<vmicache::format::ext::FillRecord>,
    /// With --trace: bytes of the trace's reads (whole clusters) and how many the cache holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_covered_bytes: Option<u64>,
}

#[derive(Serialize)]
struct Report {
    image: String,
    layers: Vec<Layer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<CacheReport>,
}

fn layer(img: &Image, depth: usize, role: &'static str) -> Result<Layer> {
    // A base served over NBD has no local file to stat.
    let (file_size, disk_size) = match std::fs::metadata(img.path()) {
        Ok(md) => (md.len(), md.blocks() * 512),
        Err(_) => (img.storage().len()?, 0),
    };
    let mut l = Layer {
        depth,
        role,
        path: img.path().display().to_string(),
        format: img.format().name(),
        virtual_size: img.virtual_size(),
        file_size,
        disk_size,
        cluster_size: None,
        version: None,
        refcount_bits: None,
        compression_type: None,
        backing_file: None,
        backing_format: None,
        data_clusters: None,
        zero_clusters: None,
        compressed_clusters: None,
        allocated_bytes: None,
        shared_clusters: None,
        stored_bytes: None,
        saved_bytes: None,
        unreachable: None,
    };
    if let Some(q) = img.as_qcow2() {
        let h = q.header();
        let s = q.allocated_clusters()?;
        let cs = h.geometry.cluster_size();
        l.cluster_size = Some(cs);
        l.version = Some(h.version);
        l.refcount_bits = Some(h.geometry.refcount_bits());
        l.compression_type = Some(h.compression.name());
        l.backing_file = h.backing_file.clone();
        l.backing_format = h.backing_format.clone();
        l.data_clusters = Some(s.data);
        l.zero_clusters = Some(s.zero);
        l.compressed_clusters = Some(s.compressed);
        l.allocated_bytes = Some((s.data + s.compressed) * cs);
        l.shared_clusters = Some(s.shared);
        l.stored_bytes = Some(s.stored_bytes);
        l.saved_bytes = Some(s.saved_bytes(cs));
    }
    if let Some(h) = HoardLayer::of(img) {
        let idx = h.index();
        let c = h.clusters();
        l.cluster_size = Some(1 << idx.cluster_bits);
        l.backing_file = idx.backing_file.clone();
        l.backing_format = idx.backing_format.clone();
        l.data_clusters = Some(c.data);
        l.zero_clusters = Some(c.zero);
        l.compressed_clusters = Some(0);
        l.allocated_bytes = Some(c.data_bytes);
    }
    Ok(l)
}

/// Bytes a trace reads (in whole clusters) and how many of them the cache holds.
fn trace_coverage(cache: &Image, trace: &Path) -> Result<(u64, u64)> {
    use vmicache::engine::layer::{MapMode, Mapping};
    let t = vmicache::chain::trace::Trace::load(trace)?;
    let cs = cluster_size(cache).unwrap_or(64 << 10);
    let size = cache.virtual_size();
    let ranges = vmicache::chain::warm::coalesce(&t.reads, cs, size, u64::MAX / 2);
    let (mut total, mut missing) = (0, 0);
    for (s, n) in ranges {
        total += n;
        let mapped = cache.layer().map(s, n, MapMode::READ)?;
        missing += mapped
            .runs
            .iter()
            .filter(|r| r.map == Mapping::Unallocated)
            .map(|r| r.len)
            .sum::<u64>();
    }
    Ok((total, total - missing))
}

/// The cluster size of a qcow2 or hoarded layer.
fn cluster_size(img: &Image) -> Option<u64> {
    if let Some(q) = img.as_qcow2() {
        return Some(q.geometry().cluster_size());
    }
    HoardLayer::of(img).map(|h| 1u64 << h.index().cluster_bits)
}

/// Bytes of `base`'s data, and how many of them `cache` (one layer) holds.
fn coverage(cache: &Image, base: &Image) -> Result<(u64, u64)> {
    use vmicache::engine::layer::{MapMode, Mapping};
    let (mut total, mut covered) = (0, 0);
    for e in map(base)? {
        if !e.data || e.start >= cache.virtual_size() {
            continue;
        }
        let end = (e.start + e.length).min(cache.virtual_size());
        total += end - e.start;
        let mapped = cache.layer().map(e.start, end - e.start, MapMode::READ)?;
        covered += mapped
            .runs
            .iter()
            .filter(|r| r.map != Mapping::Unallocated)
            .map(|r| r.len)
            .sum::<u64>();
    }
    Ok((total, covered))
}

/// The outcome of a base check as inspect reports it.
fn check_value(
    r: vmicache::Result<Vec<vmicache::chain::identity::Mismatch>>,
) -> Result<serde_json::Value> {
    Ok(match r {
        Ok(m) if m.is_empty() => serde_json::json!("ok"),
        Ok(m) => serde_json::to_value(m)?,
        Err(e) => serde_json::json!(format!("not done: {e}")),
    })
}

/// A base below a cache, reached on demand: the real image, or why it cannot be reached.
fn reach(img: &Image) -> Option<Result<std::sync::Arc<Image>, String>> {
    vmicache::engine::remote::RemoteBase::of(img).map(|r| r.probe())
}

/// A layer, and for a base reached on demand: the base itself, or why it is unreachable.
type Shown<'a> = (&'a Image, Option<std::sync::Arc<Image>>, Option<String>);

/// The layers of `img`'s chain as inspect shows them: bases reached on demand are replaced by
/// their own chain when they can be reached.
fn shown_layers(img: &Image) -> Vec<Shown<'_>> {
    let mut out = Vec::new();
    for l in img.layers() {
        match reach(l) {
            None => out.push((l, None, None)),
            Some(Ok(real)) => out.push((l, Some(real), None)),
            Some(Err(why)) => out.push((l, None, Some(why))),
        }
    }
    out
}

pub fn run(
    path: &Path,
    json: bool,
    want_map: bool,
    verify: bool,
    trace: Option<&Path>,
) -> Result<i32> {
    // Backing files are reached only when needed: inspection never depends on the base.
    let opts = OpenOptions {
        lazy_backing: true,
        ..OpenOptions::read_only()
    };
    let img = Image::open(path, &opts)?;
    let shown = shown_layers(&img);
    if want_map {
        for (l, _, why) in &shown {
            if let Some(why) = why {
                errln!(
                    "vmicache: {}: base unreachable ({why}): what the layers above do not hold is reported as data at its depth, unresolved",
                    l.path().display()
                );
            }
        }
        let m = map(&img)?;
        if json {
            out!("{}", to_qemu_json(&m));
        } else {
            // Layer names by depth, reached bases expanded into their own chains.
            let mut layers: Vec<std::path::PathBuf> = Vec::new();
            for (l, real, _) in &shown {
                match real {
                    Some(r) => layers.extend(r.layers().iter().map(|x| x.path().to_path_buf())),
                    None => layers.push(l.path().to_path_buf()),
                }
            }
            outln!(
                "{:<18} {:<12} {:>5}  {:<10} {:<18} LAYER",
                "START",
                "LENGTH",
                "DEPTH",
                "KIND",
                "OFFSET"
            );
            for e in &m {
                let kind = match (e.present, e.zero, e.compressed) {
                    (false, _, _) => "unallocated",
                    (true, true, _) => "zero",
                    (true, false, true) => "compressed",
                    (true, false, false) => "data",
                };
                outln!(
                    "{:<#18x} {:<12} {:>5}  {:<10} {:<18} {}",
                    e.start,
                    human(e.length),
                    e.depth,
                    kind,
                    e.offset
                        .map(|o| format!("{o:#x}"))
                        .unwrap_or_else(|| "-".into()),
                    layers
                        .get(e.depth)
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
        }
        return Ok(exit::OK);
    }

    let layers = img.layers();
    let cache_depth = layers
        .iter()
        .position(|l| matches!(cache_meta(l), Ok(Some(_))));
    let mut out = Vec::new();
    let mut d = 0;
    for (i, (l, real, why)) in shown.iter().enumerate() {
        let role = match cache_depth {
            Some(c) if i < c => "instance",
            Some(c) if i == c => "cache",
            Some(_) => "base",
            None => "image",
        };
        match (real, why) {
            (Some(real), _) => {
                for r in real.layers() {
                    out.push(layer(r, d, role)?);
                    d += 1;
                }
            }
            (None, Some(why)) => {
                let mut x = layer(l, d, role)?;
                x.format = "unknown";
                (x.file_size, x.disk_size) = (0, 0);
                x.unreachable = Some(why.clone());
                out.push(x);
                d += 1;
            }
            (None, None) => {
                out.push(layer(l, d, role)?);
                d += 1;
            }
        }
    }
    let cache = match cache_depth {
        None => None,
        Some(d) => {
            let c = layers[d];
            let meta = cache_meta(c)?.expect("found above");
            // The base: reached on demand when it is lazy (a sealed cache), else as opened.
            let reached = c.backing().and_then(reach);
            let base: Option<&Image> = match &reached {
                Some(Ok(real)) => Some(real),
                Some(Err(_)) => None,
                None => c.backing(),
            };
            let base_check = match (&reached, verify) {
                (Some(Err(why)), _) => {
                    serde_json::json!(format!("not done: base unreachable: {why}"))
                }
                (_, true) => check_value(verify_base_content(c))?,
                (_, false) => check_value(verify_base(c))?,
            };
            let (base_data_bytes, covered_bytes) = match base {
                Some(b) => {
                    let (t, c) = coverage(c, b)?;
                    (Some(t), Some(c))
                }
                None => (None, None),
            };
            let l = &out[d];
            let (trace_bytes, trace_covered_bytes) = match trace {
                None => (None, None),
                Some(t) => {
                    let (a, b) = trace_coverage(c, t)?;
                    (Some(a), Some(b))
                }
            };
            Some(CacheReport {
                depth: d,
                path: c.path().display().to_string(),
                state: meta.state.name(),
                quota: meta.quota,
                cached_bytes: l.allocated_bytes.unwrap_or(0),
                cached_clusters: l.data_clusters.unwrap_or(0) + l.compressed_clusters.unwrap_or(0),
                base: meta.base,
                base_check,
                base_data_bytes,
                covered_bytes,
                coverage: match (base_data_bytes, covered_bytes) {
                    (Some(0), _) => Some(1.0),
                    (Some(t), Some(c)) => Some(c as f64 / t as f64),
                    _ => None,
                },
                created: meta.created,
                sealed: meta.sealed,
                last_fill: meta.last_fill,
                trace_bytes,
                trace_covered_bytes,
            })
        }
    };
    let r = Report {
        image: path.display().to_string(),
        layers: out,
        cache,
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(exit::OK);
    }
    outln!("{}: {} layer(s)", r.image, r.layers.len());
    for l in &r.layers {
        let mut s = format!("  [{}] {:<8} {}  {}", l.depth, l.role, l.path, l.format);
        if let Some(v) = l.version {
            s += &format!(" v{v}");
        }
        s += &format!(", virtual {}", human(l.virtual_size));
        if let Some(cs) = l.cluster_size {
            s += &format!(", {} clusters", human(cs));
        }
        if let (Some(d), Some(z), Some(c)) =
            (l.data_clusters, l.zero_clusters, l.compressed_clusters)
        {
            s += &format!(
                ", holds {} ({d} data, {z} zero, {c} compressed clusters)",
                human(l.allocated_bytes.unwrap_or(0))
            );
        }
        if let (Some(sh), Some(c), Some(saved)) =
            (l.shared_clusters, l.compressed_clusters, l.saved_bytes)
        {
            if sh > 0 || c > 0 {
                s += &format!(
                    ", compacted: {sh} shared, {c} compressed clusters stored in {}, saves {}",
                    human(l.stored_bytes.unwrap_or(0)),
                    human(saved)
                );
            }
        }
        s += &format!(", on disk {}", human(l.disk_size));
        if let Some(why) = &l.unreachable {
            s = format!(
                "  [{}] {:<8} {}  unreachable: {why}",
                l.depth, l.role, l.path
            );
        }
        outln!("{s}");
    }
    if let Some(c) = &r.cache {
        outln!(
            "cache {}: {}, holds {} in {} clusters, quota {}",
            c.path,
            c.state,
            human(c.cached_bytes),
            c.cached_clusters,
            if c.quota == 0 {
                "none".into()
            } else {
                human(c.quota)
            }
        );
        match (c.covered_bytes, c.base_data_bytes, c.coverage) {
            (Some(cv), Some(t), Some(r)) => outln!(
                "  covers {} of the base's {} of data ({:.1}%)",
                human(cv),
                human(t),
                r * 100.0
            ),
            _ => outln!("  coverage of the base's data: unknown (base unreachable)"),
        }
        if let Some(f) = &c.last_fill {
            outln!(
                "  last fill: {} reads reached the cache, {} hits, {} misses, {} read from the base",
                f.requests,
                f.hits,
                f.misses,
                human(f.base_bytes)
            );
        }
        if let (Some(t), Some(cv)) = (c.trace_bytes, c.trace_covered_bytes) {
            outln!(
                "  trace: the cache holds {} of its {} ({:.1}%)",
                human(cv),
                human(t),
                if t == 0 {
                    100.0
                } else {
                    cv as f64 * 100.0 / t as f64
                }
            );
        }
        if let Some(b) = &c.base {
            let check = match &c.base_check {
                serde_json::Value::String(s) if s == "ok" => "matches".to_string(),
                serde_json::Value::String(s) if s.starts_with("not done") => {
                    format!("identity check {s}")
                }
                v => format!("CHANGED: {v}"),
            };
            outln!(
                "  base {} ({}, {}), fingerprint {}: {}",
                b.path,
                b.format,
                human(b.virtual_size),
                hex(&b.fingerprint[..8]),
                check
            );
        }
    }
    Ok(exit::OK)
}
