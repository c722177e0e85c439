//! Any bytes as a disk (`inventory`'s probing): partition tables, ext superblocks, directories,
//! extent trees and the dpkg status are read and walked; errors and warnings are fine, panics,
//! hangs and unbounded allocations are not. tests/inventory/hostile.rs runs a mutation fuzzer
//! of the same probe on stable in every test run.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmicache::engine::storage::MemStorage;
use vmicache::engine::Image;
use vmicache::inventory::{take, Options};

fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::from_storage(Box::new(MemStorage::new(data.to_vec())), false) else {
        return;
    };
    let opts = Options {
        keep_ranges: true,
        hash_content: true,
        max_entries: 100_000,
    };
    let _ = take(img, "fuzz", &opts);
});
