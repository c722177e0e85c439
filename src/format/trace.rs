//! Boot traces: the ordered reads that went to the base during a recorded boot (the
//! encoding; `crate::chain::trace` reads and writes trace files).
//!
//! Format (version 1), all fixed integers big-endian, documented in docs/format.md:
//!
//! ```text
//! 8 bytes  magic "VMITRACE"
//! u32      version = 1
//! u32      flags = 0
//! u64      base virtual size
//! 32 bytes base fingerprint (scheme 1, see identity.rs)
//! u64      number of entries
//! entries: LEB128 zigzag(offset - end of previous entry), LEB128 length
//! ```
//!
//! A boot of thousands of mostly sequential reads takes a few bytes per read.

pub const MAGIC: &[u8; 8] = b"VMITRACE";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub base_size: u64,
    pub base_fingerprint: [u8; 32],
    /// (guest offset, length) in the order the reads happened.
    pub reads: Vec<(u64, u64)>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn get_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

impl Trace {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.reads.len() * 4);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&self.base_size.to_be_bytes());
        b.extend_from_slice(&self.base_fingerprint);
        b.extend_from_slice(&(self.reads.len() as u64).to_be_bytes());
        let mut prev_end = 0u64;
        for &(off, len) in &self.reads {
            let d = off.wrapping_sub(prev_end) as i64;
            put_varint(&mut b, ((d << 1) ^ (d >> 63)) as u64);
            put_varint(&mut b, len);
            prev_end = off.wrapping_add(len);
        }
        b
    }

    pub fn decode(b: &[u8]) -> std::result::Result<Trace, String> {
        if b.len() < 64 || &b[..8] != MAGIC {
            return Err("not a vmicache trace (bad magic)".into());
        }
        let v = u32::from_be_bytes(b[8..12].try_into().unwrap());
        if v != VERSION {
            return Err(format!(
                "trace version {v} is not supported (this vmicache reads {VERSION})"
            ));
        }
        let base_size = u64::from_be_bytes(b[16..24].try_into().unwrap());
        let base_fingerprint: [u8; 32] = b[24..56].try_into().unwrap();
        let n = u64::from_be_bytes(b[56..64].try_into().unwrap());
        // Each entry takes at least two bytes: bound the allocation by the file.
        if n > (b.len() as u64 - 64) / 2 {
            return Err(format!(
                "trace claims {n} entries, more than its size allows"
            ));
        }
        let mut reads = Vec::with_capacity(n as usize);
        let mut at = 64;
        let mut prev_end = 0u64;
        for i in 0..n {
            let (Some(z), Some(len)) = (get_varint(b, &mut at), get_varint(b, &mut at)) else {
                return Err(format!("trace truncated at entry {i}"));
            };
            let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let off = prev_end.wrapping_add(d as u64);
            if off.checked_add(len).is_none_or(|e| e > base_size) {
                return Err(format!(
                    "entry {i} ({off:#x}+{len:#x}) lies outside the base"
                ));
            }
            reads.push((off, len));
            prev_end = off + len;
        }
        Ok(Trace {
            base_size,
            base_fingerprint,
            reads,
        })
    }

    /// Total bytes read.
    pub fn bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_and_hostile() {
        let t = Trace {
            base_size: 1 << 30,
            base_fingerprint: [3; 32],
            reads: vec![
                (0, 4096),
                (4096, 65536),
                (1 << 20, 512),
                (8192, 4096),
                ((1 << 30) - 1, 1),
            ],
        };
        let b = t.encode();
        assert!(b.len() < 64 + 5 * 6);
        assert_eq!(Trace::decode(&b).unwrap(), t);
        assert!(Trace::decode(&b[..b.len() - 1]).is_err());
        let mut huge = b.clone();
        huge[56..64].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(Trace::decode(&huge).is_err());
    }
}
