//! The `vmicache` header extension: binds a cache layer to its base and records its state.
//!
//! QEMU keeps header extensions it does not know, so the binding survives `qemu-img` rewrites
//! of the header. Layout (all integers big-endian), documented in docs/format.md:
//!
//! ```text
//! u32  layout version (1)
//! then records until the end of the extension:
//!   u16 tag, u16 length, `length` bytes of value
//! ```
//!
//! Unknown tags are kept verbatim, so later versions can add records without breaking older
//! readers.

use super::{be_u16, be_u32, be_u64, FormatError};

/// Header extension type: ASCII "vmic".
pub const KIND: u32 = 0x766d_6963;
pub const LAYOUT_VERSION: u32 = 1;

pub mod tag {
    pub const STATE: u16 = 1;
    pub const QUOTA: u16 = 2;
    pub const BASE_PATH: u16 = 3;
    pub const BASE_FORMAT: u16 = 4;
    pub const BASE_SIZE: u16 = 5;
    pub const FINGERPRINT: u16 = 6;
    pub const FINGERPRINT_SCHEME: u16 = 7;
    pub const CREATED: u16 = 8;
    pub const SEALED: u16 = 9;
    pub const LAST_FILL: u16 = 10;
    pub const BASE_FILE: u16 = 11;
}

/// Lifecycle of a cache layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheState {
    /// Created, nothing copied yet.
    Empty,
    /// Being filled by copy-on-read or a warm run.
    Warming,
    /// Complete; shared read-only from now on.
    Sealed,
}

impl CacheState {
    fn code(self) -> u8 {
        match self {
            CacheState::Empty => 0,
            CacheState::Warming => 1,
            CacheState::Sealed => 2,
        }
    }
    fn from_code(c: u8) -> Result<Self, FormatError> {
        Ok(match c {
            0 => CacheState::Empty,
            1 => CacheState::Warming,
            2 => CacheState::Sealed,
            _ => {
                return Err(FormatError::invalid(format!(
                    "vmicache extension: state {c}"
                )))
            }
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            CacheState::Empty => "empty",
            CacheState::Warming => "warming",
            CacheState::Sealed => "sealed",
        }
    }
}

/// What a cache knows of the base it was built over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BaseIdentity {
    /// Backing path as recorded in the cache's header.
    pub path: String,
    pub format: String,
    pub virtual_size: u64,
    /// blake3 of sampled guest content (see `chain::identity`).
    #[serde(serialize_with = "hex32")]
    pub fingerprint: [u8; 32],
    /// Sampling scheme the fingerprint was computed with.
    pub scheme: u32,
    /// What the file system said of a local base file when the cache was built: compared,
    /// without reading the base, where reading it is not wanted (a sealed cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<BaseFile>,
}

/// A base file's size, inode and modification time (nanoseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BaseFile {
    pub size: u64,
    pub inode: u64,
    pub mtime_ns: u64,
}

fn hex32<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(v))
}

/// Lower-case hex of bytes.
pub fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the last copy-on-read session (a recorded boot) did to the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FillRecord {
    /// Read requests that reached the cache.
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    /// Bytes read from the base.
    pub base_bytes: u64,
    /// Unix seconds when the session ended.
    pub ended: u64,
}

/// The decoded extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMeta {
    pub state: CacheState,
    /// Bytes of guest data the cache may hold; 0 means no limit.
    pub quota: u64,
    pub base: Option<BaseIdentity>,
    /// Unix seconds.
    pub created: u64,
    pub sealed: u64,
    /// The last copy-on-read session, if any.
    pub last_fill: Option<FillRecord>,
    /// Records of tags this version does not know, kept verbatim.
    pub unknown: Vec<(u16, Vec<u8>)>,
}

impl CacheMeta {
    pub fn new(base: BaseIdentity, quota: u64, created: u64) -> Self {
        CacheMeta {
            state: CacheState::Empty,
            quota,
            base: Some(base),
            created,
            sealed: 0,
            last_fill: None,
            unknown: Vec::new(),
        }
    }

