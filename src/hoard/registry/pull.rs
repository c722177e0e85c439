//! `hoard pull`: a generation from a registry, only the blobs this hoard lacks; and the
//! removal of tags out of the GC window (`hoard gc --registry`).

use super::errors::subject;
use super::{Auth, Remote, Session, ARTIFACT_TYPE, GEN_TYPE, ID_ANNOTATION, INDEX_TYPE, PACK_TYPE};
use crate::hoard::format::{hex, parse_hex};
use crate::hoard::gens::{GenId, Generation};
use crate::hoard::store::Hoard;
use crate::hoard::stream::{
    adopt, install_index, not_back, PackSink, StreamReport, MAX_PACK_BYTES,
};
use crate::{Error, Result};
use futures_util::StreamExt;
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::Reference;
use std::collections::HashSet;

/// The tag a pull fetches: the reference's own, else `latest`.
fn tag_of(s: &Session) -> String {
    s.reference.tag().unwrap_or("latest").to_string()
}

/// Download a blob into memory, at most `max` bytes (the client checks its sha256).
async fn fetch_small(s: &Session, r: &Reference, d: &OciDescriptor, max: u64) -> Result<Vec<u8>> {
    if d.size < 0 || d.size as u64 > max {
        return Err(s.err("blob", format!("{} of {} B is too large", d.digest, d.size)));
    }
    let mut st = s
        .client
        .pull_blob_stream(r, d)
        .await
        .map_err(|e| s.net(&format!("download {}", d.digest), e))?;
    let mut out = Vec::new();
    while let Some(c) = st.next().await {
        let c = c.map_err(|e| s.net(&format!("download {}", d.digest), e))?;
        if (out.len() + c.len()) as u64 > d.size as u64 {
            return Err(s.err(
                "blob",
                format!("{} is longer than its descriptor says", d.digest),
            ));
        }
        out.extend_from_slice(&c);
    }
    if out.len() as u64 != d.size as u64 {
        return Err(s.err(
            "blob",
            format!("{} is shorter than its descriptor says", d.digest),
        ));
    }
    Ok(out)
}

/// The BLAKE3 id a descriptor is annotated with.
fn id_of(s: &Session, d: &OciDescriptor) -> Result<[u8; 32]> {
    d.annotations
        .as_ref()
        .and_then(|a| a.get(ID_ANNOTATION))
        .and_then(|x| parse_hex(x))
        .ok_or_else(|| {
            s.err(
                "manifest",
                format!("blob {} has no {ID_ANNOTATION}", d.digest),
            )
        })
}

/// A generation's manifest at `r`, checked to be a hoard's, with its record.
async fn fetch_generation(
    s: &Session,
    r: &Reference,
    tag: &str,
) -> Result<(OciImageManifest, GenId, Vec<u8>, Generation)> {
    let (body, _digest) = s
        .client
        .pull_manifest_raw(r, &s.auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
        .map_err(|e| s.net(&format!("manifest {tag}"), e))?;
    if body.len() > 64 << 20 {
        return Err(s.err("manifest", "too large"));
    }
    let m: OciImageManifest = serde_json::from_slice(&body).map_err(|e| s.err("manifest", e))?;
    if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) || m.config.media_type != GEN_TYPE {
        return Err(Error::refused(
            subject(&s.name),
            format!(
                "{tag} is not a vmicache hoard generation (artifact type {:?})",
                m.artifact_type
            ),
        ));
    }
    let gid = id_of(s, &m.config)?;
    let rec = fetch_small(s, r, &m.config, crate::hoard::gens::MAX_GEN_BYTES).await?;
    let g = Generation::decode(&rec, &gid, subject(&s.name))?;
    Ok((m, gid, rec, g))
}

