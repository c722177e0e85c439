//! `vmicache register` and `vmicache deregister`: a base image's cache made, recorded,
//! hoarded and published in one command each (the storage node's side of the hoard).

use super::exit;
use super::hoard::hoard_dir;
use super::propagate::{remote, RemoteArgs};
use super::util::human;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use vmicache::hoard::{self, Hoard};

#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    /// The base image (raw or qcow2).
    base: PathBuf,
    /// The cache's name in the hoard.
    #[arg(long)]
    name: String,
    /// Keep the recorded cache here too (default: it is hoarded and then deleted).
    #[arg(long, value_name = "CACHE")]
    keep_cache: Option<PathBuf>,
    /// The cache's quota (bytes of base data it may hold).
    #[arg(long, value_parser = super::util::parse_size, default_value = "1G")]
    quota: u64,
    /// Give up on the first boot after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Replace a hoarded cache of the same name.
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    publish: Publish,
    /// The boot command, after --; `{nbd}` is replaced by the NBD URI of the cache being
    /// recorded (as `vmicache warm --boot`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct RegisterRemote {
    /// Push to this registry (default: $VMICACHE_REGISTRY, else the configuration's).
    #[arg(long, value_name = "REF")]
    registry: Option<String>,
    /// Plain HTTP to a registry that is not on a loopback address.
    #[arg(long)]
    insecure: bool,
}

impl RegisterRemote {
    fn args(&self) -> RemoteArgs {
        RemoteArgs {
            reference: self.registry.clone(),
            insecure: self.insecure,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct DeregisterArgs {
    /// The hoarded cache's name.
    name: String,
    #[command(flatten)]
    publish: Publish,
}

/// Where register and deregister work, and whether they push.
#[derive(clap::Args, Debug)]
struct Publish {
    /// Do not push the new generation even when a registry is configured.
    #[arg(long)]
    no_push: bool,
    /// The hoard directory (default: $VMICACHE_HOARD, else dirs.hoard of the configuration).
    #[arg(long, value_name = "DIR")]
    hoard: Option<PathBuf>,
    #[command(flatten)]
    registry: RegisterRemote,
}

/// Push the newest generation when a registry is known (and not --no-push).
fn publish(h: &Hoard, p: &Publish, quiet: bool) -> Result<()> {
    if p.no_push {
        return Ok(());
    }
    let Some(remote) = remote(&p.registry.args())? else {
        if !quiet {
            outln!("no registry configured: nothing pushed");
        }
        return Ok(());
    };
    let p = hoard::registry::push(h, &remote)?;
    if !quiet {
        outln!(
            "pushed generation {} to {}: {} blobs uploaded ({})",
            p.generation,
            p.reference,
            p.uploaded,
            human(p.uploaded_bytes)
        );
    }
    Ok(())
}

pub fn register(a: RegisterArgs, quiet: bool) -> Result<i32> {
    let h = Hoard::open(&hoard_dir(a.publish.hoard.as_deref())?)?;
    hoard::store::check_name(&a.name)?;
    if !a.replace && h.head_caches()?.contains_key(&a.name) {
        bail!(
            "'{}' is registered already (deregister it first, or --replace; if its push failed, `vmicache hoard push` publishes it)",
            a.name
        );
    }
    // A base file as an absolute path: the cache records it, and nodes find it by it (a
    // URI stays as it is).
    let base = std::fs::canonicalize(&a.base).unwrap_or_else(|_| a.base.clone());
    // Scratch in the hoard's file system (a cache may be large), in a directory `hoard gc`
    // removes once this process is gone.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let scratch = h
        .dir()
        .join(format!(".register-{}-{nanos:09}", std::process::id()));
    let cache = match &a.keep_cache {
        Some(p) => p.clone(),
        None => {
            std::fs::create_dir(&scratch)
                .with_context(|| format!("{}: create", scratch.display()))?;
            scratch.join(format!("{}.qcow2", a.name))
        }
    };
    // Held while we run: `hoard gc` removes the scratch of registers that are gone.
    let _scratch_lock = match a.keep_cache {
        None => Some(hoard::store::lock_scratch(&scratch)?),
        Some(_) => None,
    };
    let trace = hoard::checkout::trace_path(&cache);
    let result = (|| -> Result<hoard::add::AddReport> {
        super::layers::build(&base, &cache, a.quota, 65536, None, false, true)?;
        super::serve::run_boot(&cache, &a.command, a.timeout, Some(&trace), quiet)?;
        let o = hoard::add::AddOptions {
            name: a.name.clone(),
            replace: a.replace,
            trace: std::fs::read(&trace).with_context(|| format!("{}: read", trace.display()))?,
            progress: None,
        };
        Ok(hoard::add::add(&h, &cache, &o)?)
    })();
    if a.keep_cache.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let r = result?;
    if !quiet {
        outln!(
            "registered '{}': {} of data, {} new in the hoard ({} in packs)",
            a.name,
            human(r.data_bytes),
            human(r.new_chunks * 4096),
            human(r.new_pack_bytes)
        );
    }
    publish(&h, &a.publish, quiet)?;
    Ok(exit::OK)
}

pub fn deregister(a: DeregisterArgs, quiet: bool) -> Result<i32> {
    let h = Hoard::open(&hoard_dir(a.publish.hoard.as_deref())?)?;
    hoard::stats::remove(&h, &a.name)?;
    if !quiet {
        outln!(
            "deregistered '{}' ({}); its data goes with `hoard gc` after the GC window",
            a.name,
            h.dir().display()
        );
    }
    publish(&h, &a.publish, quiet)?;
    Ok(exit::OK)
}
