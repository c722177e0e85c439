//! `vmicache inventory`: what is inside an image or a cache, in the guest's terms; and
//! `hoard find`, the same across every hoarded cache.

use super::exit;
use super::util::human;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use vmicache::engine::{Image, OpenOptions};
use vmicache::format::trace::Trace;
use vmicache::hoard::Hoard;
use vmicache::inventory::{self, diff, trace, Entry, Inventory, Options};

#[derive(clap::Args, Debug)]
pub struct InventoryArgs {
    /// The image: raw, qcow2, a cache, an instance, or `hoard:NAME`. With --diff, two.
    #[arg(required = true, num_args = 1..=2, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Compare two images: files and packages added, removed and changed (content compared
    /// for files of equal size).
    #[arg(long)]
    diff: bool,
    /// The files a recorded boot read (a trace of `warm --record` or `serve --record`), in
    /// first-read order, with the bytes it read of each.
    #[arg(long, value_name = "TRACE", conflicts_with = "diff")]
    trace: Option<PathBuf>,
    /// List only the installed packages.
    #[arg(long, conflicts_with_all = ["diff", "trace"])]
    packages: bool,
    /// List only files of which the cache holds some data.
    #[arg(long, conflicts_with_all = ["diff", "trace", "packages"])]
    held: bool,
    /// Print only the summary (partitions, file systems, cache, counts).
    #[arg(long, conflicts_with_all = ["diff", "trace", "packages", "held"])]
    summary: bool,
    /// Stop listing after this many entries (a hostile file system may claim millions).
    #[arg(long, default_value_t = 4_000_000)]
    max_entries: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Open for inspection: read-only, the base reached only when a read needs it.
pub fn open(path: &Path) -> Result<Image> {
    let opts = OpenOptions {
        lazy_backing: true,
        ..OpenOptions::read_only()
    };
    let path = super::hoard::resolve_cache(path)?;
    Image::open(&path, &opts).with_context(|| format!("{}: cannot open", path.display()))
}

pub fn take(path: &Path, opts: &Options) -> Result<Inventory> {
    let img = open(path)?;
    Ok(inventory::take(img, &path.display().to_string(), opts)?)
}

pub fn run(a: InventoryArgs, quiet: bool) -> Result<i32> {
    if a.diff != (a.images.len() == 2) {
        bail!("--diff compares two images; without it, give one");
    }
    let opts = Options {
        keep_ranges: a.trace.is_some(),
        hash_content: a.diff,
        max_entries: a.max_entries,
    };
    let invs: Vec<Inventory> = a
        .images
        .iter()
        .map(|p| take(p, &opts))
        .collect::<Result<_>>()?;
    if !quiet {
        for inv in &invs {
            for w in &inv.warnings {
                errln!("vmicache: {}: {w}", inv.image);
            }
        }
    }
    if a.diff {
        for inv in invs.iter().filter(|i| !quiet && !i.warnings.is_empty()) {
            errln!(
                "vmicache: {}: read with warnings ({}): the comparison may be partial (what was not read shows as added, removed or content unknown)",
                inv.image,
                inv.warnings.len()
            );
        }
        let d = diff::diff(&invs[0], &invs[1]);
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            print_diff(&d);
        }
        return Ok(exit::OK);
    }
    let inv = &invs[0];
    if let Some(t) = &a.trace {
        let tr = Trace::load(t)?;
        if inv
            .base_fingerprint
            .is_some_and(|f| f != tr.base_fingerprint)
        {
            bail!(
                "{}: the trace is of another base than the one {} records",
                t.display(),
                inv.image
            );
        }
        if tr.base_size != inv.disk_bytes {
            bail!(
                "{}: the trace is of a disk of {} bytes, the image has {}",
                t.display(),
                tr.base_size,
                inv.disk_bytes
            );
        }
        let r = trace::attribute(inv, &tr);
        if a.json {
            outln!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            outln!(
                "{} reads, {}: {} in {} files, {} elsewhere (file-system metadata)",
                r.reads,
                human(r.bytes),
                human(r.bytes - r.other_bytes),
                r.files.len(),
                human(r.other_bytes)
            );
            outln!("{:>7} {:>10} {:>10}  PATH", "ORDER", "READ", "SIZE");
            for (i, f) in r.files.iter().enumerate() {
                outln!(
                    "{:>7} {:>10} {:>10}  {}",
                    i + 1,
                    human(f.read),
                    human(f.size),
                    f.path
                );
            }
        }
        return Ok(exit::OK);
    }
    if a.json {
        if a.packages {
            outln!("{}", serde_json::to_string_pretty(&inv.packages)?);
        } else {
            outln!("{}", serde_json::to_string_pretty(inv)?);
        }
        return Ok(exit::OK);
    }
    if a.packages {
        for p in &inv.packages {
            outln!("{} {}", p.name, p.version);
        }
        return Ok(exit::OK);
    }
    print_summary(inv);
    if !a.summary {
        let cache = inv.cache.is_some();
        for e in &inv.entries {
            if a.held && e.held.is_none_or(|h| h.held == 0) {
                continue;
            }
            outln!("{}", line(e, cache));
        }
    }
    Ok(exit::OK)
}

