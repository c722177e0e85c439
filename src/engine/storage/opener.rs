//! Storage reached by a URI rather than a path (an NBD export), opened through openers that
//! the layers above register, as QEMU's protocol drivers register with its block layer. The
//! engine itself opens files only; it names no protocol and imports nothing above it.

use super::Storage;
use crate::Result;
use std::path::PathBuf;
use std::sync::RwLock;

/// Opens storage named by a URI with one prefix.
pub trait Opener: Send + Sync {
    /// The prefix of the names it opens (`nbd+unix://`).
    fn prefix(&self) -> &'static str;
    /// The local file that reaching `name` touches (an NBD server's socket), which must lie
    /// within the bounds of the image naming it, and what that file is ("NBD socket").
    fn local_path(&self, name: &str) -> Result<(PathBuf, &'static str)>;
    /// Connect: read-only storage of the export's size.
    fn open(&self, name: &str) -> Result<Box<dyn Storage>>;
}

static OPENERS: RwLock<Vec<&'static dyn Opener>> = RwLock::new(Vec::new());

/// Register `o` (once per prefix; a second registration of a prefix is ignored).
pub fn register_opener(o: &'static dyn Opener) {
    let mut v = OPENERS.write().unwrap_or_else(|p| p.into_inner());
    if !v.iter().any(|x| x.prefix() == o.prefix()) {
        v.push(o);
    }
}

/// The opener for `name`, if a registered one handles it.
pub fn opener_for(name: &str) -> Option<&'static dyn Opener> {
    let v = OPENERS.read().unwrap_or_else(|p| p.into_inner());
    v.iter().copied().find(|o| name.starts_with(o.prefix()))
}

/// Whether `name` has the form of a URI (`scheme://...`) rather than a path.
pub fn is_uri(name: &str) -> bool {
    name.split_once("://").is_some_and(|(s, _)| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}
