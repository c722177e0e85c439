//! vmicache: boot-working-set caches for VM images.
//!
//! Layers of the crate, bottom up:
//! - [`format`]: the qcow2 on-disk structures, pure parsing and encoding;
//! - [`engine`]: images opened for I/O, allocation, metadata caching and write ordering,
//!   creation and consistency checks;
//! - [`chain`]: base ← cache ← instance chains, the cache's binding to its base, maps;
//! - [`inventory`]: inside an image in the guest's terms (partitions, files, packages), read
//!   through a chain;
//! - [`config`] and [`hook`]: the operator's configuration file and the libvirt qemu hook;
//! - the `vmicache` binary (`src/main.rs`, `src/cli/`): the command line.

pub mod chain;
pub mod config;
pub mod engine;
pub mod error;
pub mod format;
pub mod hoard;
pub mod hook;
pub mod inventory;
pub mod nbd;

pub use error::{Error, Result, Subject};

/// Seconds since the Unix epoch (0 should the clock be set before it).
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