/// Bring this hoard to the generation at `remote` (its tag, else `latest`), downloading only
/// the blobs it lacks. `force`: accept an older generation than this hoard's. The hoard's
/// lock is taken only once there is something to fetch (a pull that finds this hoard up to
/// date never holds it).
pub fn pull(h: &Hoard, remote: &Remote, force: bool) -> Result<StreamReport> {
    let t0 = std::time::Instant::now();
    let s = Session::new(remote)?;
    let tag = tag_of(&s);
    let r = s.tagged(&tag);
    let (m, gid, rec, g) = s.rt.block_on(fetch_generation(&s, &r, &tag))?;
    let mut rep = StreamReport {
        generation: g.generation,
        id: hex(&gid),
        ..Default::default()
    };
    let done = |mut rep: StreamReport| {
        rep.up_to_date = true;
        rep.seconds = t0.elapsed().as_secs_f64();
        Ok(rep)
    };
    if h.head_id()? == Some(gid) {
        return done(rep);
    }
    // Downloads under the shared lock (readers such as the hook's checkout go on; a gc,
    // which could take what is downloaded for garbage, waits); the exclusive one only to
    // commit.
    let shared = h.read_lock()?;
    if let Some((hid, hg)) = h.head()? {
        if hid == gid {
            return done(rep);
        }
        not_back(h, hg.generation, g.generation, &format!("{tag}'s"), force)?;
        rep.from = Some(hg.generation);
    }
    s.rt.block_on(async {
        // Indexes first: what they name bounds which packs are taken.
        let want: HashSet<[u8; 32]> = g.indexes()?.into_values().collect();
        let mut packs_wanted: HashSet<[u8; 32]> = HashSet::new();
        for d in m.layers.iter().filter(|d| d.media_type == INDEX_TYPE) {
            let id = id_of(&s, d)?;
            if !want.contains(&id) {
                return Err(s.err(
                    "manifest",
                    format!("index {} is not its generation's", hex(&id)),
                ));
            }
            if let Ok(i) = h.stored_index(&id) {
                packs_wanted.extend(i.packs);
                continue;
            }
            let b = fetch_small(&s, &r, d, crate::hoard::format::MAX_INDEX_BYTES).await?;
            packs_wanted.extend(install_index(h, &id, &b)?);
            rep.indexes += 1;
            rep.bytes += b.len() as u64;
        }
        for d in m.layers.iter().filter(|d| d.media_type == PACK_TYPE) {
            let id = id_of(&s, d)?;
            if !packs_wanted.contains(&id) {
                return Err(s.err(
                    "manifest",
                    format!("pack {} is not used by its generation", hex(&id)),
                ));
            }
            if h.pack_path(&id).exists() {
                rep.packs_present += 1;
                continue;
            }
            if d.size < 0 || d.size as u64 > MAX_PACK_BYTES {
                return Err(s.err("manifest", format!("pack {} of {} B", hex(&id), d.size)));
            }
            let mut st = s
                .client
                .pull_blob_stream(&r, d)
                .await
                .map_err(|e| s.net(&format!("download pack {}", hex(&id)), e))?;
            let mut sink = PackSink::new(h, &id, d.size as u64)?;
            let mut got = 0u64;
            while let Some(c) = st.next().await {
                let c = c.map_err(|e| s.net(&format!("download pack {}", hex(&id)), e))?;
                got += c.len() as u64;
                sink.write(&c)?;
            }
            sink.finish()?;
            rep.packs += 1;
            rep.pack_bytes += got;
            rep.bytes += got;
        }
        Ok::<(), Error>(())
    })?;
    rep.bytes += rec.len() as u64;
    drop(shared);
    let lock = h.lock()?;
    // Another writer may have moved this hoard meanwhile.
    match h.head()? {
        Some((hid, _)) if hid == gid => return done(rep),
        Some((_, hg)) => not_back(h, hg.generation, g.generation, &format!("{tag}'s"), force)?,
        None => {}
    }
    adopt(h, &lock, &gid, &rec)?;
    rep.seconds = t0.elapsed().as_secs_f64();
    Ok(rep)
}

/// Remove the tags `gen-N` of generations not in `keep` (the GC window) from `remote`; the
/// registry's own garbage collector then reclaims blobs nothing names. The newest generation
/// (`latest`) is never removed. The number of tags removed.
pub fn prune_tags(remote: &Remote, keep: &HashSet<u64>, newest: u64) -> Result<usize> {
    let s = Session::new(remote)?;
    let r = s.tagged("latest");
    s.rt.block_on(async {
        let tags = s
            .client
            .list_tags(&r, &s.auth, None, None)
            .await
            .map_err(|e| s.net("list tags", e))?
            .tags;
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| s.err("HTTP client", e))?;
        // Deleting a manifest deletes every tag on it: the one `latest` names is never touched.
        let latest = s
            .client
            .fetch_manifest_digest(&r, &s.auth)
            .await
            .map_err(|e| s.net("manifest latest", e))?;
        let mut removed = 0;
        for t in tags {
            let Some(n) = t.strip_prefix("gen-").and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            if keep.contains(&n) || n >= newest {
                continue;
            }
            let tr = s.tagged(&t);
            let digest = s
                .client
                .fetch_manifest_digest(&tr, &s.auth)
                .await
                .map_err(|e| s.net(&format!("manifest {t}"), e))?;
            if digest == latest {
                continue;
            }
            let url = format!(
                "{}://{}/v2/{}/manifests/{digest}",
                if s.plain { "http" } else { "https" },
                s.reference.resolve_registry(),
                s.reference.repository()
            );
            let mut req = http.delete(&url);
            req = match &s.auth {
                Auth::Anonymous => req,
                Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
                Auth::Bearer(t) => req.bearer_auth(t),
            };
            let resp = req.send().await.map_err(|e| s.net(&format!("delete {t}"), e))?;
            if !resp.status().is_success() {
                return Err(Error::refused(
                    subject(&s.name),
                    format!(
                        "deleting {t} answered {} (does the registry allow deletes? storage.delete.enabled)",
                        resp.status()
                    ),
                ));
            }
            log::info!("{}: removed tag {t} (out of the GC window)", s.name);
            removed += 1;
        }
        Ok(removed)
    })
}
