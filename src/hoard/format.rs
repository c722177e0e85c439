//! The hoard's on-disk structures, pure encoding and decoding (no I/O); docs/format.md
//! describes them for readers of the files. All integers are little-endian.
//!
//! A **pack** (`packs/<id>.pack`, `id` = BLAKE3 of the whole file in hex) holds unique
//! 4 KiB chunks, several compressed together in one zstd frame:
//!
//! ```text
//! header   64 B   magic "VMIHPACK", u32 version, u32 chunk size, zeros
//! frames          back to back; frame i holds chunks first(i) .. first(i)+n(i)
//! frames table    48 B per frame: u64 offset, u32 stored length, u16 chunks, u8 codec,
//!                 u8 zero, 32 B BLAKE3 of the frame's chunks as stored uncompressed
//! chunk keys      16 B per chunk, in chunk order: the first 16 bytes of its BLAKE3
//! footer   96 B   magic "VMIHPEND", u32 frames, u32 chunks, u64 offset of the frames
//!                 table, u64 reserved, 32 B BLAKE3 of the frames table, 32 B BLAKE3 of
//!                 the chunk keys
//! ```
//!
//! A **cache index** (`caches/<name>.vmh`) maps a hoarded cache's guest chunks to chunks of
//! packs, as runs, and keeps what the cache was (geometry, base, vmicache extension, trace):
//!
//! ```text
//! magic "VMIHCACH", u32 version, u32 chunk size, u64 virtual size, u32 cluster bits,
//! u32 flags (0), u16+bytes backing file, u16+bytes backing format,
//! u32+bytes vmicache extension, u32+bytes trace,
//! u32 packs, 32 B pack id each,
//! u64 runs, 20 B each: u64 first guest chunk, u32 chunks, u32 pack (0xffffffff: zero
//!                      clusters, 0xfffffffe: data chunks of zeros),
//!                      u32 first chunk in the pack,
//! 32 B BLAKE3 of everything before
//! ```

use std::fmt;

/// Bytes per chunk: the guest file systems' block size, aligned to guest offsets.
pub const CHUNK: u64 = 4096;
pub const PACK_MAGIC: &[u8; 8] = b"VMIHPACK";
pub const PACK_END: &[u8; 8] = b"VMIHPEND";
pub const INDEX_MAGIC: &[u8; 8] = b"VMIHCACH";
pub const VERSION: u32 = 1;
pub const PACK_HEADER: u64 = 64;
pub const PACK_FOOTER: u64 = 96;
pub const FRAME_ENTRY: u64 = 48;
pub const KEY_LEN: usize = 16;
/// Most chunks in one frame (1 MiB uncompressed).
pub const MAX_FRAME_CHUNKS: u32 = 256;
/// Largest virtual size of a hoarded cache (a hostile index cannot make the guest chunk
/// numbers overflow).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// The pack of a run of zeros (the cache's zero clusters: block status says zero).
pub const ZERO_PACK: u32 = u32::MAX;
/// The pack of a run of data chunks that are all zeros (inside the cache's data clusters:
/// read as zeros, block status says data, as it did for the cache).
pub const ZERO_DATA_PACK: u32 = u32::MAX - 1;
/// Largest index file read (a 16 TiB cache in 4 KiB runs needs 80 GiB: far beyond; real ones
/// take kilobytes to megabytes).
pub const MAX_INDEX_BYTES: u64 = 1 << 30;

/// Chunk key: the first 16 bytes of the chunk's BLAKE3 (128 bits: a deliberate collision
/// takes ~2^64 work and only pairs chunks the same party chose; the data's integrity is
/// checked with the full 256-bit hash of each frame).
pub type Key = [u8; KEY_LEN];

pub fn key_of(chunk: &[u8]) -> Key {
    let h = blake3::hash(chunk);
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&h.as_bytes()[..KEY_LEN]);
    k
}

/// Why bytes are not a valid hoard structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bad(pub String);

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad<T>(what: impl Into<String>) -> Result<T, Bad> {
    Err(Bad(what.into()))
}

