//! `vmicache hoard ...`: the store of many caches.

use super::exit;
use super::util::human;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use vmicache::hoard::{self, Hoard};

#[derive(clap::Args, Debug)]
pub struct HoardArgs {
    #[command(subcommand)]
    cmd: HoardCmd,
    /// The hoard directory (default: $VMICACHE_HOARD, else dirs.hoard of the configuration).
    #[arg(long, global = true, value_name = "DIR")]
    hoard: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum HoardCmd {
    /// Make DIR a hoard (created if missing; an existing hoard is left as it is).
    ///
    /// On an existing hoard of format 1 it upgrades it (its caches become generation 1).
    Init {
        /// The directory (default: --hoard).
        dir: Option<PathBuf>,
        /// Point a missing or damaged HEAD at the newest generation whose indexes and packs
        /// are all present (and bring caches/ to it).
        #[arg(long)]
        repair: bool,
    },
    /// Register a sealed cache: store the clusters it holds, deduplicated against everything
    /// hoarded, compressed; keep its geometry, base, vmicache extension and trace.
    ///
    /// Refuses a cache that is not sealed. Adding a cache whose chunks are all hoarded
    /// stores nothing new but its index. A kill at any point leaves the hoard as it was (and
    /// at worst a pack that `hoard gc` removes). Writers (add, rm, gc) run one at a time.
    Add {
        cache: PathBuf,
        /// Its name in the hoard (default: the cache's file name without extension).
        #[arg(long)]
        name: Option<String>,
        /// The recorded first boot (default: CACHE.trace when it exists): chunks are packed
        /// in its order, so a boot reads consecutive frames.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Replace a hoarded cache of the same name (instances over it read the new one from
        /// their next start: an instance records no identity of the cache beneath it).
        #[arg(long)]
        replace: bool,
    },
    /// List the hoarded caches and what each holds.
    List,
    /// What the hoard stores: sizes, deduplication and compression ratios, metadata per
    /// chunk.
    Stats,
    /// Deregister a cache (its chunks stay until `hoard gc`).
    Rm { name: String },
    /// Delete generations older than the GC window and packs no kept generation uses;
    /// repack packs that are mostly unused.
    Gc {
        /// Repack every pack at this zstd level (e.g. 19): smaller, slower; off the hot path
        /// of `hoard add`, which uses the fast level of hoard.yaml.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=22))]
        recompress: Option<i32>,
        /// With --recompress: chunks per compressed frame (default: hoard.yaml's).
        #[arg(long, requires = "recompress", value_parser = clap::value_parser!(u32).range(1..=256))]
        frame_chunks: Option<u32>,
        /// Keep the generations of the last N days (and always the newest); older ones, and
        /// what only they use, are deleted (default: keep_days of hoard.yaml, 7).
        #[arg(long, value_name = "N")]
        keep_days: Option<u32>,
        /// Delete only, never repack: no generation of this node's own (for compute nodes
        /// that follow a registry; tools/libvirt/vmicache-hoard-sync.service uses it).
        #[arg(long, conflicts_with = "recompress")]
        no_repack: bool,
        /// Also remove the registry's tags gen-N of generations out of the window (REF as in
        /// `hoard push`; its blobs go with the registry's own garbage collector).
        #[arg(long, value_name = "REF", num_args = 0..=1, default_missing_value = "")]
        registry: Option<String>,
    },
    /// The generations kept here, newest first: number, time, change, caches.
    Log,
    /// Write what a node at generation GEN lacks to reach the newest generation (new packs,
    /// changed indexes, the generation's record), as one stream: `hoard send --from 7 |
    /// ssh node vmicache hoard receive`. Without --from, a full stream any node takes.
    Send {
        /// The receiver's generation (it must be kept here: see `hoard log`).
        #[arg(long, value_name = "GEN")]
        from: Option<u64>,
        /// Write the stream to FILE (default: standard output, which must not be a terminal).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Apply a stream of `hoard send` (from FILE, or standard input when FILE is - or
    /// missing): every item checked against its hash, the new generation committed at the
    /// end only (a kill leaves the previous one in force). Refuses a stream that starts from
    /// another generation than this hoard's, naming both.
    Receive {
        file: Option<PathBuf>,
        /// Accept a full stream of an older generation than this hoard's.
        #[arg(long)]
        force: bool,
    },
    /// Publish the newest generation in an OCI registry: every index and pack as a blob (only
    /// those the registry lacks are uploaded), the generation's record as the config, tags
    /// gen-N and latest.
    Push(super::propagate::RemoteArgs),
    /// Bring this hoard to the generation in an OCI registry (REF's tag, else latest),
    /// downloading only the blobs it lacks, each checked; HEAD moves last.
    Pull {
        #[command(flatten)]
        remote: super::propagate::RemoteArgs,
        /// Accept an older generation than this hoard's.
        #[arg(long)]
        force: bool,
    },
    /// Catch up with the registry's latest generation, however long this node was away
    /// (for node start-up: tools/libvirt/vmicache-hoard-sync.service; the hook's reconnect
    /// starts one too), retrying while the registry cannot be reached. One sync at a time: a
    /// second exits at once.
    Sync {
        #[command(flatten)]
        remote: super::propagate::RemoteArgs,
        /// Keep retrying for this many seconds when the registry cannot be reached.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        retry_for: u64,
    },
    /// Check every pack's hash, every frame and chunk, and that every index resolves.
    ///
    /// Exit code 0 when all is well, 2 when something is damaged (each problem named).
    Verify,
    /// Which hoarded caches hold a file or a package matching PATTERN (a glob): against whole
    /// paths when it starts with `/` (`/usr/lib/*/libssl.so.3`), else against file names
    /// (`sshd`, `*.ko`); and against package names, or `name=version` (`openssl=3.0.*`).
    /// Each file found says how much of its data the cache holds (whole, part, none).
    Find { pattern: String },
    /// Write a hoarded cache as an ordinary qcow2 cache (for QEMU's native chain): equal in
    /// content, with its base, vmicache extension and trace (OUTPUT.trace).
    Checkout {
        name: String,
        #[arg(short, long, value_name = "CACHE")]
        output: PathBuf,
    },
    /// Print the index file of a hoarded cache: what a chain names.
    Path { name: String },
}

/// The hoard directory from the command line, the environment or the configuration.
pub fn hoard_dir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    if let Some(d) = std::env::var_os("VMICACHE_HOARD").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let path = vmicache::config::config_path(None);
    if let Ok(cfg) = vmicache::config::Config::load(&path) {
        if let Some(h) = cfg.dirs.hoard {
            return Ok(h.0);
        }
    }
    bail!("no hoard: give --hoard DIR, set VMICACHE_HOARD, or set dirs.hoard in the configuration")
}

/// `hoard:NAME` as the index file of that hoarded cache; other names as they are.
pub fn resolve_cache(arg: &Path) -> Result<PathBuf> {
    match arg.to_str().and_then(|s| s.strip_prefix("hoard:")) {
        None => Ok(arg.to_path_buf()),
        Some(name) => {
            let h = Hoard::open(&hoard_dir(None)?)?;
            index_file(&h, name)
        }
    }
}

/// The index file of hoarded cache `name`, as a chain names it.
pub fn index_file(h: &Hoard, name: &str) -> Result<PathBuf> {
    let id = h.index_id(name)?;
    // The view names it (a gc that replaces the index is followed there); a view a stopped
    // writer left behind is put right first (under the writers' lock).
    if !h.is_view_of(name, &id) {
        let _lock = h.lock()?;
        h.sync_view()?;
        h.index_id(name)?;
    }
    Ok(h.index_path(name))
}

fn bar(total: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:40}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .unwrap()
        .progress_chars("=> "),
    );
    b
}