fn print_summary(inv: &Inventory) {
    let what = match inv.layers {
        1 => "an image on its own".to_string(),
        n => format!("a chain of {n} layers"),
    };
    outln!("{}: {what}, disk {}", inv.image, human(inv.disk_bytes));
    for p in &inv.partitions {
        let fs = inv.filesystems.iter().find(|f| f.partition == p.number);
        let name = if p.name.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", p.name)
        };
        match fs {
            Some(f) => outln!(
                "  partition {} ({}{name}, {} at {}): ext \"{}\" {}, {} blocks; {} entries, {} of file data",
                p.number,
                p.kind,
                human(p.len),
                p.start,
                f.label,
                f.uuid,
                human(f.block_size),
                f.entries,
                human(f.data_bytes)
            ),
            None => outln!("  partition {} ({}{name}, {} at {}): no ext file system", p.number, p.kind, human(p.len), p.start),
        }
    }
    if let Some(c) = &inv.cache {
        outln!(
            "  cache holds {}: {} of file data ({} files whole, {} part, {} none), {} of metadata",
            human(c.held_bytes),
            human(c.file_data),
            c.files_whole,
            c.files_part,
            c.files_none,
            human(c.metadata)
        );
    }
    outln!("  packages: {} (dpkg)", inv.packages.len());
}

fn mode_string(e: &Entry) -> String {
    let m = e.mode;
    let mut s = String::with_capacity(10);
    s.push(e.kind);
    for (shift, special, lower, upper) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (m >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, m & special != 0) {
            (true, true) => lower,
            (false, true) => upper,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

fn line(e: &Entry, cache: bool) -> String {
    let held = if cache {
        format!("{:<6}", e.held.map_or("-", |h| h.word()))
    } else {
        String::new()
    };
    let date = vmicache::hoard::gens::rfc3339(e.mtime.max(0) as u64);
    let prefix = if e.fs == 0 {
        String::new()
    } else {
        format!("[{}]", e.fs)
    };
    let target = e
        .target
        .as_ref()
        .map_or(String::new(), |t| format!(" -> {t}"));
    format!(
        "{} {:>5} {:>5} {:>12} {} {held}{prefix}{}{target}",
        mode_string(e),
        e.uid,
        e.gid,
        e.size,
        &date[..16],
        e.path
    )
}

fn print_diff(d: &diff::Diff) {
    for p in &d.added {
        outln!("+ {p}");
    }
    for p in &d.removed {
        outln!("- {p}");
    }
    for c in &d.changed {
        outln!("~ {} ({})", c.path, c.what.join(", "));
    }
    for p in &d.packages_added {
        outln!("+ package {} {}", p.name, p.version);
    }
    for p in &d.packages_removed {
        outln!("- package {} {}", p.name, p.version);
    }
    for (n, a, b) in &d.packages_changed {
        outln!("~ package {n} {a} -> {b}");
    }
    outln!(
        "{} added, {} removed, {} changed; packages: {} added, {} removed, {} changed",
        d.added.len(),
        d.removed.len(),
        d.changed.len(),
        d.packages_added.len(),
        d.packages_removed.len(),
        d.packages_changed.len()
    );
}

/// A match of `hoard find`.
#[derive(Debug, serde::Serialize)]
pub struct Found {
    pub cache: String,
    /// `file` or `package`.
    pub kind: &'static str,
    pub what: String,
    /// For a file: whole, part, none or `-` (no data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<&'static str>,
}

/// Which of the hoarded caches `names` hold a file or a package matching `pattern`:
/// a glob matched against whole paths when it starts with `/`, else against file names; and
/// against package names (or `name=version`).
pub fn find(h: &Hoard, names: &[String], pattern: &str, warn: bool) -> Result<Vec<Found>> {
    let pat = glob::Pattern::new(pattern).with_context(|| format!("pattern {pattern:?}"))?;
    // `*` stays within one path component, as in a shell.
    let path_opts = glob::MatchOptions {
        require_literal_separator: true,
        ..Default::default()
    };
    let mut out = Vec::new();
    for name in names {
        // A cache that cannot be read is said and skipped: the others still answer.
        let inv =
            match super::hoard::index_file(h, name).and_then(|i| take(&i, &Options::default())) {
                Ok(inv) => inv,
                Err(e) => {
                    errln!(
                        "vmicache: hoard:{name}: not searched: {}",
                        super::util::one_line(&e)
                    );
                    continue;
                }
            };
        if warn {
            for w in &inv.warnings {
                errln!("vmicache: hoard:{name}: {w}");
            }
        }
        for e in &inv.entries {
            let subject = if pattern.starts_with('/') {
                e.path.as_str()
            } else {
                e.path.rsplit('/').next().unwrap_or("")
            };
            if pat.matches_with(subject, path_opts) {
                out.push(Found {
                    cache: name.clone(),
                    kind: "file",
                    what: e.path.clone(),
                    held: Some(e.held.map_or("-", |h| h.word())),
                });
            }
        }
        for p in &inv.packages {
            if pat.matches(&p.name) || pat.matches(&format!("{}={}", p.name, p.version)) {
                out.push(Found {
                    cache: name.clone(),
                    kind: "package",
                    what: format!("{} {}", p.name, p.version),
                    held: None,
                });
            }
        }
    }
    Ok(out)
}
