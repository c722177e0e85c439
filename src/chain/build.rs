//! Making the layers: a cache over a base, an instance over a cache.

use super::identity;
use crate::engine::create::{create, CreateOptions};
use crate::engine::{Format, Image, OpenOptions};
use crate::format::ext::{self as vext, BaseIdentity, CacheMeta};
use crate::format::header::Extension;
use crate::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// How `new_path` should name `target` in its header: relative to `new_path`'s directory when
/// the user named the target relatively, absolute when absolutely; an NBD URI as it is.
pub fn backing_name(target: &Path, new_path: &Path) -> Result<String> {
    if let Some(uri) = target
        .to_str()
        .filter(|s| crate::nbd::client::NbdUri::parse(s).is_some())
    {
        return Ok(uri.to_string());
    }
    let name = if target.is_absolute() {
        target.to_path_buf()
    } else {
        let cwd = std::env::current_dir().map_err(|e| Error::io(".", "getcwd", e))?;
        let t = normalize(&cwd.join(target));
        let dir = normalize(&cwd.join(new_path))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        relative(&t, &dir)
    };
    name.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::invalid(target, "path is not UTF-8"))
}

/// Lexical normalization (no symlinks resolved: QEMU resolves names lexically too).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

fn relative(target: &Path, dir: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let d: Vec<_> = dir.components().collect();
    let common = t.iter().zip(&d).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..d.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Options for a new cache layer.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub cluster_size: u64,
    /// Bytes of guest data the cache may hold; 0 = no limit.
    pub quota: u64,
    /// Format of the base; None probes.
    pub base_format: Option<Format>,
}

/// Create an empty cache layer at `cache` over `base`, recording the base's identity.
pub fn build_cache(base: &Path, cache: &Path, o: &BuildOptions) -> Result<BaseIdentity> {
    crate::nbd::register();
    let base_img = Image::open(
        base,
        &OpenOptions {
            format: o.base_format,
            ..OpenOptions::read_only()
        },
    )?;
    let name = backing_name(base, cache)?;
    let id = identity::identify(&base_img, &name)?;
    let meta = CacheMeta::new(id.clone(), o.quota, crate::now());
    // QEMU sees a qcow2 image in whole 512-byte sectors (rounded down) and a raw file rounded
    // up to them: a cache of the base's exact size would hide the tail of an odd-sized base.
    let mut c = CreateOptions::new(base_img.virtual_size().next_multiple_of(512));
    c.cluster_size = o.cluster_size;
    c.backing_file = Some(name);
    c.backing_format = Some(base_img.format().name().into());
    c.extensions.push(Extension {
        kind: vext::KIND,
        data: meta.encode(),
    });
    create(cache, &c)?;
    // The new chain must open (the recorded name must resolve from the cache's directory).
    if let Err(e) = Image::open(cache, &OpenOptions::read_only()) {
        let _ = std::fs::remove_file(cache);
        return Err(e);
    }
    Ok(id)
}

/// The cache metadata of a qcow2 image, if it is a vmicache cache.
pub fn cache_meta(img: &Image) -> Result<Option<CacheMeta>> {
    img.layer().cache_meta()
}

/// Mark a cache that copy-on-read or warming is about to fill `warming` (when it was
/// `empty`; other states stay). `meta`: its vmicache extension as read.
pub fn mark_warming(img: &Image, meta: &CacheMeta) -> Result<()> {
    if meta.state != vext::CacheState::Empty {
        return Ok(());
    }
    let q = img
        .as_qcow2()
        .ok_or_else(|| Error::request(img.path(), "a cache must be qcow2"))?;
    let mut m = meta.clone();
    m.state = vext::CacheState::Warming;
    q.set_cache_meta(Some(&m))
}

/// Verify that the cache's base is still the base it was built over, as far as it may be
/// looked at: a sealed cache's base is not contacted (its recorded file size, inode and
/// modification time are compared when it is a local file that is there); other caches' bases
/// are fingerprinted (about 1 MiB read).
pub fn verify_base(cache: &Image) -> Result<Vec<identity::Mismatch>> {
    verify_base_with(cache, Check::Content)
}

/// [`verify_base`], fingerprinting the base even under a sealed cache (`--verify`): fails
/// when the base cannot be reached.
pub fn verify_base_content(cache: &Image) -> Result<Vec<identity::Mismatch>> {
    verify_base_with(cache, Check::Forced)
}

/// How much of the base a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Format and size only.
    Shape,
    /// The content fingerprint too, unless the cache is sealed.
    Content,
    /// The fingerprint, whatever the state.
    Forced,
}

