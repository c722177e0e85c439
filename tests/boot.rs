//! End to end: a real Linux guest (images/build.sh minimal) boots under qemu-system-x86_64
//! (TCG) through `vmicache serve`. The recorded first boot fills and seals the cache; later
//! boots read nothing from the base, witnessed by nbdkit (not our code): its log filter counts
//! the base reads, and its error filter makes every base read fail.
//!
//! Needs: the guest built by `images/build.sh minimal` (tools/test.sh does it), qemu-system-x86
//! and nbdkit (tools/deps.sh --boot). Missing pieces fail the test; they are not skipped.

mod common;
use common::guest::*;
use common::*;
use std::path::{Path, PathBuf};

/// A 4 KiB-cluster instance made by QEMU (as vmicache makes them) in `dir` over `cache`.
fn qemu_instance(dir: &Path, name: &str, cache: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_create(
        &p,
        None,
        &["-o", "cluster_size=4k", "-b", cache, "-F", "qcow2"],
    );
    p
}

/// Point a cache's backing file at the base served by nbdkit on `sock`.
fn rebase_onto_nbd(cache: &Path, sock: &Path) {
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_img(&["rebase", "-u", "-b", &uri, "-F", "raw", ps(cache)]);
}

fn data_bytes(img: &Path) -> u64 {
    let j: serde_json::Value =
        serde_json::from_slice(&run(bin().args(["inspect", "--json", ps(img)])).stdout).unwrap();
    j["layers"][0]["allocated-bytes"].as_u64().unwrap()
}

