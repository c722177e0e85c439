//! Boot trace files: the encoding lives in [`crate::format::trace`]; here they are read and
//! written.

pub use crate::format::trace::{Trace, MAGIC, VERSION};
use crate::{Error, Result};
use std::path::Path;

impl Trace {
    pub fn load(path: &Path) -> Result<Trace> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, "read", e))?;
        Trace::decode(&b).map_err(|w| Error::invalid(path, w))
    }

    /// Write atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.encode()).map_err(|e| Error::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename", e))
    }
}
