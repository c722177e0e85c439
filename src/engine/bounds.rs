//! Where backing files may lie: a backing file (or the socket of an NBD base) must lie in
//! the directory of the image that names it, or below, or in a place allowed for the process
//! ([`allow_backing_in`]), after `..` and symlinks are resolved. An image from an untrusted
//! source cannot make vmicache read `/etc/shadow` or another guest's disk by naming it.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Directories where backing files may lie besides the directory of the image that names them
/// ([`allow_backing_in`]).
static ALLOWED_BACKING: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Allow backing files (and the sockets of NBD bases) anywhere below `dir` (or the file
/// `dir` itself), for the rest of the process. By default a backing file must lie in the directory of the image that names
/// it, or below: an image from an untrusted source cannot make vmicache read `/etc/shadow`
/// or another guest's disk by naming it as its backing file. The CLI passes
/// `--allow-backing` and `VMICACHE_ALLOW_BACKING` here, the hook its configured directories.
pub fn allow_backing_in(dir: &Path) -> Result<()> {
    // A file (a base named in a configuration) allows itself alone; one that is not there
    // now (its storage node down) is placed by its directory.
    let canon = match std::fs::canonicalize(dir) {
        Ok(c) => c,
        Err(e) => match (dir.parent().map(std::fs::canonicalize), dir.file_name()) {
            (Some(Ok(d)), Some(f)) if std::fs::symlink_metadata(dir).is_err() => d.join(f),
            _ => return Err(Error::io(dir, "allow backing files in", e)),
        },
    };
    let mut g = ALLOWED_BACKING.write().unwrap_or_else(|p| p.into_inner());
    if !g.contains(&canon) {
        g.push(canon);
    }
    Ok(())
}

/// Refuse a backing file (canonical `target`) outside the places allowed for `overlay`
/// (the path as given) to name. `what` says what it is ("backing file", "NBD socket").
pub(crate) fn confine_backing(overlay: &Path, target: &Path, what: &str) -> Result<()> {
    // The directory of the path as given (how relative names resolve) and of the real file.
    let given = match overlay.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let own = [
        std::fs::canonicalize(given).ok(),
        std::fs::canonicalize(overlay)
            .ok()
            .and_then(|c| c.parent().map(Path::to_path_buf)),
    ];
    let allowed = ALLOWED_BACKING.read().unwrap_or_else(|p| p.into_inner());
    if own
        .iter()
        .flatten()
        .chain(allowed.iter())
        .any(|d| target.starts_with(d))
    {
        return Ok(());
    }
    Err(Error::chain(
        overlay,
        format!(
            "{what} {} lies outside the image's directory{}: refused (allow it with --allow-backing DIR or VMICACHE_ALLOW_BACKING)",
            target.display(),
            if allowed.is_empty() { String::new() } else { " and the allowed directories".into() }
        ),
    ))
}

/// Where the backing file `name` (resolved: a path, or an NBD URI) that `overlay` names
/// really lies: its canonical path (of the socket, for an NBD base), refused when outside the
/// places allowed for `overlay` ([`confine_backing`]). A file that is not there (a base that
/// is down) is placed by its directory, which must resolve; a dangling symlink is refused.
pub fn place_backing(overlay: &Path, name: &Path) -> Result<PathBuf> {
    let s = name.to_string_lossy();
    let (p, what) = match super::storage::opener_for(&s) {
        Some(o) => o.local_path(&s)?,
        None => (name.to_path_buf(), "backing file"),
    };
    let canon = match std::fs::canonicalize(&p) {
        Ok(c) => c,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::fs::symlink_metadata(&p).is_err() =>
        {
            let parent = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            match (std::fs::canonicalize(parent), p.file_name()) {
                (Ok(d), Some(f)) => d.join(f),
                _ => return Err(Error::io(&p, what, e)),
            }
        }
        Err(e) => return Err(Error::io(&p, what, e)),
    };
    confine_backing(overlay, &canon, what)?;
    Ok(canon)
}