/// How a frame's chunks are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// As they are (when compression saves nothing).
    Plain = 0,
    Zstd = 1,
}

/// One frame of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub offset: u64,
    pub len: u32,
    pub chunks: u16,
    pub codec: Codec,
    pub hash: [u8; 32],
}

impl Frame {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        out.push(self.codec as u8);
        out.push(0);
        out.extend_from_slice(&self.hash);
    }
    pub fn decode(b: &[u8]) -> Result<Frame, Bad> {
        let codec = match b[14] {
            0 => Codec::Plain,
            1 => Codec::Zstd,
            c => return bad(format!("unknown frame codec {c}")),
        };
        Ok(Frame {
            offset: le64(b, 0),
            len: le32(b, 8),
            chunks: u16::from_le_bytes([b[12], b[13]]),
            codec,
            hash: b[16..48].try_into().unwrap(),
        })
    }
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn pack_header() -> [u8; PACK_HEADER as usize] {
    let mut h = [0u8; PACK_HEADER as usize];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(CHUNK as u32).to_le_bytes());
    h
}

pub fn check_pack_header(h: &[u8]) -> Result<(), Bad> {
    if h.len() < PACK_HEADER as usize || &h[..8] != PACK_MAGIC {
        return bad("not a hoard pack (bad magic)");
    }
    let v = le32(h, 8);
    if v != VERSION {
        return bad(format!("pack version {v} (this vmicache reads {VERSION})"));
    }
    let cs = le32(h, 12);
    if u64::from(cs) != CHUNK {
        return bad(format!("chunk size {cs} (only {CHUNK})"));
    }
    Ok(())
}

/// A pack's footer: where its tables are and their hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub frames: u32,
    pub chunks: u32,
    pub table_offset: u64,
    pub table_hash: [u8; 32],
    pub keys_hash: [u8; 32],
}

impl Footer {
    pub fn encode(&self) -> [u8; PACK_FOOTER as usize] {
        let mut f = [0u8; PACK_FOOTER as usize];
        f[..8].copy_from_slice(PACK_END);
        f[8..12].copy_from_slice(&self.frames.to_le_bytes());
        f[12..16].copy_from_slice(&self.chunks.to_le_bytes());
        f[16..24].copy_from_slice(&self.table_offset.to_le_bytes());
        f[32..64].copy_from_slice(&self.table_hash);
        f[64..96].copy_from_slice(&self.keys_hash);
        f
    }
    /// Decode and check against the pack's length.
    pub fn decode(f: &[u8], file_len: u64) -> Result<Footer, Bad> {
        if f.len() != PACK_FOOTER as usize || &f[..8] != PACK_END {
            return bad("pack footer missing (a pack cut short?)");
        }
        let ft = Footer {
            frames: le32(f, 8),
            chunks: le32(f, 12),
            table_offset: le64(f, 16),
            table_hash: f[32..64].try_into().unwrap(),
            keys_hash: f[64..96].try_into().unwrap(),
        };
        let tables = u64::from(ft.frames) * FRAME_ENTRY + u64::from(ft.chunks) * KEY_LEN as u64;
        if ft.table_offset < PACK_HEADER
            || ft
                .table_offset
                .checked_add(tables)
                .and_then(|e| e.checked_add(PACK_FOOTER))
                != Some(file_len)
        {
            return bad(format!(
                "pack footer does not fit the file ({} frames, {} chunks, tables at {:#x}, file {file_len} B)",
                ft.frames, ft.chunks, ft.table_offset
            ));
        }
        if u64::from(ft.chunks) > u64::from(ft.frames) * u64::from(MAX_FRAME_CHUNKS)
            || ft.chunks < ft.frames
        {
            return bad(format!(
                "{} chunks cannot fill {} frames",
                ft.chunks, ft.frames
            ));
        }
        Ok(ft)
    }
    pub fn keys_offset(&self) -> u64 {
        self.table_offset + u64::from(self.frames) * FRAME_ENTRY
    }
}

