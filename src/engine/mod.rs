//! The image engine: I/O, allocation, metadata caches and write ordering.

pub mod alloc;
pub mod bounds;
pub mod check;
pub mod cor;
pub mod create;
pub mod header_io;
pub mod image;
pub mod layer;
pub mod lock;
pub mod open;
mod overlap;
mod pieces;
pub mod qcow2;
pub mod raw;
pub mod remote;
pub mod storage;

pub use image::Image;
pub use layer::{Extent, Format, Layer, Piece};
pub use open::OpenOptions;
