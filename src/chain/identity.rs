//! A cheap content fingerprint of a base image, and the cache's binding to it.
//!
//! Scheme 1: blake3 over a domain tag, the virtual size, and `SAMPLES` blocks of 4 KiB of guest
//! content at evenly spread offsets (plus the first and last block). Reading 1 MiB identifies a
//! multi-GB base well enough to catch a replaced or rewritten image; a change confined to bytes
//! between samples is not seen (documented in docs/format.md).

use crate::engine::Image;
use crate::format::ext::{hex, BaseFile, BaseIdentity};
use crate::Result;

pub const SCHEME: u32 = 1;
pub const SAMPLES: u64 = 256;
pub const SAMPLE_BYTES: u64 = 4096;

/// Fingerprint the guest content of `img` (through its chain).
pub fn fingerprint(img: &Image) -> Result<[u8; 32]> {
    let size = img.virtual_size();
    let mut h = blake3::Hasher::new();
    h.update(b"vmicache-base-fingerprint-v1");
    h.update(&size.to_be_bytes());
    let mut buf = vec![0u8; SAMPLE_BYTES as usize];
    let mut offsets: Vec<u64> = (0..SAMPLES)
        .map(|i| ((size / SAMPLES) * i) & !(SAMPLE_BYTES - 1))
        .collect();
    offsets.push(size.saturating_sub(SAMPLE_BYTES));
    offsets.dedup();
    for off in offsets {
        let n = SAMPLE_BYTES.min(size - off.min(size)) as usize;
        if n == 0 {
            continue;
        }
        img.read_at(&mut buf[..n], off)?;
        h.update(&off.to_be_bytes());
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}

/// The identity of `img` as a base recorded under the name `path`.
pub fn identify(img: &Image, path: &str) -> Result<BaseIdentity> {
    Ok(BaseIdentity {
        path: path.to_string(),
        format: img.format().name().to_string(),
        virtual_size: img.virtual_size(),
        fingerprint: fingerprint(img)?,
        scheme: SCHEME,
        file: base_file(img.path()),
    })
}

/// Size, inode and modification time of a local base file (None for an NBD base or when the
/// file cannot be looked at). Reads nothing of the file.
pub fn base_file(path: &std::path::Path) -> Option<BaseFile> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some(BaseFile {
        size: m.size(),
        inode: m.ino(),
        mtime_ns: (m.mtime() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec() as u64),
    })
}

/// Compare a recorded base file with the file at `path` now, reading nothing of it: the
/// fields that changed (empty when it matches, or when nothing was recorded). A file that is
/// not there is no mismatch: a sealed cache does not need its base.
pub fn verify_file(recorded: &BaseIdentity, path: &std::path::Path) -> Vec<Mismatch> {
    let (Some(r), Some(now)) = (recorded.file, base_file(path)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (field, a, b) in [
        ("base file size", r.size, now.size),
        ("base file inode", r.inode, now.inode),
        ("base file modification time", r.mtime_ns, now.mtime_ns),
    ] {
        if a != b {
            out.push(Mismatch {
                field,
                recorded: a.to_string(),
                now: b.to_string(),
            });
        }
    }
    out
}

/// A difference between the recorded identity and the base as it is now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    pub field: &'static str,
    pub recorded: String,
    pub now: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} changed (recorded {}, now {})",
            self.field, self.recorded, self.now
        )
    }
}

/// Compare a recorded identity with the base `img` opened now: format, size, and the content
/// fingerprint (which reads about 1 MiB of the base).
pub fn verify(recorded: &BaseIdentity, img: &Image) -> Result<Vec<Mismatch>> {
    verify_with(recorded, img, true)
}

/// Compare format and virtual size only: nothing is read from a raw base.
pub fn verify_shape(recorded: &BaseIdentity, img: &Image) -> Result<Vec<Mismatch>> {
    verify_with(recorded, img, false)
}

fn verify_with(recorded: &BaseIdentity, img: &Image, content: bool) -> Result<Vec<Mismatch>> {
    let mut out = Vec::new();
    if recorded.format != img.format().name() {
        out.push(Mismatch {
            field: "format",
            recorded: recorded.format.clone(),
            now: img.format().name().into(),
        });
    }
    if recorded.virtual_size != img.virtual_size() {
        out.push(Mismatch {
            field: "virtual size",
            recorded: recorded.virtual_size.to_string(),
            now: img.virtual_size().to_string(),
        });
    }
    if content && out.is_empty() && recorded.scheme == SCHEME {
        let fp = fingerprint(img)?;
        if fp != recorded.fingerprint {
            out.push(Mismatch {
                field: "content fingerprint",
                recorded: hex(&recorded.fingerprint[..8]),
                now: hex(&fp[..8]),
            });
        }
    }
    Ok(out)
}
