//! Header, extension and table-entry parsers on arbitrary bytes: never panic, and what parses
//! re-encodes to something that parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmicache::format::ext::CacheMeta;
use vmicache::format::header::Header;
use vmicache::format::table::{L1Entry, L2Entry};
use vmicache::format::types::Geometry;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data, data.len() as u64) {
        if let Ok(b) = h.encode() {
            let mut padded = b.clone();
            padded.resize(h.geometry.cluster_size() as usize, 0);
            let again = Header::parse(&padded, data.len().max(padded.len()) as u64);
            if let Ok(again) = again {
                assert_eq!(again.size, h.size);
                assert_eq!(again.backing_file, h.backing_file);
                assert_eq!(again.extensions, h.extensions);
            }
        }
    }
    let _ = CacheMeta::decode(data);
    if data.len() >= 9 {
        let g = Geometry {
            cluster_bits: 9 + u32::from(data[0] % 13),
            refcount_order: u32::from(data[0] % 7),
        };
        let e = u64::from_be_bytes(data[1..9].try_into().unwrap());
        let _ = L2Entry(e).mapping(&g, data[0] & 1 == 0);
        let _ = L1Entry(e).l2_offset(&g);
    }
});
