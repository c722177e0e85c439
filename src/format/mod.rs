//! The qcow2 on-disk format: pure parsing and encoding, no I/O.
//!
//! Everything here works on byte slices and plain values, so it can be fuzzed and unit-tested
//! without files. The image engine (`crate::engine`) does the I/O and the ordering.
//!
//! Spec: `docs/interop/qcow2.rst` in QEMU.

pub mod compress;
pub mod ext;
pub mod header;
pub mod refcount;
pub mod table;
pub mod trace;
pub mod types;

/// An error found while decoding on-disk structures, before a path is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// Malformed or out of range.
    Invalid(String),
    /// Well-formed, but a feature we do not implement (the string names it).
    Unsupported(String),
}

impl FormatError {
    pub fn invalid(s: impl Into<String>) -> Self {
        FormatError::Invalid(s.into())
    }
    /// Attach the path of the image the bytes came from.
    pub fn at(self, path: &std::path::Path) -> crate::Error {
        match self {
            FormatError::Invalid(w) => crate::Error::invalid(path, w),
            FormatError::Unsupported(f) => crate::Error::unsupported(path, f),
        }
    }
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::Invalid(w) => write!(f, "invalid image: {w}"),
            FormatError::Unsupported(w) => write!(f, "unsupported qcow2 feature: {w}"),
        }
    }
}

/// Big-endian integers at byte `at` of `b` (panics when `b` is too short): the one way the
/// crate decodes on-disk and on-wire integers (qcow2, NBD).
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap())
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
