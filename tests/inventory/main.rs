//! `vmicache inventory` and `hoard find` on the guests of images/: the base's files against the
//! list of the root the recipe built (files.txt), packages against `dpkg-query` run on that
//! root (packages.txt), a cache recorded by a real boot (QEMU, TCG) holding what the boot read,
//! the trace in the guest's terms; hostile and fuzzed disks in hostile.rs.

#[path = "../common/mod.rs"]
mod common;
mod hostile;
use common::guest::*;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// files.txt of a guest: path -> (type letter as ls prints it, mode, uid, gid, size).
fn recipe_files(dir: &Path) -> BTreeMap<String, (char, u16, u32, u32, u64)> {
    let text = std::fs::read_to_string(dir.join("files.txt"))
        .unwrap_or_else(|e| panic!("{}/files.txt: {e} (run images/build.sh)", dir.display()));
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            let kind = match f[0] {
                "f" => '-',
                k => k.chars().next().unwrap(),
            };
            let mode = u16::from_str_radix(f[1], 8).unwrap();
            (
                f[5].to_string(),
                (
                    kind,
                    mode,
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                    f[4].parse().unwrap(),
                ),
            )
        })
        .collect()
}

fn inventory_json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = hostile::inventory(args);
    assert_eq!(code, 0, "inventory {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

fn entries(j: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    j["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["path"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

#[test]
fn base_lists_the_files_and_packages_the_recipe_put_there() {
    let g = guest_dir();
    let base = g.join("base.raw");
    let j = inventory_json(&["--json", ps(&base)]);
    assert_eq!(j["layers"], 1);
    assert!(
        j["warnings"].as_array().unwrap().is_empty(),
        "{}",
        j["warnings"]
    );
    let got = entries(&j);
    let want = recipe_files(&g);
    for (path, (kind, mode, uid, gid, size)) in &want {
        let e = got
            .get(path)
            .unwrap_or_else(|| panic!("{path} of files.txt not listed"));
        assert_eq!(
            e["kind"].as_str().unwrap().chars().next().unwrap(),
            *kind,
            "{path}"
        );
        assert_eq!(e["mode"].as_u64().unwrap(), u64::from(*mode), "{path}");
        assert_eq!(
            (e["uid"].as_u64().unwrap(), e["gid"].as_u64().unwrap()),
            (u64::from(*uid), u64::from(*gid)),
            "{path}"
        );
        if *kind != 'd' {
            assert_eq!(e["size"].as_u64().unwrap(), *size, "{path}");
        }
    }
    // Symlink targets the recipe made (fast symlinks: kept in the inode).
    assert_eq!(got["/bin/sh"]["target"], "bash");
    assert_eq!(got["/usr/bin/python3"]["target"], "python3.11");
    // Nothing more than the root, and lost+found (mkfs makes it).
    let extra: Vec<&String> = got
        .keys()
        .filter(|p| !want.contains_key(*p) && !p.starts_with("/lost+found"))
        .collect();
    assert!(extra.is_empty(), "listed but not in the root: {extra:?}");
    let pkgs: Vec<String> = j["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["name"].as_str().unwrap(),
                p["version"].as_str().unwrap()
            )
        })
        .collect();
    let mut want_pkgs: Vec<String> = std::fs::read_to_string(g.join("packages.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    want_pkgs.sort();
    assert_eq!(pkgs, want_pkgs);
}

/// A cache of the guest recorded by a real boot (`warm --boot`), its trace beside it.
fn recorded_cache(dir: &Path) -> (PathBuf, PathBuf) {
    let base = guest_dir().join("base.raw");
    let cache = dir.join("cache.qcow2");
    run(bin().args(["build", ps(&base), "-o", ps(&cache)]));
    run(bin()
        .args(["warm", ps(&cache), "--boot", "--timeout", "300", "--"])
        .arg(boot_sh())
        .args([guest().as_str(), "{nbd}", "raw"]));
    let trace = PathBuf::from(format!("{}.trace", cache.display()));
    (cache, trace)
}

#[test]
fn cache_holds_what_the_boot_read_and_the_trace_says_in_which_order() {
    let d = tempfile::tempdir().unwrap();
    let (cache, trace) = recorded_cache(d.path());
    let j = inventory_json(&["--json", ps(&cache)]);
    assert_eq!(j["layers"], 2);
    let got = entries(&j);
    let held = |p: &str| {
        got.get(p).unwrap_or_else(|| panic!("{p} not listed"))["held"]["held"]
            .as_u64()
            .unwrap()
    };
    let word = |p: &str| {
        let h = &got[p]["held"];
        let (b, k) = (h["bytes"].as_u64().unwrap(), h["held"].as_u64().unwrap());
        if k >= b {
            "whole"
        } else if k == 0 {
            "none"
        } else {
            "part"
        }
    };
    // The boot's check reads every file of its manifest, whole (the manifest read from the
    // base by debugfs, not by us); the manifest itself; the interpreter and the C library.
    let m = "/usr/local/share/vmicache/manifest.sha256";
    let base = guest_dir().join("base.raw");
    let manifest = run(tool("debugfs").args(["-R", &format!("cat {m}"), ps(&base)])).stdout;
    let manifest = String::from_utf8(manifest).unwrap();
    let mut checked = 0;
    for line in manifest.lines() {
        let path = format!("/{}", line.split_once("  ").unwrap().1);
        if got[&path]["size"].as_u64().unwrap() > 0 {
            assert_eq!(
                word(&path),
                "whole",
                "{path}: read by the boot, not whole in the cache"
            );
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} files in the manifest");
    assert_eq!(word(m), "whole");
    let listed =
        String::from_utf8(run(bin().args(["inventory", ps(&cache), "--held"])).stdout).unwrap();
    for p in [
        "/usr/bin/python3.11",
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/bin/bash",
    ] {
        assert!(held(p) > 0, "{p} not held at all");
        assert!(listed.contains(p), "--held does not list {p}");
    }
    // A file no boot reads is not held.
    assert_eq!(word("/usr/share/doc/bash/copyright"), "none");
    let c = &j["cache"];
    assert!(c["file_data"].as_u64().unwrap() > 8 << 20, "{c}");
    assert!(c["metadata"].as_u64().unwrap() > 0, "{c}");

    // The trace in the guest's terms: init and its interpreter before python, which runs the
    // check; every file the check read is there. (The trace is of clusters: files next to
    // one read on disk are listed too, when the clusters read reach into them.)
    let t = inventory_json(&["--json", ps(&cache), "--trace", ps(&trace)]);
    let order = hostile::strings(&t["files"], "path");
    let at = |p: &str| {
        order
            .iter()
            .position(|x| *x == p)
            .unwrap_or_else(|| panic!("{p} not in the trace's files"))
    };
    assert!(at("/sbin/init") < at("/usr/bin/python3.11"));
    assert!(at("/bin/bash") < at("/usr/bin/python3.11"));
    for line in manifest.lines() {
        let path = format!("/{}", line.split_once("  ").unwrap().1);
        if got[&path]["size"].as_u64().unwrap() > 0 {
            at(&path);
        }
    }
    assert!(t["other_bytes"].as_u64().unwrap() > 0);
    let read: u64 = t["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["read"].as_u64().unwrap())
        .sum();
    assert_eq!(
        read + t["other_bytes"].as_u64().unwrap(),
        t["bytes"].as_u64().unwrap()
    );

    // Offline: with the base gone, what the cache holds is still listed, with a warning.
    let moved = d.path().join("elsewhere.raw");
    let cache_copy = d.path().join("orphan.qcow2");
    std::fs::copy(&cache, &cache_copy).unwrap();
    run(tool("qemu-img").args([
        "rebase",
        "-u",
        "-b",
        ps(&moved),
        "-F",
        "raw",
        ps(&cache_copy),
    ]));
    let (code, out, err) = hostile::inventory(&["--json", ps(&cache_copy)]);
    assert_eq!(code, 0, "{err}");
    let o: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(err.contains("could not be answered"), "{err}");
    assert!(
        entries(&o).contains_key(m),
        "the manifest (held) is not listed offline"
    );

    // hoard find: which hoarded cache holds the manifest, and the python package.
    let hoard = d.path().join("hoard");
    run(bin().args(["hoard", "init", ps(&hoard)]));
    run(bin().args([
        "hoard",
        "--hoard",
        ps(&hoard),
        "add",
        ps(&cache),
        "--name",
        "minimal",
    ]));
    let f = String::from_utf8(
        run(bin().args(["hoard", "--hoard", ps(&hoard), "find", "manifest.sha256"])).stdout,
    )
    .unwrap();
    assert!(
        f.contains("minimal\tfile\t/usr/local/share/vmicache/manifest.sha256\twhole"),
        "{f}"
    );
    let f = String::from_utf8(
        run(bin().args([
            "hoard",
            "--hoard",
            ps(&hoard),
            "find",
            "python3.11-minimal=3.11*",
        ]))
        .stdout,
    )
    .unwrap();
    assert!(
        f.contains("minimal\tpackage\tpython3.11-minimal 3.11"),
        "{f}"
    );
    let none = run_status(bin().args(["hoard", "--hoard", ps(&hoard), "find", "/no/such/file"]));
    assert_eq!(none.status.code(), Some(1));
}

/// Needs the systemd guest (`images/build.sh systemd`): `tools/test.sh --long` builds it and
/// runs this with --include-ignored.
#[test]
#[ignore = "needs the systemd guest: tools/test.sh --long runs it"]
fn diff_of_the_minimal_and_systemd_guests() {
    let root = guest_dir().parent().unwrap().to_path_buf();
    let (a, b) = (root.join("minimal/base.raw"), root.join("systemd/base.raw"));
    let j = inventory_json(&["--json", "--diff", ps(&a), ps(&b)]);
    let list = |k: &str| -> Vec<String> {
        j[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let (added, removed) = (list("added"), list("removed"));
    let changed: BTreeMap<String, Vec<String>> = j["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["what"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| w.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    // systemd's own binary and units come with the systemd guest only.
    assert!(
        added.iter().any(|p| p == "/usr/lib/systemd/systemd"),
        "systemd not added"
    );
    assert!(
        added.iter().any(|p| p.starts_with("/etc/systemd/system/")),
        "no units added"
    );
    // The minimal guest's init is a bash script; the systemd guest's a symlink to systemd.
    assert!(
        changed
            .get("/sbin/init")
            .is_some_and(|w| w.contains(&"type".to_string()))
            || removed.contains(&"/sbin/init".to_string()),
        "{changed:?}"
    );
    // Same size, other content: the host name.
    let host = &changed["/etc/hostname"];
    assert!(
        host.contains(&"content".to_string()) && !host.contains(&"size".to_string()),
        "{host:?}"
    );
    // The same file in both (the check's own script, installed alike) is not reported.
    assert!(!changed.contains_key("/usr/local/lib/vmicache/vmicache-check.py"));
    // Packages: systemd added; python3.11-minimal in both.
    let pa = hostile::strings(&j["packages_added"], "name");
    assert!(pa.contains(&"systemd"), "{pa:?}");
    let pr = hostile::strings(&j["packages_removed"], "name");
    assert!(!pr.contains(&"python3.11-minimal"), "{pr:?}");
}
