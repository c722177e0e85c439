//! `vmicache config check`: validate the configuration file.

use super::exit;
use anyhow::Result;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use vmicache::config::{config_path, Config};

#[derive(clap::Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate the configuration: unknown keys, relative directories, sizes, modes, socket
    /// owner and group; errors name the file, line and column.
    Check {
        /// Configuration file (default: $VMICACHE_CONFIG, else /etc/vmicache/config.yaml).
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: ConfigCmd, quiet: bool) -> Result<i32> {
    match cmd {
        ConfigCmd::Check { config } => check(config, quiet),
    }
}

fn check(config: Option<PathBuf>, quiet: bool) -> Result<i32> {
    let path = config_path(config.as_deref());
    let cfg = Config::load(&path)?;
    cfg.socket.ids()?;
    let d = &cfg.dirs;
    let mut notes = Vec::new();
    let dirs = [
        ("caches", &d.caches),
        ("instances", &d.instances),
        ("traces", &d.traces),
        ("sockets", &d.sockets),
        ("state", &d.state),
    ];
    let hoard = d.hoard.iter().map(|h| ("hoard", h));
    for (what, dir) in dirs.into_iter().chain(hoard) {
        match std::fs::metadata(&dir.0) {
            Ok(m) if !m.is_dir() => {
                anyhow::bail!("{}: dirs.{what}: not a directory", dir.0.display())
            }
            Ok(m) if m.permissions().mode() & 0o002 != 0 => anyhow::bail!(
                "{}: dirs.{what}: writable by every user (the hook refuses it)",
                dir.0.display()
            ),
            Ok(_) => {}
            Err(_) => notes.push(format!(
                "dirs.{what} {} does not exist yet (the hook creates it)",
                dir.0.display()
            )),
        }
    }
    for b in &d.bases {
        if !b.0.is_dir() {
            notes.push(format!("dirs.bases {} is not a directory", b.0.display()));
        }
    }
    if !quiet {
        outln!(
            "{}: ok: {} image entr{}, on_base_change {:?}, socket mode {:04o}",
            path.display(),
            cfg.images.len(),
            if cfg.images.len() == 1 { "y" } else { "ies" },
            cfg.on_base_change,
            cfg.socket.mode.0
        );
        for n in notes {
            outln!("  note: {n}");
        }
    }
    Ok(exit::OK)
}
