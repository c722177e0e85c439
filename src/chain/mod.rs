//! Chains of layers: base ← cache ← instance. Building caches and instances, the cache's
//! identity binding to its base, and maps of where guest data lives.

pub mod build;
pub mod compact;
pub mod identity;
pub mod map;
pub mod serve;
pub mod trace;
pub mod warm;
