//! The hoard: the caches of many images kept on every node, deduplicated and compressed,
//! read in place (Squirrel's cVolume, HPDC'14).
//!
//! - [`format`] and [`index`]: the pack and cache index files, pure encoding;
//! - [`store`]: the hoard directory, its lock, packs and indexes on plain files;
//! - [`add`]: ingesting a sealed cache; [`gc`]: reclaiming and repacking;
//!   [`verify`]: checking every hash; [`checkout`]: an ordinary qcow2 cache again;
//! - [`layer`]: a hoarded cache as a layer of a chain, read in place;
//! - [`analyze`]: Squirrel's metrics over a set of images and the baselines.
//!
//! The engine opens `vmicache-hoard` layers through the driver [`register`] adds.

pub mod add;
mod ahead;
pub mod analyze;
pub mod checkout;
pub mod format;
mod frames;
pub mod gc;
pub mod gens;
pub mod index;
pub mod layer;
mod pack;
mod parts;
mod pipe;
pub mod registry;
pub mod stats;
pub mod store;
pub mod stream;
pub mod verify;

pub use store::Hoard;

/// Register the hoard's layer driver with the engine, so that chains naming a hoarded cache
/// (an instance over `HOARD/caches/NAME.vmh`) open. Idempotent.
pub fn register() {
    crate::engine::open::register_format(crate::engine::open::ForeignFormat {
        format: crate::engine::Format::Hoard,
        magic: *format::INDEX_MAGIC,
        open: layer::open,
    });
}