#[test]
fn minimal_guest_boots_from_its_cache_without_touching_the_base() {
    let g = guest_dir();
    let base = g.join("base.raw");
    assert!(
        base.exists(),
        "{} missing: run images/build.sh GUEST (tools/test.sh does)",
        base.display()
    );
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();

    // 1. Record: build, warm --boot through serve, sealed, trace written.
    let cache = dir.join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    let out = run(bin()
        .args(["warm", ps(&cache), "--boot", "--timeout", "300", "--"])
        .arg(boot_sh())
        .args([guest().as_str(), "{nbd}", "raw"]));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("sealed"), "{said}");
    let trace = PathBuf::from(format!("{}.trace", cache.display()));
    assert!(trace.exists());
    check_clean(&cache);
    let working_set = data_bytes(&cache);
    assert!(working_set > 8 << 20, "working set {working_set}");

    // Instances are made while the base is still a local file.
    let inst = dir.join("vm1.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst)]));
    let inst_native = dir.join("native.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&inst_native)]));

    // From now on the base is reachable only through nbdkit.
    let bsock = dir.join("base.sock");
    let log = dir.join("nbdkit.log");
    let kit = nbdkit(
        &bsock,
        &["--filter=log"],
        &base,
        &[&format!("logfile={}", log.display())],
    );
    rebase_onto_nbd(&cache, &bsock);

    // 2. A warm boot through vmicache reads 0 bytes from the base.
    let before = base_reads(&log);
    boot_served(dir, &inst);
    assert_eq!(
        base_reads(&log) - before,
        0,
        "warm boot read from the base:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    check_clean(&cache);
    check_clean(&inst);

    // 2b. The sealed cache hoarded (its base now the nbdkit URI), an instance over the
    //     hoarded cache: the warm boot reads its working set from the hoard's packs and
    //     0 B from the base.
    let hoard = dir.join("hoard");
    let allow = format!("{}:{}", guest_dir().display(), dir.display());
    let hv = |args: &[&str]| {
        run(bin()
            .env("VMICACHE_HOARD", &hoard)
            .env("VMICACHE_ALLOW_BACKING", &allow)
            .args(args))
    };
    hv(&["hoard", "init", ps(&hoard)]);
    hv(&["hoard", "add", ps(&cache), "--name", "guest"]);
    let hinst = dir.join("hoarded.qcow2");
    hv(&["chain", "hoard:guest", "-o", ps(&hinst)]);
    let allowed_before = std::env::var_os("VMICACHE_ALLOW_BACKING");
    std::env::set_var("VMICACHE_ALLOW_BACKING", &allow);
    let before = base_reads(&log);
    let plain_secs = boot_served(dir, &inst);
    let hoard_secs = boot_served(dir, &hinst);
    if let Some(v) = allowed_before {
        std::env::set_var("VMICACHE_ALLOW_BACKING", v);
    }
    assert_eq!(
        base_reads(&log) - before,
        0,
        "boots from the hoard and the cache read from the base"
    );
    eprintln!(
        "warm boot served from the cache {plain_secs:.1} s, from the hoard {hoard_secs:.1} s"
    );

    // 3. Native chain: QEMU opens instance -> cache -> base itself and boots.
    boot(ps(&inst_native), "qcow2");
    check_clean(&inst_native);
    eprintln!("native chain: {} base reads", base_reads(&log) - before);
    kit.stop();

    // 4. The base made unreadable: every read fails. The warm boot does not care.
    let kit = nbdkit(
        &bsock,
        &["--filter=error"],
        &base,
        &["error-pread=EIO", "error-pread-rate=100%"],
    );
    // Made by QEMU this time, with 4 KiB clusters like vmicache's instances.
    let inst2 = qemu_instance(dir, "vm2.qcow2", "cache.qcow2");
    boot_served(dir, &inst2);

    // 5. Replay: a fresh cache warmed from the trace boots with the base unreadable too.
    let cache2 = dir.join("replayed.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache2)]));
    run(bin().args(["warm", ps(&cache2), "--trace", ps(&trace)]));
    run(bin().args(["seal", ps(&cache2)]));
    let inst3 = dir.join("vm3.qcow2");
    run(bin().args(["chain", ps(&cache2), "-o", ps(&inst3)]));
    rebase_onto_nbd(&cache2, &bsock);
    boot_served(dir, &inst3);

    // 6. The replayed cache compacted (zstd): served, it boots with the base unreadable.
    let plain_size = std::fs::metadata(&cache2).unwrap().len();
    run(bin().args(["seal", "--compact", "--compress", "zstd", ps(&cache2)]));
    check_clean(&cache2);
    eprintln!(
        "compacted cache: {plain_size} -> {} bytes",
        std::fs::metadata(&cache2).unwrap().len()
    );
    let inst4 = qemu_instance(dir, "vm4.qcow2", "replayed.qcow2");
    let served = boot_served(dir, &inst4);
    kit.stop();
    // Native chain over the compacted cache: QEMU decompresses it itself.
    let kit = nbdkit(
        &bsock,
        &["--filter=log"],
        &base,
        &[&format!("logfile={}", log.display())],
    );
    let inst5 = qemu_instance(dir, "vm5.qcow2", "replayed.qcow2");
    let before = base_reads(&log);
    let native = boot(ps(&inst5), "qcow2");
    check_clean(&inst5);
    eprintln!(
        "compacted cache: served boot {served:.1} s, native boot {native:.1} s ({} base reads)",
        base_reads(&log) - before
    );
    kit.stop();

    // 5b. The storage node down altogether (no nbdkit at all): a sealed cache needs nothing
    //     of its base; `chain` makes an instance and `serve` starts and boots it.
    let _ = std::fs::remove_file(&bsock);
    let offline = dir.join("offline.qcow2");
    run(bin().args(["chain", ps(&cache), "-o", ps(&offline)]));
    boot_served(dir, &offline);

    // 7. Quota below the working set: the boot still succeeds, reads pass through, the cache
    //    stays within its quota.
    let small = dir.join("small.qcow2");
    let quota = 8u64 << 20;
    run(bin().args(["build", ps(&base), "-o", ps(&small), "--quota", "8M"]));
    run(bin()
        .args(["warm", ps(&small), "--boot", "--timeout", "300", "--"])
        .arg(boot_sh())
        .args([guest().as_str(), "{nbd}", "raw"]));
    assert!(data_bytes(&small) <= quota, "cache exceeds its quota");
    check_clean(&small);
}
