//! Command-line front end: argument parsing (clap), human and JSON output, exit codes.

#[macro_use]
pub mod util;
mod analyze;
mod check;
mod config;
mod hoard;
mod hook;
mod inspect;
mod inventory;
mod layers;
mod propagate;
mod register;
mod serve;
mod warm;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Exit codes (documented in --help and the README).
pub mod exit {
    pub const OK: i32 = 0;
    /// Any error: bad arguments, unreadable or invalid image, changed base.
    pub const ERROR: i32 = 1;
    // `check` returns 2 (corruptions) and 3 (leaks only) as qemu-img check does; see
    // `vmicache::engine::check::CheckReport::exit_code`.
}

const AFTER_HELP: &str = "\
A VM boots from a chain of three layers:

    base (raw or qcow2, read-only)  <-  cache (qcow2)  <-  instance (qcow2, one per VM)

`build` makes an empty cache over a base and records the base's identity in it; `chain`
makes a per-VM instance over a cache (refusing if the base changed); `inspect` shows what each
layer holds; `check` verifies qcow2 metadata as `qemu-img check` does.

Exit codes: 0 success; 1 error (the message says what and where); for `check`: 2 corruptions
found, 3 leaked clusters only (the codes of qemu-img check).

Sizes accept suffixes K, M, G, T (powers of 1024; KiB, MiB... also accepted).";

