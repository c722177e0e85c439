//! Paths confined to the configured directories: everything the hook creates, writes or
//! deletes goes through here.

use super::log::escape;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The path the hook may create, write or delete for `p`, which must lie in `dir` (the
/// configuration's `what` directory): absolute, no `.`/`..`, its parent resolved through
/// symlinks still inside `dir` resolved, its final component not a symlink, and no control
/// characters anywhere (a newline in a name would start a line of its own in every log that
/// names it). Returns the resolved path.
pub fn confine(p: &Path, dir: &Path, what: &str) -> Result<PathBuf> {
    let shown = p.to_string_lossy();
    if shown.chars().any(char::is_control) {
        return Err(Error::refused(
            escape(&shown).into_owned(),
            "refused: control character in path",
        ));
    }
    let refuse = |why: String| Error::refused(p, format!("refused: {why}"));
    if !crate::config::lexically_clean(p) {
        return Err(refuse(
            "must be an absolute path without '.' or '..'".into(),
        ));
    }
    let name = p
        .file_name()
        .ok_or_else(|| refuse("names no file".into()))?;
    let real_dir =
        std::fs::canonicalize(dir).map_err(|e| Error::io(dir, "configured directory", e))?;
    let parent = p.parent().unwrap_or(Path::new("/"));
    let real_parent = std::fs::canonicalize(parent).map_err(|e| Error::io(parent, "resolve", e))?;
    if !real_parent.starts_with(&real_dir) {
        return Err(refuse(format!(
            "outside the configured {what} directory {}",
            dir.display()
        )));
    }
    let real = real_parent.join(name);
    if let Ok(m) = std::fs::symlink_metadata(&real) {
        if m.file_type().is_symlink() {
            return Err(refuse("is a symbolic link".into()));
        }
    }
    Ok(real)
}

pub(super) fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

/// Remove a regular file (never a link, never a directory).
pub(super) fn remove_regular(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_file() => {
            std::fs::remove_file(p).map_err(|e| Error::io(p, "remove", e))
        }
        Ok(_) => Err(Error::refused(p, "refused: not a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, "stat", e)),
    }
}