    pub fn decode(b: &[u8]) -> Result<CacheMeta, FormatError> {
        let bad = |w: &str| FormatError::invalid(format!("vmicache extension: {w}"));
        if b.len() < 4 {
            return Err(bad("too short"));
        }
        let v = be_u32(b, 0);
        if v != LAYOUT_VERSION {
            return Err(FormatError::Unsupported(format!(
                "vmicache extension layout version {v}"
            )));
        }
        let mut m = CacheMeta {
            state: CacheState::Empty,
            quota: 0,
            base: None,
            created: 0,
            sealed: 0,
            last_fill: None,
            unknown: Vec::new(),
        };
        let (mut path, mut format, mut size, mut fp, mut scheme) = (None, None, None, None, 0);
        let mut file = None;
        let mut at = 4;
        while at < b.len() {
            if at + 4 > b.len() {
                return Err(bad("truncated record"));
            }
            let t = be_u16(b, at);
            let len = be_u16(b, at + 2) as usize;
            at += 4;
            if at + len > b.len() {
                return Err(bad("record runs past the extension"));
            }
            let v = &b[at..at + len];
            at += len;
            let u64v = || -> Result<u64, FormatError> {
                if v.len() != 8 {
                    return Err(bad("integer record of wrong length"));
                }
                Ok(be_u64(v, 0))
            };
            let strv = || String::from_utf8(v.to_vec()).map_err(|_| bad("string not UTF-8"));
            match t {
                tag::STATE if len == 1 => m.state = CacheState::from_code(v[0])?,
                tag::QUOTA => m.quota = u64v()?,
                tag::BASE_PATH => path = Some(strv()?),
                tag::BASE_FORMAT => format = Some(strv()?),
                tag::BASE_SIZE => size = Some(u64v()?),
                tag::FINGERPRINT if len == 32 => fp = Some(<[u8; 32]>::try_from(v).unwrap()),
                tag::FINGERPRINT_SCHEME if len == 4 => scheme = be_u32(v, 0),
                tag::CREATED => m.created = u64v()?,
                tag::SEALED => m.sealed = u64v()?,
                tag::LAST_FILL if len == 40 => {
                    m.last_fill = Some(FillRecord {
                        requests: be_u64(v, 0),
                        hits: be_u64(v, 8),
                        misses: be_u64(v, 16),
                        base_bytes: be_u64(v, 24),
                        ended: be_u64(v, 32),
                    })
                }
                tag::BASE_FILE if len == 24 => {
                    file = Some(BaseFile {
                        size: be_u64(v, 0),
                        inode: be_u64(v, 8),
                        mtime_ns: be_u64(v, 16),
                    })
                }
                tag::STATE
                | tag::FINGERPRINT
                | tag::FINGERPRINT_SCHEME
                | tag::LAST_FILL
                | tag::BASE_FILE => return Err(bad("record of wrong length")),
                _ => m.unknown.push((t, v.to_vec())),
            }
        }
        if let (Some(path), Some(format), Some(virtual_size), Some(fingerprint)) =
            (path, format, size, fp)
        {
            m.base = Some(BaseIdentity {
                path,
                format,
                virtual_size,
                fingerprint,
                scheme,
                file,
            });
        }
        Ok(m)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = LAYOUT_VERSION.to_be_bytes().to_vec();
        let mut rec = |t: u16, v: &[u8]| {
            b.extend_from_slice(&t.to_be_bytes());
            b.extend_from_slice(&(v.len() as u16).to_be_bytes());
            b.extend_from_slice(v);
        };
        rec(tag::STATE, &[self.state.code()]);
        rec(tag::QUOTA, &self.quota.to_be_bytes());
        if let Some(base) = &self.base {
            rec(tag::BASE_PATH, base.path.as_bytes());
            rec(tag::BASE_FORMAT, base.format.as_bytes());
            rec(tag::BASE_SIZE, &base.virtual_size.to_be_bytes());
            rec(tag::FINGERPRINT, &base.fingerprint);
            rec(tag::FINGERPRINT_SCHEME, &base.scheme.to_be_bytes());
            if let Some(f) = &base.file {
                let mut v = Vec::with_capacity(24);
                for x in [f.size, f.inode, f.mtime_ns] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
                rec(tag::BASE_FILE, &v);
            }
        }
        rec(tag::CREATED, &self.created.to_be_bytes());
        if self.sealed != 0 {
            rec(tag::SEALED, &self.sealed.to_be_bytes());
        }
        if let Some(f) = &self.last_fill {
            let mut v = Vec::with_capacity(40);
            for x in [f.requests, f.hits, f.misses, f.base_bytes, f.ended] {
                v.extend_from_slice(&x.to_be_bytes());
            }
            rec(tag::LAST_FILL, &v);
        }
        for (t, v) in &self.unknown {
            rec(*t, v);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_keeps_unknown() {
        let mut m = CacheMeta::new(
            BaseIdentity {
                path: "../base.raw".into(),
                format: "raw".into(),
                virtual_size: 1 << 30,
                fingerprint: [7; 32],
                scheme: 1,
                file: Some(BaseFile {
                    size: 1 << 30,
                    inode: 12,
                    mtime_ns: 1_700_000_000_123_456_789,
                }),
            },
            100 << 20,
            1_700_000_000,
        );
        m.unknown.push((999, vec![1, 2, 3]));
        m.last_fill = Some(FillRecord {
            requests: 5,
            hits: 3,
            misses: 2,
            base_bytes: 1 << 20,
            ended: 7,
        });
        let b = m.encode();
        assert_eq!(CacheMeta::decode(&b).unwrap(), m);
        assert!(CacheMeta::decode(&b[..b.len() - 1]).is_err());
    }
}