#[derive(Parser, Debug)]
#[command(name = "vmicache", version, about = "Boot-working-set caches for VM images (qcow2)", long_about = None, after_long_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Print less (errors only).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// On errors, print the full chain of causes (one per line) after the one-line message.
    #[arg(short, long, global = true)]
    verbose: bool,
    /// Also allow backing files (and NBD base sockets) below DIR. By default an image's
    /// backing file must lie in that image's own directory or below, so that an image from
    /// elsewhere cannot name /etc/shadow or another guest's disk. Repeatable; the
    /// colon-separated VMICACHE_ALLOW_BACKING adds more.
    #[arg(long, global = true, value_name = "DIR")]
    allow_backing: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an empty cache layer over a base image, recording the base's identity.
    ///
    /// The cache is a qcow2 image whose backing file is BASE. A relative BASE is recorded
    /// relative to the cache's directory, an absolute one as given. The cache records BASE's
    /// format, virtual size and a content fingerprint, so later commands notice a base that
    /// changed under it.
    Build {
        /// The base image (raw or qcow2; format probed unless --base-format).
        base: PathBuf,
        /// Path of the new cache (must not exist).
        #[arg(short, long, value_name = "CACHE")]
        output: PathBuf,
        /// Largest amount of guest data the cache may hold (e.g. 2G); 0 = no limit.
        #[arg(long, value_parser = util::parse_size, default_value = "0")]
        quota: u64,
        /// Cluster size of the cache, 512 B to 2 MiB.
        #[arg(long, value_parser = util::parse_size, default_value = "64K")]
        cluster_size: u64,
        /// Format of BASE: raw or qcow2.
        #[arg(long, value_parser = ["raw", "qcow2"])]
        base_format: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a per-VM copy-on-write instance over a cache.
    ///
    /// Refuses when the cache's base no longer matches the identity recorded at build time
    /// (and says which field changed).
    Chain {
        /// The cache layer (made by `vmicache build`).
        cache: PathBuf,
        /// Path of the new instance overlay (must not exist).
        #[arg(short, long, value_name = "INSTANCE")]
        output: PathBuf,
        /// Cluster size of the instance, 512 B to 2 MiB. The 4 KiB default matches the guest
        /// file system's block size: a guest write then covers whole clusters, and nothing has
        /// to be filled from below (which, on a warm boot, would read the base).
        #[arg(long, value_parser = util::parse_size, default_value = "4K")]
        cluster_size: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Fingerprint the base even when the cache is sealed (reads about 1 MiB of it; a
        /// sealed cache's base is otherwise not contacted: only the size, inode and
        /// modification time it recorded of a local base file are compared).
        #[arg(long)]
        verify: bool,
    },
    /// Show every layer of an image's chain; for a cache, what it holds and whether its base
    /// still matches.
    ///
    /// Never needs the base: an unreachable base is shown as such ("unreachable: why"), the
    /// identity check is then reported as not done, and the exit code stays 0.
    Inspect {
        image: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Fingerprint the base even when the cache is sealed (see `chain --verify`).
        #[arg(long, conflicts_with = "map")]
        verify: bool,
        /// List extents and the layer that holds each (with --json: the shape of
        /// `qemu-img map --output=json`).
        #[arg(long)]
        map: bool,
        /// Say how much of this boot trace the cache holds.
        #[arg(long, conflicts_with = "map")]
        trace: Option<PathBuf>,
    },
    /// Serve VM instances over NBD on a Unix socket, filling their cache by copy-on-read.
    ///
    /// Each INSTANCE is a per-VM overlay (from `vmicache chain`); all must stand on the same
    /// cache. While the cache is not sealed, every read the instance and cache cannot answer
    /// is fetched from the base, returned, and stored in the cache (each cluster exactly once);
    /// writes go only to the instance. Takes QEMU-compatible locks: a second server or a QEMU
    /// writing the same files is refused. Stops on SIGINT/SIGTERM, then flushes, records
    /// hits/misses in the cache and writes the trace (--record).
    ///
    /// Clients connect to nbd+unix:///NAME?socket=PATH (NAME: --export, or the instance's
    /// file stem).
    Serve {
        #[arg(required = true)]
        instances: Vec<PathBuf>,
        /// Unix socket to listen on.
        #[arg(long, short)]
        socket: PathBuf,
        /// Record the reads that went to the base into this trace file.
        #[arg(long)]
        record: Option<PathBuf>,
        /// Export name (one instance only).
        #[arg(long)]
        export: Option<String>,
        /// When another server is filling the cache (it holds the cache's write lock), serve
        /// the instances straight over the cache's base instead of refusing: their reads pass
        /// through (the libvirt hook uses this for concurrent starts on a cold cache).
        #[arg(long)]
        pass_through_if_busy: bool,
        #[command(flatten)]
        limits: serve::LimitArgs,
    },
    /// Fill a cache without booting (replay a trace, or copy all the base holds), or by a
    /// recorded first boot (--boot).
    ///
    /// Reads only what the cache does not hold yet, in large requests with several in flight;
    /// all-zero clusters are recorded as zero clusters (nothing stored). Stops storing data at
    /// the cache's quota. Refuses a sealed cache and a cache whose base changed.
    ///
    /// --boot -- COMMAND...: serve a fresh temporary instance over the cache with recording
    /// on, run COMMAND with `{nbd}` replaced by the NBD URI (for example
    /// `qemu-system-x86_64 ... -drive file={nbd},format=raw,if=virtio`), wait for it to exit,
    /// write the trace next to the cache (CACHE.trace) and seal the cache.
    Warm {
        cache: PathBuf,
        /// Replay this trace (recorded by `vmicache serve --record` or `warm --boot`).
        #[arg(long, conflicts_with_all = ["full", "boot"], required_unless_present_any = ["full", "boot"])]
        trace: Option<PathBuf>,
        /// Copy every allocated cluster of the base (bounded by the quota).
        #[arg(long, conflicts_with = "boot")]
        full: bool,
        /// Record a first boot: run the command after `--` against the served cache.
        #[arg(long)]
        boot: bool,
        /// With --boot: give up (and leave the cache unsealed) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// With --boot: where to write the trace (default CACHE.trace).
        #[arg(long)]
        trace_out: Option<PathBuf>,
        /// With --boot: the boot command; `{nbd}` is replaced by the NBD URI.
        #[arg(last = true)]
        command: Vec<String>,
        /// Base requests in flight.
        #[arg(long, default_value_t = 4)]
        jobs: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mark a cache complete: from now on it is shared read-only and never written.
    ///
    /// --compact rewrites a sealed cache smaller, as a plain qcow2 that QEMU opens natively:
    /// identical clusters share one host cluster (refcount > 1), clusters that compress well
    /// are stored as qcow2 compressed clusters (--compress), all-zero clusters become zero
    /// clusters. The new image is written beside the cache and renamed over it: a crash leaves
    /// the old cache or the new one. Refused for an unsealed cache and while the cache is open
    /// (a server, a QEMU using it).
    Seal {
        cache: PathBuf,
        /// Rewrite the (already sealed) cache compacted instead of sealing it.
        #[arg(long)]
        compact: bool,
        /// With --compact: how clusters are compressed (zstd needs QEMU 5.1 or later).
        #[arg(long, requires = "compact", value_parser = ["zstd", "zlib", "none"], default_value = "zstd")]
        compress: String,
        /// With --compact: print what was done as JSON.
        #[arg(long, requires = "compact")]
        json: bool,
    },
    /// Check a qcow2 image's metadata (refcounts against references, COPIED flags, tables
    /// inside the file), counting as `qemu-img check` counts.
    ///
    /// Exit code 0 clean, 2 corruptions, 3 leaks only, 1 if the check could not run.
    Check {
        image: PathBuf,
        /// Repair what is safe to repair: `leaks` lowers refcounts of leaked clusters.
        #[arg(short, long, value_parser = ["leaks"])]
        repair: Option<String>,
        /// Machine-readable output (the fields of `qemu-img check --output=json`).
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration file (/etc/vmicache/config.yaml; --config, VMICACHE_CONFIG).
    Config {
        #[command(subcommand)]
        cmd: config::ConfigCmd,
    },
    /// The hoard: the sealed caches of many images in one store, deduplicated (4 KiB
    /// chunks, BLAKE3) and compressed (zstd), read in place by `chain` and `serve`.
    ///
    /// The hoard is a directory: --hoard DIR, else $VMICACHE_HOARD, else `dirs.hoard` of the
    /// configuration. A hoarded cache is named by `hoard:NAME` where a cache is expected
    /// (`vmicache chain hoard:NAME -o INSTANCE`), or by its index file DIR/caches/NAME.vmh.
    Hoard(hoard::HoardArgs),
    /// Squirrel's storage metrics over a set of caches or images: per block size and codec,
    /// deduplication ratio, compression ratio, their product (CCR) and the set's
    /// cross-similarity; the baselines "ZFS-style" (64 KiB blocks, dedup, gzip-6 per block)
    /// and "4 KiB fixed + gzip-6"; with --hoard, what the hoard stores against them.
    ///
    /// A cache counts with its own data (what its layer holds); any other image with its
    /// whole content; --bases takes the base beneath each cache instead. Blocks of zeros are
    /// not counted. Blocks compress one by one and are kept compressed only when that saves
    /// 1/8 (ZFS's rule), in 512 B sectors. Cross-similarity: each image's share of distinct
    /// blocks also found in another image of the set, averaged.
    Analyze(analyze::AnalyzeArgs),
    /// What is inside an image, in the guest's terms (offline, read-only): its partitions
    /// (MBR, GPT), ext2/3/4 file systems and their files with size, owner, mode and time; the
    /// packages dpkg installed; for a cache (or an instance over one), how much of each file's
    /// data it holds (whole, part, none) and how much of what it holds is file-system metadata.
    ///
    /// --trace TRACE lists the files a recorded boot read, in first-read order; --diff A B
    /// compares two images (files added, removed, changed; packages). The base is reached only
    /// when a read needs what the layers above do not hold; when it cannot be, the listing is
    /// partial and a warning says what could not be read. Warnings go to stderr (also for a
    /// hostile file system: loops, absurd sizes, entries past the end are reported and
    /// skipped). Examples:
    ///
    ///     vmicache inventory cache.qcow2 --held
    ///     vmicache inventory base.raw --packages --json
    ///     vmicache inventory cache.qcow2 --trace cache.qcow2.trace
    ///     vmicache inventory --diff web.qcow2 db.qcow2
    #[command(verbatim_doc_comment)]
    Inventory(inventory::InventoryArgs),
    /// Register a base image with the hoard: build its cache, record a first boot (the
    /// command after --, as `warm --boot`), seal it, add it to the hoard, and push the new
    /// generation when a registry is configured (the storage node's one command).
    Register(register::RegisterArgs),
    /// Deregister a hoarded cache: remove it from the hoard (a new generation) and push.
    Deregister(register::DeregisterArgs),
    /// The libvirt qemu hook: GUEST OP SUBOP EXTRA, the domain XML on stdin (install
    /// tools/libvirt/qemu as /etc/libvirt/hooks/qemu; see docs/libvirt.md).
    Hook(hook::HookArgs),
    /// Write the manual page (roff) to stdout: `vmicache man > vmicache.1`.
    Man,
    /// Write shell completions to stdout, e.g. `vmicache completions bash >
    /// /etc/bash_completion.d/vmicache`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub fn main() -> i32 {
    vmicache::nbd::register();
    vmicache::hoard::register();
    let cli = Cli::parse();
    let verbose = cli.verbose;
    util::init_log(verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            errln!("vmicache: {}", util::one_line(&e));
            if verbose {
                for (i, cause) in e.chain().enumerate() {
                    errln!("  {i}: {cause:?}");
                }
            }
            exit::ERROR
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    for d in &cli.allow_backing {
        vmicache::engine::open::allow_backing_in(d)?;
    }
    // From the environment, directories that do not exist (on this node) are skipped.
    let from_env = std::env::var_os("VMICACHE_ALLOW_BACKING").unwrap_or_default();
    for d in std::env::split_paths(&from_env).filter(|p| p.is_dir()) {
        vmicache::engine::open::allow_backing_in(&d)?;
    }
    // An operator's configured directories hold the bases, caches and instances it trusts
    // (the hook's configuration file when it is given; errors there are the hook's to report).
    let explicit = match &cli.cmd {
        Cmd::Hook(a) => a.config.as_deref(),
        _ => None,
    };
    if let Ok(cfg) = vmicache::config::Config::load(&vmicache::config::config_path(explicit)) {
        // Caches name bases (dirs.bases, and the base files named in `images`, exactly);
        // instances name caches. Nothing may name an instance: it is not allowed.
        let d = &cfg.dirs;
        let named = cfg
            .images
            .values()
            .filter_map(|e| e.base.as_ref().map(|b| b.0.clone()));
        let allowed: Vec<PathBuf> = d
            .bases
            .iter()
            .map(|x| x.0.clone())
            .chain([d.caches.0.clone()])
            .chain(d.hoard.iter().map(|h| h.0.join("caches")))
            .chain(named)
            .collect();
        for p in allowed {
            let _ = vmicache::engine::open::allow_backing_in(&p);
        }
    }
    match cli.cmd {
        Cmd::Build {
            base,
            output,
            quota,
            cluster_size,
            base_format,
            json,
        } => layers::build(
            &base,
            &output,
            quota,
            cluster_size,
            base_format,
            json,
            cli.quiet,
        ),
        Cmd::Chain {
            cache,
            output,
            cluster_size,
            json,
            verify,
        } => layers::chain(&cache, &output, cluster_size, json, verify, cli.quiet),
        Cmd::Inspect {
            image,
            json,
            verify,
            map,
            trace,
        } => inspect::run(
            &hoard::resolve_cache(&image)?,
            json,
            map,
            verify,
            trace.as_deref(),
        ),
        Cmd::Serve {
            instances,
            socket,
            record,
            export,
            pass_through_if_busy,
            limits,
        } => serve::run_serve(
            &instances,
            &socket,
            record.as_deref(),
            export.as_deref(),
            pass_through_if_busy,
            limits.limits(),
            cli.quiet,
        ),
        Cmd::Warm {
            cache,
            boot: true,
            timeout,
            trace_out,
            command,
            ..
        } => serve::run_boot(&cache, &command, timeout, trace_out.as_deref(), cli.quiet),
        Cmd::Warm {
            cache,
            trace,
            full,
            jobs,
            json,
            ..
        } => warm::run_warm(&cache, trace.as_deref(), full, jobs, json, cli.quiet),
        Cmd::Seal {
            cache,
            compact: true,
            compress,
            json,
        } => warm::run_compact(&cache, &compress, json, cli.quiet),
        Cmd::Seal { cache, .. } => warm::run_seal(&cache, cli.quiet),
        Cmd::Check {
            image,
            repair,
            json,
        } => check::run(&image, repair.is_some(), json),
        Cmd::Config { cmd } => config::run(cmd, cli.quiet),
        Cmd::Hook(args) => hook::run(args),
        Cmd::Hoard(args) => hoard::run(args, cli.quiet),
        Cmd::Register(args) => register::register(args, cli.quiet),
        Cmd::Deregister(args) => register::deregister(args, cli.quiet),
        Cmd::Analyze(args) => analyze::analyze(args, cli.quiet),
        Cmd::Inventory(args) => inventory::run(args, cli.quiet),
        Cmd::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(exit::OK)
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: generate() panics when stdout is closed.
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "vmicache", &mut out);
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(exit::OK)
        }
    }
}