/// Decode a pack's frames table, checked: frames in order inside the frame area, chunk
/// counts adding up to the footer's. Returns the frames and each frame's first chunk.
pub fn decode_frames(b: &[u8], ft: &Footer) -> Result<(Vec<Frame>, Vec<u32>), Bad> {
    if b.len() as u64 != u64::from(ft.frames) * FRAME_ENTRY {
        return bad("frames table has the wrong length");
    }
    let mut frames = Vec::with_capacity(ft.frames as usize);
    let mut first = Vec::with_capacity(ft.frames as usize);
    let mut at = PACK_HEADER;
    let mut chunk = 0u32;
    for (i, e) in b.chunks_exact(FRAME_ENTRY as usize).enumerate() {
        let f = Frame::decode(e).map_err(|Bad(w)| Bad(format!("frame {i}: {w}")))?;
        let raw = u64::from(f.chunks) * CHUNK;
        let end = f.offset.checked_add(u64::from(f.len));
        if f.offset != at || end.is_none_or(|e| e > ft.table_offset) {
            return bad(format!(
                "frame {i} at {:#x}+{} out of place",
                f.offset, f.len
            ));
        }
        if f.chunks == 0 || u32::from(f.chunks) > MAX_FRAME_CHUNKS {
            return bad(format!("frame {i} holds {} chunks", f.chunks));
        }
        if f.codec == Codec::Plain && u64::from(f.len) != raw {
            return bad(format!("plain frame {i} is {} B, not {raw}", f.len));
        }
        if f.len == 0 || u64::from(f.len) > raw + 4096 {
            return bad(format!("frame {i} stores {} B for {raw}", f.len));
        }
        first.push(chunk);
        chunk = chunk
            .checked_add(u32::from(f.chunks))
            .ok_or_else(|| Bad("chunk count overflows".into()))?;
        at = end.unwrap();
        frames.push(f);
    }
    if chunk != ft.chunks || at != ft.table_offset {
        return bad(format!(
            "frames hold {chunk} chunks up to {at:#x}; the footer says {} up to {:#x}",
            ft.chunks, ft.table_offset
        ));
    }
    Ok((frames, first))
}

/// A run of guest chunks: `count` chunks from guest chunk `start` are chunks `first ..` of
/// pack `pack` (an index into the index's pack list), or zeros ([`ZERO_PACK`],
/// [`ZERO_DATA_PACK`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRun {
    pub start: u64,
    pub count: u32,
    pub pack: u32,
    pub first: u32,
}

impl IndexRun {
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.count)
    }
    /// Zero clusters of the cache.
    pub fn is_zero(&self) -> bool {
        self.pack == ZERO_PACK
    }
    /// Chunks stored in a pack (not zeros of either kind).
    pub fn in_pack(&self) -> bool {
        self.pack < ZERO_DATA_PACK
    }
}

pub const RUN_LEN: usize = 20;

/// What a hoarded cache was, and where its chunks are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheIndex {
    pub virtual_size: u64,
    pub cluster_bits: u32,
    /// As the cache named it, resolved to an absolute path (or an NBD URI).
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The vmicache header extension, as the cache had it.
    pub extension: Vec<u8>,
    /// The cache's trace file, when it had one.
    pub trace: Vec<u8>,
    /// Pack ids (BLAKE3 of the pack file).
    pub packs: Vec<[u8; 32]>,
    pub runs: Vec<IndexRun>,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], Bad> {
        let end = (self.at as u64)
            .checked_add(n)
            .filter(|&e| e <= self.b.len() as u64);
        match end {
            Some(e) => {
                let s = &self.b[self.at..e as usize];
                self.at = e as usize;
                Ok(s)
            }
            None => bad(format!("index cut short in {what}")),
        }
    }
    fn u16(&mut self, what: &str) -> Result<u16, Bad> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, Bad> {
        Ok(le32(self.take(4, what)?, 0))
    }
    fn u64(&mut self, what: &str) -> Result<u64, Bad> {
        Ok(le64(self.take(8, what)?, 0))
    }
    fn text(&mut self, n: u64, what: &str) -> Result<Option<String>, Bad> {
        let s = self.take(n, what)?;
        if s.is_empty() {
            return Ok(None);
        }
        match std::str::from_utf8(s) {
            Ok(t) if !t.contains('\0') => Ok(Some(t.to_string())),
            _ => bad(format!("{what} is not UTF-8 text")),
        }
    }
}

