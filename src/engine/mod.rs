//! The image engine: I/O, allocation, metadata caches and write ordering.

pub mod alloc;
pub mod bounds;
pub mod check;
pub mod cor;
pub mod create;
pub mod header_io;
pub mod image;
pub mod lock;
mod overlap;
pub mod qcow2;
pub mod raw;
pub mod remote;
pub mod storage;

pub use image::{Format, Image, OpenOptions};