fn verify_base_with(cache: &Image, check: Check) -> Result<Vec<identity::Mismatch>> {
    let meta = cache_meta(cache)?.ok_or_else(|| {
        Error::request(
            cache.path(),
            "not a vmicache cache (no vmicache header extension)",
        )
    })?;
    let recorded = meta.base.ok_or_else(|| {
        Error::invalid(cache.path(), "vmicache extension records no base identity")
    })?;
    let base = cache.backing().ok_or_else(|| {
        Error::chain(
            cache.path(),
            "cache has no backing file (its base was removed from the header)",
        )
    })?;
    if let Some(remote) = crate::engine::remote::RemoteBase::of(base) {
        let name = remote.name();
        if check != Check::Forced {
            let file = identity::verify_file(&recorded, name);
            let local = crate::nbd::client::NbdUri::parse(&name.to_string_lossy()).is_none()
                && name.is_file();
            if check == Check::Shape {
                // Format and size only: of a local raw file, its size is the virtual size.
                return Ok(file
                    .into_iter()
                    .filter(|m| m.field == "base file size")
                    .collect());
            }
            if !local || (recorded.file.is_some() && file.is_empty()) {
                // Not contacted: what was recorded of it matches, or it is not a local file.
                return Ok(file);
            }
            // A local base file whose identity the cache did not record (built before it
            // did), or whose file changed (restored from a backup, copied): its content
            // decides, as it did before caches recorded the file.
            return match remote.probe() {
                Ok(real) => identity::verify(&recorded, &real),
                Err(_) => Ok(file),
            };
        }
        let real = remote
            .probe()
            .map_err(|why| Error::chain(cache.path(), format!("base unreachable: {why}")))?;
        return identity::verify(&recorded, &real);
    }
    if check == Check::Shape {
        identity::verify_shape(&recorded, base)
    } else {
        identity::verify(&recorded, base)
    }
}

/// Refuse a cache whose base changed since it was built, naming what changed (reading the
/// base only for caches that are not sealed: see [`verify_base`]).
pub fn require_base_matches(cache: &Image) -> Result<()> {
    refuse_mismatches(cache, verify_base_with(cache, Check::Content)?)
}

/// As [`require_base_matches`]; `content: false` compares format and size only, reading
/// nothing from the base.
pub fn require_base(cache: &Image, content: bool) -> Result<()> {
    let check = if content {
        Check::Content
    } else {
        Check::Shape
    };
    refuse_mismatches(cache, verify_base_with(cache, check)?)
}

/// As [`require_base_matches`], fingerprinting the base even under a sealed cache.
pub fn require_base_content(cache: &Image) -> Result<()> {
    refuse_mismatches(cache, verify_base_with(cache, Check::Forced)?)
}

fn refuse_mismatches(cache: &Image, mism: Vec<identity::Mismatch>) -> Result<()> {
    if mism.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = mism.iter().map(|m| m.to_string()).collect();
    Err(Error::chain(
        cache.path(),
        format!("base no longer matches the cache: {}", what.join("; ")),
    ))
}

/// Default cluster size of instances: the guest file system's block size, so guest writes
/// cover whole clusters and no partial-cluster fill reads from below (from the base, on a
/// boot whose writes land elsewhere than the recorded boot's did).
pub const INSTANCE_CLUSTER_SIZE: u64 = 4 << 10;

/// Create a per-VM copy-on-write instance over `cache`, refusing if the base changed (a sealed
/// cache's base is not contacted unless `verify`: see [`verify_base`]).
pub fn make_instance(cache: &Path, instance: &Path, cluster_size: u64) -> Result<()> {
    make_instance_verified(cache, instance, cluster_size, false)
}

/// [`make_instance`]; `verify` fingerprints the base even under a sealed cache.
pub fn make_instance_verified(
    cache: &Path,
    instance: &Path,
    cluster_size: u64,
    verify: bool,
) -> Result<()> {
    crate::nbd::register();
    crate::hoard::register();
    let img = Image::open(cache, &OpenOptions::read_only())?;
    if !matches!(img.format(), Format::Qcow2 | Format::Hoard) {
        return Err(Error::request(
            cache,
            "a cache must be a qcow2 image or a hoarded cache",
        ));
    }
    if verify {
        require_base_content(&img)?;
    } else {
        require_base_matches(&img)?;
    }
    let mut c = CreateOptions::new(img.virtual_size());
    c.cluster_size = cluster_size;
    c.backing_file = Some(backing_name(cache, instance)?);
    c.backing_format = Some(img.format().name().into());
    create(instance, &c)?;
    if let Err(e) = Image::open(instance, &OpenOptions::read_only()) {
        let _ = std::fs::remove_file(instance);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn relative_names() {
        assert_eq!(
            relative(Path::new("/a/b/base.raw"), Path::new("/a/c")),
            PathBuf::from("../b/base.raw")
        );
        assert_eq!(
            relative(Path::new("/a/base.raw"), Path::new("/a")),
            PathBuf::from("base.raw")
        );
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }
}
