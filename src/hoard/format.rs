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
