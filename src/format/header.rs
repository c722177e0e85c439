//! The qcow2 header: the raw big-endian layout, validation at open, header extensions, and the
//! encoder used when we create or rewrite a header.

use super::types::{Geometry, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::{be_u32, be_u64, put_u32, put_u64, FormatError};

pub const MAGIC: u32 = 0x5146_49fb;
/// Bytes of the fixed header in version 2, and the minimum in version 3.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// Version 3 header with the compression type field.
pub const V3_HEADER_LEN_COMPRESSION: u32 = 112;
/// QEMU's limits (block/qcow2.h): a backing name fits 1023 bytes, L1 at most 32 MiB,
/// the refcount table at most 8 MiB.
pub const MAX_BACKING_NAME: usize = 1023;
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// At most this many internal snapshots (QEMU's QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bits.
pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Bits this engine understands. DIRTY and CORRUPT are understood but limit what we do.
    pub const SUPPORTED: u64 = DIRTY | CORRUPT | COMPRESSION;
}
/// Compatible feature bits.
pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits.
pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types defined by the spec.
pub mod ext_kind {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Deflate,
    Zstd,
}

impl CompressionType {
    pub fn name(&self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension kept as bytes (unknown ones are preserved verbatim, as the spec asks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// A validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub geometry: Geometry,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub header_length: u32,
    pub compression: CompressionType,
    /// Bytes of the v3 header past the fields we know (header_length > 112): kept verbatim.
    pub header_tail: Vec<u8>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    /// Every extension other than backing format and feature names, in file order.
    pub extensions: Vec<Extension>,
}

impl Header {
    /// Cluster bits from the first bytes, before the full header is read (needs 24 bytes).
    pub fn peek_cluster_bits(b: &[u8]) -> Result<u32, FormatError> {
        if b.len() < 24 {
            return Err(FormatError::invalid("file too short for a qcow2 header"));
        }
        if be_u32(b, 0) != MAGIC {
            return Err(FormatError::invalid("not a qcow2 image (bad magic)"));
        }
        let bits = be_u32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(FormatError::invalid(format!(
                "cluster_bits {bits} out of range (9..=21: 512 B to 2 MiB)"
            )));
        }
        Ok(bits)
    }

    /// Parse and validate a header from the image's first cluster (`b` may be shorter when the
    /// file is; everything must then lie inside it). `file_len` bounds the tables.
    pub fn parse(b: &[u8], file_len: u64) -> Result<Header, FormatError> {
        let cluster_bits = Self::peek_cluster_bits(b)?;
        let cluster_size = 1u64 << cluster_bits;
        if b.len() < V2_HEADER_LEN as usize {
            return Err(FormatError::invalid("file too short for a qcow2 header"));
        }
        let version = be_u32(b, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::Unsupported(format!("qcow2 version {version}")));
        }
        let mut h = Header {
            version,
            geometry: Geometry {
                cluster_bits,
                refcount_order: 4,
            },
            size: be_u64(b, 24),
            crypt_method: be_u32(b, 32),
            l1_size: be_u32(b, 36),
            l1_table_offset: be_u64(b, 40),
            refcount_table_offset: be_u64(b, 48),
            refcount_table_clusters: be_u32(b, 56),
            nb_snapshots: be_u32(b, 60),
            snapshots_offset: be_u64(b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            header_length: V2_HEADER_LEN,
            compression: CompressionType::Deflate,
            header_tail: Vec::new(),
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            extensions: Vec::new(),
        };
        let backing_file_offset = be_u64(b, 8);
        let backing_file_size = be_u32(b, 16);
        if version == 3 {
            if b.len() < V3_HEADER_LEN as usize {
                return Err(FormatError::invalid("file too short for a qcow2 v3 header"));
            }
            h.incompatible = be_u64(b, 72);
            h.compatible = be_u64(b, 80);
            h.autoclear = be_u64(b, 88);
            h.geometry.refcount_order = be_u32(b, 96);
            h.header_length = be_u32(b, 100);
            if h.header_length < V3_HEADER_LEN {
                return Err(FormatError::invalid(format!(
                    "header_length {} too small (at least 104)",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > b.len() {
                return Err(FormatError::invalid(format!(
                    "header_length {} exceeds the first cluster",
                    h.header_length
                )));
            }
            if h.header_length >= V3_HEADER_LEN_COMPRESSION {
                h.compression = match b[104] {
                    0 => CompressionType::Deflate,
                    1 => CompressionType::Zstd,
                    t => return Err(FormatError::Unsupported(format!("compression type {t}"))),
                };
                h.header_tail =
                    b[V3_HEADER_LEN_COMPRESSION as usize..h.header_length as usize].to_vec();
            }
            let has_bit = h.incompatible & incompat::COMPRESSION != 0;
            if has_bit != (h.compression != CompressionType::Deflate) {
                return Err(FormatError::invalid(
                    "compression type field and incompatible compression bit disagree",
                ));
            }
        }
        if h.geometry.refcount_order > 6 {
            return Err(FormatError::invalid(format!(
                "refcount_order {} out of range (0..=6)",
                h.geometry.refcount_order
            )));
        }

        // Header extensions (v3 after header_length; v2 after the 72-byte header).
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset.min(cluster_size).min(b.len() as u64) as usize
        } else {
            (cluster_size as usize).min(b.len())
        };
        let mut at = h.header_length as usize;
        while at + 8 <= ext_end {
            let kind = be_u32(b, at);
            let len = be_u32(b, at + 4) as usize;
            if kind == ext_kind::END {
                break;
            }
            let data_at = at + 8;
            if len > ext_end - data_at {
                return Err(FormatError::invalid(format!(
                    "header extension {kind:#x} of {len} bytes runs past the header area"
                )));
            }
            let data = &b[data_at..data_at + len];
            match kind {
                ext_kind::BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| FormatError::invalid("backing format is not UTF-8"))?,
                    );
                }
                ext_kind::FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..]
                            .split(|&c| c == 0)
                            .next()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .unwrap_or_default();
                        h.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name,
                        });
                    }
                }
                _ => h.extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            at = data_at + len.div_ceil(8) * 8;
        }

        if backing_file_offset != 0 {
            let len = backing_file_size as usize;
            if len > MAX_BACKING_NAME {
                return Err(FormatError::invalid(format!(
                    "backing file name too long ({len} bytes, at most {MAX_BACKING_NAME})"
                )));
            }
            let end = backing_file_offset.saturating_add(len as u64);
            if end > cluster_size || end > b.len() as u64 {
                return Err(FormatError::invalid(
                    "backing file name lies outside the first cluster",
                ));
            }
            let s = &b[backing_file_offset as usize..end as usize];
            let name = String::from_utf8(s.to_vec())
                .map_err(|_| FormatError::invalid("backing file name is not UTF-8"))?;
            if !name.is_empty() {
                h.backing_file = Some(name);
            }
        }
        h.validate(file_len)?;
        Ok(h)
    }

    /// Name the incompatible features in `bits`, using the image's own feature name table.
    pub fn name_incompatible(&self, bits: u64) -> String {
        let mut names = Vec::new();
        for bit in 0..64u8 {
            if bits & (1 << bit) == 0 {
                continue;
            }
            let own = self
                .feature_names
                .iter()
                .find(|f| f.kind == 0 && f.bit == bit)
                .map(|f| f.name.clone());
            let known = match 1u64 << bit {
                incompat::DIRTY => Some("dirty bit"),
                incompat::CORRUPT => Some("corrupt bit"),
                incompat::DATA_FILE => Some("external data file"),
                incompat::COMPRESSION => Some("compression type"),
                incompat::EXTENDED_L2 => Some("extended L2 entries"),
                _ => None,
            };
            names.push(match (own, known) {
                (_, Some(k)) => k.to_string(),
                (Some(o), None) => format!("'{o}' (incompatible bit {bit})"),
                (None, None) => format!("unknown incompatible feature bit {bit}"),
            });
        }
        names.join(", ")
    }

    fn validate(&self, file_len: u64) -> Result<(), FormatError> {
        let g = self.geometry;
        let cs = g.cluster_size();
        if self.crypt_method != 0 {
            let what = match self.crypt_method {
                1 => "encryption (AES)",
                2 => "encryption (LUKS)",
                _ => "encryption (unknown method)",
            };
            return Err(FormatError::Unsupported(what.into()));
        }
        let unknown = self.incompatible & !incompat::SUPPORTED;
        if unknown != 0 {
            return Err(FormatError::Unsupported(self.name_incompatible(unknown)));
        }
        if self.version == 2 && g.refcount_order != 4 {
            return Err(FormatError::invalid(
                "version 2 image with refcount_order != 4",
            ));
        }
        if self.size > (1u64 << 62) {
            return Err(FormatError::invalid(format!(
                "virtual size {} is absurd",
                self.size
            )));
        }
        let need_l1 = g.l1_entries_for(self.size);
        if u64::from(self.l1_size) < need_l1 {
            return Err(FormatError::invalid(format!(
                "L1 table is too small: {} entries for a virtual size that needs {need_l1}",
                self.l1_size
            )));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(FormatError::invalid(format!(
                "active L1 table too large: {} entries (at most {})",
                self.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if self.l1_size > 0 {
            table_in_file("L1 table", self.l1_table_offset, l1_bytes, cs, file_len)?;
        }
        if self.refcount_table_clusters == 0 {
            return Err(FormatError::invalid("refcount table has no clusters"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(FormatError::invalid(format!(
                "reference count table too large: {} clusters",
                self.refcount_table_clusters
            )));
        }
        table_in_file(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::invalid(format!(
                "too many snapshots ({})",
                self.nb_snapshots
            )));
        }
        if self.nb_snapshots > 0
            && (self.snapshots_offset % cs != 0 || self.snapshots_offset >= file_len)
        {
            return Err(FormatError::invalid("snapshot table offset invalid"));
        }
        if self.autoclear & autoclear::BITMAPS != 0
            && !self.extensions.iter().any(|e| e.kind == ext_kind::BITMAPS)
        {
            // QEMU tolerates this (clears the bit); so do we, nothing to read.
        }
        Ok(())
    }

    pub fn has_extension(&self, kind: u32) -> bool {
        self.extensions.iter().any(|e| e.kind == kind)
    }

    /// Encode the header and its extensions as the image's first bytes (at most one cluster).
    /// Writes version 3 as 112-byte header (plus any preserved tail), version 2 as 72 bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        match self.encode_inner(true) {
            // The feature name table is optional: QEMU leaves it out when it does not fit
            // (512-byte clusters with a backing file).
            Err(_) if !self.feature_names.is_empty() => self.encode_inner(false),
            r => r,
        }
    }

    fn encode_inner(&self, feature_names: bool) -> Result<Vec<u8>, FormatError> {
        let cs = self.geometry.cluster_size() as usize;
        let header_length = if self.version == 3 {
            V3_HEADER_LEN_COMPRESSION as usize + self.header_tail.len()
        } else {
            V2_HEADER_LEN as usize
        };
        let mut b = vec![0u8; header_length];
        put_u32(&mut b, 0, MAGIC);
        put_u32(&mut b, 4, self.version);
        put_u32(&mut b, 20, self.geometry.cluster_bits);
        put_u64(&mut b, 24, self.size);
        put_u32(&mut b, 32, self.crypt_method);
        put_u32(&mut b, 36, self.l1_size);
        put_u64(&mut b, 40, self.l1_table_offset);
        put_u64(&mut b, 48, self.refcount_table_offset);
        put_u32(&mut b, 56, self.refcount_table_clusters);
        put_u32(&mut b, 60, self.nb_snapshots);
        put_u64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put_u64(&mut b, 72, self.incompatible);
            put_u64(&mut b, 80, self.compatible);
            put_u64(&mut b, 88, self.autoclear);
            put_u32(&mut b, 96, self.geometry.refcount_order);
            put_u32(&mut b, 100, header_length as u32);
            b[104] = match self.compression {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            };
            b[112..].copy_from_slice(&self.header_tail);
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, ext_kind::BACKING_FORMAT, f.as_bytes());
        }
        if feature_names && !self.feature_names.is_empty() {
            let mut t = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.as_bytes();
                let n = &n[..n.len().min(46)];
                e[2..2 + n.len()].copy_from_slice(n);
                t.extend_from_slice(&e);
            }
            push_ext(&mut b, ext_kind::FEATURE_NAMES, &t);
        }
        for e in &self.extensions {
            push_ext(&mut b, e.kind, &e.data);
        }
        push_ext(&mut b, ext_kind::END, &[]);
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME {
                return Err(FormatError::invalid(format!(
                    "backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                    name.len()
                )));
            }
            let at = b.len();
            put_u64(&mut b, 8, at as u64);
            put_u32(&mut b, 16, name.len() as u32);
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cs {
            return Err(FormatError::invalid(format!(
                "header, extensions and backing name need {} bytes, more than one {cs}-byte cluster",
                b.len()
            )));
        }
        Ok(b)
    }

    /// Feature name table as QEMU writes it, so `qemu-img info` can name our bits.
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind, bit, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

fn table_in_file(
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), FormatError> {
    if offset % cluster_size != 0 {
        return Err(FormatError::invalid(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    if offset == 0 {
        return Err(FormatError::invalid(format!("{what} overlaps the header")));
    }
    // QEMU reads past EOF as zeros; a table may end in the file's last, partial cluster.
    let file_end = file_len.div_ceil(cluster_size) * cluster_size;
    match offset.checked_add(bytes) {
        Some(end) if end <= file_end => Ok(()),
        _ => Err(FormatError::invalid(format!(
            "{what} at {offset:#x} ({bytes} bytes) extends past the end of the file ({file_len} bytes)"
        ))),
    }
}
