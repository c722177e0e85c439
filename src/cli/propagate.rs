//! `vmicache hoard log|send|receive|push|pull|sync`: a hoard's generations, and how they
//! travel between nodes.

use super::exit;
use super::util::human;
use anyhow::{bail, Context, Result};
use std::path::Path;
use vmicache::hoard::registry::{Auth, Remote};
use vmicache::hoard::{self, Hoard};

/// Seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(t: u64) -> String {
    hoard::gens::rfc3339(t).replace('T', " ").replace('Z', "")
}

pub fn log(h: &Hoard, json: bool) -> Result<i32> {
    let hist = h.history()?;
    if json {
        let v: Vec<_> = hist
            .iter()
            .map(|(id, g)| {
                serde_json::json!({
                    "id": vmicache::hoard::format::hex(id),
                    "generation": g.generation,
                    "time": g.time,
                    "parent": g.parent,
                    "change": g.change,
                    "caches": g.caches,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    if hist.is_empty() {
        outln!("no generations yet (the first `hoard add` makes generation 1)");
    }
    for (id, g) in &hist {
        outln!(
            "generation {:<5} {}  {}  {:>4} caches  {}",
            g.generation,
            utc(g.time),
            &vmicache::hoard::format::hex(id)[..16],
            g.caches.len(),
            g.change
        );
    }
    if let Some((_, g)) = hist.last() {
        if g.parent.is_some() {
            outln!("(older generations are not kept here)");
        }
    }
    Ok(exit::OK)
}

pub fn send(
    h: &Hoard,
    from: Option<u64>,
    output: Option<&Path>,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    use std::io::IsTerminal;
    let r = match output {
        Some(p) => {
            let tmp = p.with_file_name(format!(
                ".{}.partial",
                p.file_name()
                    .map_or("stream".into(), |n| n.to_string_lossy())
            ));
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("{}: create", tmp.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            let r = hoard::stream::send(h, from, &mut w);
            let r = r.and_then(|r| {
                w.into_inner()
                    .map_err(|e| vmicache::Error::io(p, "write", e.into_error()))?
                    .sync_all()
                    .map_err(|e| vmicache::Error::io(p, "sync", e))?;
                Ok(r)
            });
            match r {
                Ok(r) => {
                    std::fs::rename(&tmp, p).with_context(|| format!("{}: rename", p.display()))?;
                    r
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
        None => {
            let out = std::io::stdout();
            if out.is_terminal() {
                bail!("hoard send writes a binary stream: give -o FILE or pipe it (to `hoard receive`, ssh, ...)");
            }
            let mut w = std::io::BufWriter::with_capacity(1 << 20, out.lock());
            hoard::stream::send(h, from, &mut w)?
        }
    };
    report(
        &r,
        "sent",
        json && output.is_some(),
        quiet || output.is_none(),
    );
    Ok(exit::OK)
}

pub fn receive(
    h: &Hoard,
    file: Option<&Path>,
    force: bool,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    let r = match file.filter(|f| f.as_os_str() != "-") {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("{}: open", p.display()))?;
            hoard::stream::receive(h, &mut std::io::BufReader::with_capacity(1 << 20, f), force)?
        }
        None => {
            let i = std::io::stdin();
            hoard::stream::receive(
                h,
                &mut std::io::BufReader::with_capacity(1 << 20, i.lock()),
                force,
            )?
        }
    };
    report(&r, "received", json, quiet);
    Ok(exit::OK)
}

fn report(r: &hoard::stream::StreamReport, what: &str, json: bool, quiet: bool) {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(r).expect("a report serializes")
        );
        return;
    }
    if quiet {
        return;
    }
    if r.up_to_date {
        outln!("already at generation {}", r.generation);
        return;
    }
    outln!(
        "{what} generation {}{}: {} indexes, {} packs ({}){}; {} {} in {:.2} s",
        r.generation,
        r.from
            .map_or(" (full)".to_string(), |f| format!(" from {f}")),
        r.indexes,
        r.packs,
        human(r.pack_bytes),
        if r.packs_present > 0 {
            format!(", {} packs already here", r.packs_present)
        } else {
            String::new()
        },
        if what == "pulled" {
            "downloaded"
        } else {
            "stream"
        },
        human(r.bytes),
        r.seconds
    );
}

/// Where the registry is, from the command line, the environment and the configuration.
#[derive(clap::Args, Debug, Clone)]
pub struct RemoteArgs {
    /// The registry and repository: HOST[:PORT]/REPOSITORY[:TAG] (default: $VMICACHE_REGISTRY,
    /// else `registry: ref:` of the configuration). Credentials come from
    /// $VMICACHE_REGISTRY_USER and $VMICACHE_REGISTRY_PASSWORD, or $VMICACHE_REGISTRY_TOKEN,
    /// else the configuration's username/password_file/token_file.
    #[arg(value_name = "REF")]
    pub reference: Option<String>,
    /// Plain HTTP to a registry that is not on a loopback address.
    #[arg(long)]
    pub insecure: bool,
}

fn first_line(p: &Path) -> Result<String> {
    let t = std::fs::read_to_string(p).with_context(|| format!("{}: read", p.display()))?;
    Ok(t.lines().next().unwrap_or("").trim().to_string())
}

/// The registry to use, or why there is none.
pub fn remote(a: &RemoteArgs) -> Result<Option<Remote>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let cfg = vmicache::config::Config::load(&vmicache::config::config_path(None))
        .ok()
        .and_then(|c| c.registry);
    let Some(reference) = a
        .reference
        .clone()
        .or_else(|| env("VMICACHE_REGISTRY"))
        .or_else(|| cfg.as_ref().map(|c| c.reference.clone()))
    else {
        return Ok(None);
    };
    let auth = if let Some(t) = env("VMICACHE_REGISTRY_TOKEN") {
        Auth::Bearer(t)
    } else if let (Some(u), Some(p)) = (
        env("VMICACHE_REGISTRY_USER"),
        env("VMICACHE_REGISTRY_PASSWORD"),
    ) {
        Auth::Basic(u, p)
    } else if let Some(c) = &cfg {
        match (&c.username, &c.password_file, &c.token_file) {
            (_, _, Some(t)) => Auth::Bearer(first_line(&t.0)?),
            (Some(u), Some(p), None) => Auth::Basic(u.clone(), first_line(&p.0)?),
            _ => Auth::Anonymous,
        }
    } else {
        Auth::Anonymous
    };
    Ok(Some(Remote {
        reference,
        auth,
        insecure: a.insecure || cfg.is_some_and(|c| c.insecure),
    }))
}

fn need_remote(a: &RemoteArgs) -> Result<Remote> {
    remote(a)?.ok_or_else(|| {
        anyhow::anyhow!("no registry: give REF, set VMICACHE_REGISTRY, or set `registry: ref:` in the configuration")
    })
}

pub fn push(h: &Hoard, a: &RemoteArgs, json: bool, quiet: bool) -> Result<i32> {
    let r = hoard::registry::push(h, &need_remote(a)?)?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    } else if !quiet {
        outln!(
            "pushed generation {} to {} ({}): {} blobs uploaded ({}), {} there already ({}) in {:.2} s",
            r.generation,
            r.reference,
            r.tags.join(", "),
            r.uploaded,
            human(r.uploaded_bytes),
            r.present,
            human(r.present_bytes),
            r.seconds
        );
    }
    Ok(exit::OK)
}

/// `pull` (retry_for 0) and `sync` (retrying while the registry cannot be reached).
pub fn pull(
    h: &Hoard,
    a: &RemoteArgs,
    force: bool,
    retry_for: u64,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    let remote = need_remote(a)?;
    let t0 = std::time::Instant::now();
    let mut wait = 1u64;
    let r = loop {
        match hoard::registry::pull(h, &remote, force) {
            Ok(r) => break r,
            // Only the registry's absence is waited out; a refusal or damage is not.
            Err(e)
                if hoard::registry::unreachable(&e)
                    && t0.elapsed().as_secs() + wait <= retry_for =>
            {
                log::warn!("{e}; trying again in {wait} s");
                std::thread::sleep(std::time::Duration::from_secs(wait));
                wait = (wait * 2).min(30);
            }
            Err(e) => return Err(e.into()),
        }
    };
    report(&r, "pulled", json, quiet);
    Ok(exit::OK)
}

/// `hoard gc --registry`: the registry's tags out of the window; (reference, tags removed).
pub fn prune(h: &Hoard, keep_days: Option<u32>, reg: String) -> Result<(String, usize)> {
    let a = RemoteArgs {
        reference: (!reg.is_empty()).then_some(reg),
        insecure: false,
    };
    let remote = need_remote(&a)?;
    let kept = hoard::gc::kept_generations(h, keep_days)?;
    let newest = kept.first().map_or(0, |(_, g)| g.generation);
    let keep = kept.iter().map(|(_, g)| g.generation).collect();
    let n = hoard::registry::prune_tags(&remote, &keep, newest)?;
    Ok((remote.reference, n))
}
