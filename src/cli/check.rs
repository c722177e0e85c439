//! `vmicache check`.

use anyhow::{bail, Result};
use std::path::Path;
use vmicache::engine::check::{check, Repair};
use vmicache::engine::open::probe;
use vmicache::engine::storage::FileStorage;
use vmicache::engine::{Format, Image, OpenOptions};

pub fn run(path: &Path, repair: bool, json: bool) -> Result<i32> {
    let st = FileStorage::open(path, false)?;
    if probe(&st)? != Format::Qcow2 {
        bail!(
            "{}: not a qcow2 image: raw images have no metadata to check",
            path.display()
        );
    }
    drop(st);
    // As qemu-img: an image whose backing chain does not open is not checked.
    drop(Image::open(path, &OpenOptions::read_only())?);
    let r = check(path, if repair { Repair::Leaks } else { Repair::None })?;
    for m in &r.messages {
        errln!("{m}");
    }
    if json {
        // The fields of `qemu-img check --output=json`: zero counts are left out.
        let mut o = serde_json::Map::new();
        let mut put = |k: &str, v: u64, always: bool| {
            if always || v != 0 {
                o.insert(k.into(), v.into());
            }
        };
        put("image-end-offset", r.image_end_offset, false);
        put("total-clusters", r.total_clusters, false);
        put("corruptions", r.corruptions, false);
        put("corruptions-fixed", r.corruptions_fixed, false);
        put("check-errors", r.check_errors, true);
        put("leaks", r.leaks, false);
        put("leaks-fixed", r.leaks_fixed, false);
        put("allocated-clusters", r.allocated_clusters, false);
        put("fragmented-clusters", r.fragmented_clusters, false);
        put("compressed-clusters", r.compressed_clusters, false);
        o.insert("filename".into(), r.filename.clone().into());
        o.insert("format".into(), r.format.clone().into());
        outln!("{}", serde_json::to_string_pretty(&o)?);
        return Ok(r.exit_code());
    }
    if r.leaks_fixed > 0 {
        outln!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    0 corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        outln!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        outln!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        outln!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\nRepair with: vmicache check --repair leaks {}",
            r.leaks,
            path.display()
        );
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let a = r.allocated_clusters as f64;
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        );
    }
    if r.image_end_offset > 0 {
        outln!("Image end offset: {}", r.image_end_offset);
    }
    Ok(r.exit_code())
}
