//! The NBD client as an opener of the engine's storage: bases named
//! `nbd+unix:///EXPORT?socket=PATH` (registered by [`register`]).

use super::client::{NbdStorage, NbdUri};
use crate::engine::storage::{register_opener, Opener, Storage};
use crate::{Error, Result};
use std::path::PathBuf;

struct NbdOpener;

impl Opener for NbdOpener {
    fn prefix(&self) -> &'static str {
        "nbd+unix://"
    }
    fn local_path(&self, name: &str) -> Result<(PathBuf, &'static str)> {
        let u = NbdUri::parse(name).ok_or_else(|| {
            Error::unsupported(name, "NBD URI form (use nbd+unix:///EXPORT?socket=PATH)")
        })?;
        Ok((u.socket, "NBD socket"))
    }
    fn open(&self, name: &str) -> Result<Box<dyn Storage>> {
        Ok(Box::new(NbdStorage::connect(name)?))
    }
}

/// Let the engine open NBD bases (idempotent). The command line does it at start; a program
/// using the library calls it before opening chains whose base is served over NBD.
pub fn register() {
    register_opener(&NbdOpener);
}
