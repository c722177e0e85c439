//! Open arbitrary bytes as an image in memory and read from it: errors are fine, panics and
//! huge allocations are not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmicache::engine::storage::MemStorage;
use vmicache::engine::Image;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::from_storage(Box::new(MemStorage::new(data.to_vec())), false) else {
        return;
    };
    let size = img.virtual_size();
    let mut buf = vec![0u8; 65536];
    for off in [0, size / 3, size.saturating_sub(65536)] {
        let n = (size - off.min(size)).min(65536) as usize;
        let _ = img.read_at(&mut buf[..n], off);
    }
    if let Some(q) = img.as_qcow2() {
        let _ = q.allocated_clusters();
    }
    let _ = img.chain_status(0, size);
    let _ = img.read_pieces(0, size.min(1 << 20));
});