pub fn ratio(x: f64) -> String {
    format!("{x:.2}x")
}

pub fn run(a: HoardArgs, quiet: bool) -> Result<i32> {
    let json = a.json;
    let quiet = quiet || json;
    let open = || -> Result<Hoard> { Ok(Hoard::open(&hoard_dir(a.hoard.as_deref())?)?) };
    match a.cmd {
        HoardCmd::Init { dir, repair } => {
            let d = match dir {
                Some(d) => d,
                None => hoard_dir(a.hoard.as_deref())?,
            };
            let (h, new) = Hoard::init(&d)?;
            if repair {
                let lock = h.lock()?;
                match h.repair_head(&lock)? {
                    Some(n) => outln!("{}: HEAD repaired: generation {n}", d.display()),
                    None => outln!("{}: HEAD is sound: nothing to repair", d.display()),
                }
                h.sync_view()?;
                return Ok(exit::OK);
            }
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"hoard": d.display().to_string(), "created": new})
                );
            } else if !quiet {
                outln!(
                    "{} {} (frames of {} chunks, zstd level {})",
                    if new {
                        "created hoard"
                    } else {
                        "already a hoard:"
                    },
                    h.dir().display(),
                    h.settings.frame_chunks,
                    h.settings.level
                );
            }
        }
        HoardCmd::Add {
            cache,
            name,
            trace,
            replace,
        } => {
            let h = open()?;
            let name = match name {
                Some(n) => n,
                None => cache
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .context("the cache has no file name: give --name")?,
            };
            let tpath = trace.or_else(|| {
                let t = hoard::checkout::trace_path(&cache);
                t.exists().then_some(t)
            });
            let tbytes = match &tpath {
                Some(t) => {
                    let len = std::fs::metadata(t)
                        .with_context(|| format!("{}: trace", t.display()))?
                        .len();
                    if len > hoard::add::MAX_TRACE_BYTES {
                        bail!(
                            "{}: a trace of {len} B is more than a trace takes",
                            t.display()
                        );
                    }
                    std::fs::read(t).with_context(|| format!("{}: read", t.display()))?
                }
                None => Vec::new(),
            };
            let b = bar(0, quiet, "hoarding");
            let progress = |done: u64, all: u64| {
                b.set_length(all);
                b.set_position(done);
            };
            let o = hoard::add::AddOptions {
                name,
                replace,
                trace: tbytes,
                progress: Some(&progress),
            };
            let r = hoard::add::add(&h, &cache, &o)?;
            b.finish_and_clear();
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else if !quiet {
                outln!(
                    "hoarded {} as '{}': {} of data in {:.2} s ({}/s); {} already hoarded, {} zeros, {} new in {} chunks -> {} in packs",
                    cache.display(),
                    r.name,
                    human(r.data_bytes),
                    r.seconds,
                    human((r.data_bytes as f64 / r.seconds.max(1e-9)) as u64),
                    human(r.dedup_bytes),
                    human(r.zero_bytes),
                    human(r.new_chunks * 4096),
                    r.new_chunks,
                    human(r.new_pack_bytes)
                );
            }
        }
        HoardCmd::List | HoardCmd::Stats => {
            let h = open()?;
            let s = hoard::stats::stats(&h)?;
            let list = matches!(a.cmd, HoardCmd::List);
            if json {
                if list {
                    outln!("{}", serde_json::to_string_pretty(&s.caches)?);
                } else {
                    outln!("{}", serde_json::to_string_pretty(&s)?);
                }
                return Ok(exit::OK);
            }
            if list {
                outln!(
                    "{:<32} {:>10} {:>10} {:>10} {:>7}  base",
                    "NAME",
                    "SIZE",
                    "DATA",
                    "ZEROS",
                    "RUNS"
                );
                for c in &s.caches {
                    if let Some(e) = &c.error {
                        outln!("{:<32} error: {e}", c.name);
                        continue;
                    }
                    outln!(
                        "{:<32} {:>10} {:>10} {:>10} {:>7}  {}",
                        c.name,
                        human(c.virtual_size),
                        human(c.data_bytes),
                        human(c.zero_bytes),
                        c.runs,
                        c.base.as_deref().unwrap_or("-")
                    );
                }
            }
            outln!(
                "{} caches, {} of data; stored in {} packs: {} ({} unique chunks, {} in use); dedup {}, compression {}, overall {}; metadata {:.1} B per chunk on disk, {:.1} B in a server's memory",
                s.caches.len(),
                human(s.logical_bytes),
                s.packs,
                human(s.pack_bytes + s.index_bytes),
                s.stored_chunks,
                s.live_chunks,
                ratio(s.dedup_ratio),
                ratio(s.compression_ratio),
                ratio(s.total_ratio),
                s.metadata_per_chunk,
                s.memory_per_chunk
            );
        }
        HoardCmd::Rm { name } => {
            let h = open()?;
            hoard::stats::remove(&h, &name)?;
            if json {
                outln!("{}", serde_json::json!({"removed": name}));
            } else if !quiet {
                outln!(
                    "removed '{name}' from the hoard ({}); `hoard gc` reclaims its chunks",
                    h.dir().display()
                );
            }
        }
        HoardCmd::Gc {
            recompress,
            frame_chunks,
            keep_days,
            no_repack,
            registry,
        } => {
            let h = open()?;
            let o = hoard::gc::GcOptions {
                recompress,
                frame_chunks,
                keep_days,
                no_repack,
            };
            let r = hoard::gc::gc(&h, &o)?;
            let pruned = match registry {
                Some(reg) => Some(super::propagate::prune(&h, keep_days, reg)?),
                None => None,
            };
            if json {
                let mut v = serde_json::to_value(&r)?;
                if let Some((reg, n)) = &pruned {
                    v["registry"] = serde_json::json!({"reference": reg, "tags_removed": n});
                }
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else if !quiet {
                outln!(
                    "gc: {} -> {} in packs in {:.2} s; {} generations kept, {} deleted ({} indexes); {} packs deleted, {} repacked into {}, {} indexes rewritten, {} leftovers removed",
                    human(r.bytes_before),
                    human(r.bytes_after),
                    r.seconds,
                    r.kept_generations,
                    r.deleted_generations,
                    r.deleted_indexes,
                    r.deleted_packs,
                    r.repacked,
                    r.new_packs,
                    r.indexes_rewritten,
                    r.leftovers
                );
            }
            if let (Some((reg, n)), false) = (&pruned, json || quiet) {
                outln!("{reg}: {n} tags out of the GC window removed (the registry's garbage collector reclaims their blobs)");
            }
        }
        HoardCmd::Find { pattern } => {
            let h = open()?;
            let names: Vec<String> = h
                .head()?
                .map(|(_, g)| g.caches.into_keys().collect())
                .unwrap_or_default();
            let found = super::inventory::find(&h, &names, &pattern, !quiet)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                for f in &found {
                    outln!(
                        "{}\t{}\t{}{}",
                        f.cache,
                        f.kind,
                        f.what,
                        f.held.map_or(String::new(), |h| format!("\t{h}"))
                    );
                }
                if found.is_empty() && !quiet {
                    errln!(
                        "vmicache: nothing in {} hoarded caches matches {pattern:?}",
                        names.len()
                    );
                }
            }
            return Ok(if found.is_empty() {
                exit::ERROR
            } else {
                exit::OK
            });
        }
        HoardCmd::Verify => {
            let h = open()?;
            let r = hoard::verify::verify(&h)?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for p in &r.problems {
                    errln!("vmicache: hoard damaged: {p}");
                }
                if !quiet {
                    for n in &r.notes {
                        outln!("note: {n}");
                    }
                    outln!(
                        "verified {} packs ({} chunks) and {} caches: {}",
                        r.packs,
                        r.chunks,
                        r.caches,
                        if r.problems.is_empty() {
                            "all well".to_string()
                        } else {
                            format!("{} problems", r.problems.len())
                        }
                    );
                }
            }
            return Ok(if r.problems.is_empty() { exit::OK } else { 2 });
        }
        HoardCmd::Checkout { name, output } => {
            let h = open()?;
            let b = bar(0, quiet, "checkout");
            let progress = |done: u64, all: u64| {
                b.set_length(all);
                b.set_position(done);
            };
            let r = hoard::checkout::checkout(&h, &name, &output, Some(&progress))?;
            b.finish_and_clear();
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else if !quiet {
                outln!(
                    "wrote '{}' to {}: {} of data in {:.2} s ({}/s), file {}",
                    r.name,
                    r.output,
                    human(r.data_bytes),
                    r.seconds,
                    human((r.data_bytes as f64 / r.seconds.max(1e-9)) as u64),
                    human(r.file_bytes)
                );
            }
        }
        HoardCmd::Path { name } => {
            let h = open()?;
            outln!("{}", index_file(&h, &name)?.display());
        }
        HoardCmd::Log => return super::propagate::log(&open()?, json),
        HoardCmd::Send { from, output } => {
            return super::propagate::send(&open()?, from, output.as_deref(), json, quiet)
        }
        HoardCmd::Push(r) => return super::propagate::push(&open()?, &r, json, quiet),
        HoardCmd::Pull { remote, force } => {
            return super::propagate::pull(&open()?, &remote, force, 0, json, quiet)
        }
        HoardCmd::Sync { remote, retry_for } => {
            let h = open()?;
            let Some(_sync) = h.try_sync_lock()? else {
                if !quiet {
                    outln!("another hoard sync is at work here: nothing to do");
                }
                return Ok(exit::OK);
            };
            let code = super::propagate::pull(&h, &remote, false, retry_for, json, quiet)?;
            // A sync that found this one at work and left may have come for a newer generation
            // than the one fetched: look once more (cheap when nothing changed).
            let _ = super::propagate::pull(&h, &remote, false, 0, false, true);
            return Ok(code);
        }
        HoardCmd::Receive { file, force } => {
            return super::propagate::receive(&open()?, file.as_deref(), force, json, quiet)
        }
    }
    Ok(exit::OK)
}