impl CacheIndex {
    /// Guest chunks of the virtual size (the last one may be partial).
    pub fn chunks(&self) -> u64 {
        self.virtual_size.div_ceil(CHUNK)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(256 + self.runs.len() * RUN_LEN + self.trace.len());
        b.extend_from_slice(INDEX_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(CHUNK as u32).to_le_bytes());
        b.extend_from_slice(&self.virtual_size.to_le_bytes());
        b.extend_from_slice(&self.cluster_bits.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for s in [&self.backing_file, &self.backing_format] {
            let t = s.as_deref().unwrap_or("").as_bytes();
            b.extend_from_slice(&(t.len() as u16).to_le_bytes());
            b.extend_from_slice(t);
        }
        for v in [&self.extension, &self.trace] {
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            b.extend_from_slice(v);
        }
        b.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for p in &self.packs {
            b.extend_from_slice(p);
        }
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for r in &self.runs {
            b.extend_from_slice(&r.start.to_le_bytes());
            b.extend_from_slice(&r.count.to_le_bytes());
            b.extend_from_slice(&r.pack.to_le_bytes());
            b.extend_from_slice(&r.first.to_le_bytes());
        }
        let h = blake3::hash(&b);
        b.extend_from_slice(h.as_bytes());
        b
    }

    /// Decode and check: the hash, the geometry, runs in order within the virtual size and
    /// naming packs of the list. (Whether each run lies within its pack is checked when the
    /// packs are opened.)
    pub fn decode(b: &[u8]) -> Result<CacheIndex, Bad> {
        if b.len() < 8 + 32 || &b[..8] != INDEX_MAGIC {
            return bad("not a hoard cache index (bad magic)");
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return bad("index checksum mismatch (damaged file)");
        }
        let mut r = Reader { b: body, at: 8 };
        let v = r.u32("version")?;
        if v != VERSION {
            return bad(format!("index version {v} (this vmicache reads {VERSION})"));
        }
        let cs = r.u32("chunk size")?;
        if u64::from(cs) != CHUNK {
            return bad(format!("chunk size {cs} (only {CHUNK})"));
        }
        let virtual_size = r.u64("virtual size")?;
        let cluster_bits = r.u32("cluster bits")?;
        if virtual_size == 0 || virtual_size > MAX_VIRTUAL_SIZE {
            return bad(format!("virtual size {virtual_size}"));
        }
        if !(12..=21).contains(&cluster_bits) {
            return bad(format!(
                "cluster bits {cluster_bits} (4 KiB to 2 MiB clusters)"
            ));
        }
        let flags = r.u32("flags")?;
        if flags != 0 {
            return bad(format!("unknown index flags {flags:#x}"));
        }
        let n = r.u16("backing file")?;
        let backing_file = r.text(n.into(), "backing file")?;
        let n = r.u16("backing format")?;
        let backing_format = r.text(n.into(), "backing format")?;
        let n = r.u32("extension")?;
        let extension = r.take(n.into(), "extension")?.to_vec();
        let n = r.u32("trace")?;
        let trace = r.take(n.into(), "trace")?.to_vec();
        let np = r.u32("packs")?;
        let ids = r.take(u64::from(np) * 32, "pack ids")?;
        let packs: Vec<[u8; 32]> = ids
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let nr = r.u64("runs")?;
        let rb = r.take(nr.saturating_mul(RUN_LEN as u64), "runs")?;
        if r.at != body.len() {
            return bad("trailing bytes after the runs");
        }
        let mut idx = CacheIndex {
            virtual_size,
            cluster_bits,
            backing_file,
            backing_format,
            extension,
            trace,
            packs,
            runs: Vec::with_capacity(nr as usize),
        };
        let total = idx.chunks();
        let mut prev = 0u64;
        for (i, e) in rb.chunks_exact(RUN_LEN).enumerate() {
            let run = IndexRun {
                start: le64(e, 0),
                count: le32(e, 8),
                pack: le32(e, 12),
                first: le32(e, 16),
            };
            if run.count == 0
                || run.start < prev
                || run
                    .start
                    .checked_add(run.count.into())
                    .is_none_or(|e| e > total)
            {
                return bad(format!(
                    "run {i} (chunks {}+{}) out of order or beyond the virtual size",
                    run.start, run.count
                ));
            }
            if run.in_pack()
                && (run.pack as usize >= idx.packs.len()
                    || run.first.checked_add(run.count).is_none())
            {
                return bad(format!(
                    "run {i} names pack {} of {}",
                    run.pack,
                    idx.packs.len()
                ));
            }
            prev = run.end();
            idx.runs.push(run);
        }
        Ok(idx)
    }

    /// The run holding guest chunk `c`, or the index of the first run after it.
    pub fn find(&self, c: u64) -> Result<usize, usize> {
        let i = self.runs.partition_point(|r| r.end() <= c);
        match self.runs.get(i) {
            Some(r) if r.start <= c => Ok(i),
            _ => Err(i),
        }
    }
}

/// Hex of an id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// An id from 64 hex digits.
pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CacheIndex {
        CacheIndex {
            virtual_size: 1 << 30,
            cluster_bits: 16,
            backing_file: Some("/images/base.raw".into()),
            backing_format: Some("raw".into()),
            extension: vec![1, 2, 3],
            trace: vec![],
            packs: vec![[7u8; 32]],
            runs: vec![
                IndexRun {
                    start: 0,
                    count: 16,
                    pack: 0,
                    first: 0,
                },
                IndexRun {
                    start: 16,
                    count: 16,
                    pack: ZERO_PACK,
                    first: 0,
                },
                IndexRun {
                    start: 100,
                    count: 3,
                    pack: 0,
                    first: 16,
                },
            ],
        }
    }

