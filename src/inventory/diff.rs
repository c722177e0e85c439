//! Two inventories compared (Mirage's image diff): files and packages added, removed, changed.

use super::{Entry, Inventory, Package};
use std::collections::BTreeMap;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    pub path: String,
    /// What differs: `type`, `size`, `mode`, `owner`, `target`, `content`, `content unknown`.
    pub what: Vec<String>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<Change>,
    pub packages_added: Vec<Package>,
    pub packages_removed: Vec<Package>,
    /// (name, version in A, version in B).
    pub packages_changed: Vec<(String, String, String)>,
}

fn key(e: &Entry) -> String {
    if e.fs == 0 {
        e.path.clone()
    } else {
        format!("[{}]{}", e.fs, e.path)
    }
}

/// What changed from `a` to `b` (both taken with `hash_content` for content changes).
pub fn diff(a: &Inventory, b: &Inventory) -> Diff {
    let index = |inv: &Inventory| -> BTreeMap<String, usize> {
        inv.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (key(e), i))
            .collect()
    };
    let (ia, ib) = (index(a), index(b));
    let mut d = Diff::default();
    for (k, &i) in &ia {
        let Some(&j) = ib.get(k) else {
            d.removed.push(k.clone());
            continue;
        };
        let (x, y) = (&a.entries[i], &b.entries[j]);
        let mut what = Vec::new();
        if x.kind != y.kind {
            what.push("type".to_string());
        }
        if x.size != y.size {
            what.push("size".into());
        }
        if x.mode != y.mode {
            what.push("mode".into());
        }
        if (x.uid, x.gid) != (y.uid, y.gid) {
            what.push("owner".into());
        }
        if x.target != y.target {
            what.push("target".into());
        }
        if x.kind == '-' && y.kind == '-' && x.size == y.size {
            match (
                a.hashes.get(i).copied().flatten(),
                b.hashes.get(j).copied().flatten(),
            ) {
                (Some(h), Some(g)) if h != g => what.push("content".into()),
                (Some(_), Some(_)) => {}
                _ if a.hashes.is_empty() || b.hashes.is_empty() => {}
                _ => what.push("content unknown".into()),
            }
        }
        if !what.is_empty() {
            d.changed.push(Change {
                path: k.clone(),
                what,
            });
        }
    }
    d.added = ib
        .keys()
        .filter(|k| !ia.contains_key(*k))
        .cloned()
        .collect();
    let pkgs = |inv: &Inventory| -> BTreeMap<String, Package> {
        inv.packages
            .iter()
            .map(|p| (format!("{}:{}", p.name, p.arch), p.clone()))
            .collect()
    };
    let (pa, pb) = (pkgs(a), pkgs(b));
    for (k, p) in &pa {
        match pb.get(k) {
            None => d.packages_removed.push(p.clone()),
            Some(q) if q.version != p.version => {
                d.packages_changed
                    .push((p.name.clone(), p.version.clone(), q.version.clone()))
            }
            _ => {}
        }
    }
    d.packages_added = pb
        .iter()
        .filter(|(k, _)| !pa.contains_key(*k))
        .map(|(_, p)| p.clone())
        .collect();
    d
}
