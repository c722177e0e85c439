//! `vmicache hook GUEST OP SUBOP EXTRA`: the libvirt qemu hook (see `docs/libvirt.md`).

use super::exit;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use vmicache::config::{config_path, Config};

/// The arguments libvirt passes to `/etc/libvirt/hooks/qemu` (which execs this command).
#[derive(clap::Args, Debug)]
pub struct HookArgs {
    /// The domain's name.
    pub guest: String,
    /// The operation: prepare, start, started, stopped, release, migrate, restore, reconnect,
    /// attach (the ones vmicache does not act on exit 0 at once).
    pub op: String,
    /// The sub-operation (begin, end, -).
    #[arg(allow_hyphen_values = true)]
    pub subop: String,
    /// Extra arguments (libvirt passes "-").
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    pub extra: Vec<String>,
    /// Configuration file (default: $VMICACHE_CONFIG, else /etc/vmicache/config.yaml).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Read the domain XML from stdin, act, and print the XML for the filter operations (migrate,
/// restore).
pub fn run(a: HookArgs) -> Result<i32> {
    let mut xml = String::new();
    std::io::stdin()
        .read_to_string(&mut xml)
        .context("reading the domain XML from stdin")?;
    // Instances, caches, pid files: readable by root only unless the config says otherwise
    // (libvirt's DAC driver gives QEMU access to a native chain's files).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let path = config_path(a.config.as_deref());
    let out = vmicache::hook::run(&a.guest, &a.op, &xml, || Config::load(&path))
        .with_context(|| format!("hook {} {}", a.op, a.guest))?;
    if let Some(x) = out {
        let mut so = std::io::stdout().lock();
        so.write_all(x.as_bytes())?;
        so.flush()?;
    }
    Ok(exit::OK)
}