    #[test]
    fn index_round_trip_and_damage() {
        let i = sample();
        let b = i.encode();
        assert_eq!(CacheIndex::decode(&b).unwrap(), i);
        assert_eq!(i.find(17), Ok(1));
        assert_eq!(i.find(50), Err(2));
        assert_eq!(i.find(200), Err(3));
        for at in [0, 9, 20, b.len() / 2, b.len() - 1] {
            let mut d = b.clone();
            d[at] ^= 1;
            assert!(CacheIndex::decode(&d).is_err(), "flip at {at}");
        }
        for n in 0..b.len() {
            assert!(CacheIndex::decode(&b[..n]).is_err());
        }
    }

    #[test]
    fn runs_are_checked() {
        let mut i = sample();
        i.runs[1].start = 10; // overlaps run 0
        assert!(CacheIndex::decode(&i.encode()).is_err());
        let mut i = sample();
        i.runs[2].pack = 1;
        assert!(CacheIndex::decode(&i.encode()).is_err());
        let mut i = sample();
        i.runs[2].start = (1 << 30) / CHUNK - 1;
        assert!(CacheIndex::decode(&i.encode()).is_err());
    }

    #[test]
    fn footer_fits_the_file() {
        let ft = Footer {
            frames: 2,
            chunks: 40,
            table_offset: 1000,
            table_hash: [0; 32],
            keys_hash: [0; 32],
        };
        let len = 1000 + 2 * FRAME_ENTRY + 40 * KEY_LEN as u64 + PACK_FOOTER;
        assert_eq!(Footer::decode(&ft.encode(), len).unwrap(), ft);
        assert!(Footer::decode(&ft.encode(), len + 1).is_err());
        let mut f = ft;
        f.chunks = 1000;
        assert!(Footer::decode(&f.encode(), len).is_err());
    }
}
