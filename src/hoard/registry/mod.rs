//! `hoard push` / `hoard pull`: a generation as an OCI artifact in any OCI registry (the
//! distribution engine that Harbor, Quay, ECR and the CNCF registry serve and peer-to-peer
//! distributors accelerate), through the ORAS project's `oci-client`.
//!
//! An artifact of type `application/vnd.vmicache.hoard.v1`: its config blob is the
//! generation's record; its layers are every index and pack the generation names, each
//! annotated with its BLAKE3 id. Tags: `gen-N` for each generation and `latest`. A pull
//! downloads only the blobs whose ids it lacks, checks each (sha256 by the client, BLAKE3 and
//! the pack's tables by us) and installs the generation as a stream does: `HEAD` last.

mod errors;
mod pull;

pub use errors::unreachable;
pub use pull::{prune_tags, pull};

use super::format::hex;
use super::store::Hoard;
use crate::{Error, Result};
use errors::{net_err, subject};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;

pub const ARTIFACT_TYPE: &str = "application/vnd.vmicache.hoard.v1";
pub const GEN_TYPE: &str = "application/vnd.vmicache.hoard.generation.v1+yaml";
pub const INDEX_TYPE: &str = "application/vnd.vmicache.hoard.index.v1";
pub const PACK_TYPE: &str = "application/vnd.vmicache.hoard.pack.v1";
/// Annotation of each blob: its BLAKE3 id (the file's name in the hoard).
pub const ID_ANNOTATION: &str = "dev.vmicache.hoard.id";
const GEN_ANNOTATION: &str = "dev.vmicache.hoard.generation";

/// How to reach a registry.
#[derive(Debug, Clone)]
pub struct Remote {
    /// `HOST[:PORT]/REPOSITORY[:TAG]`.
    pub reference: String,
    pub auth: Auth,
    /// Plain HTTP to a registry that is not on a loopback address.
    pub insecure: bool,
}

/// Credentials: anonymous, basic (user, password) or a bearer token (its `Debug` hides
/// secrets).
pub use oci_client::secrets::RegistryAuth as Auth;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PushReport {
    pub generation: u64,
    pub id: String,
    pub reference: String,
    pub tags: Vec<String>,
    /// Blobs uploaded, and those the registry had already.
    pub uploaded: usize,
    pub uploaded_bytes: u64,
    pub present: usize,
    pub present_bytes: u64,
    pub manifest_digest: String,
    pub seconds: f64,
}

fn is_loopback(host: &str) -> bool {
    let h = host
        .rsplit_once(':')
        .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
        .map_or(host, |(h, _)| h);
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
}

/// A registry session: the client, its runtime and the parsed reference.
struct Session {
    rt: tokio::runtime::Runtime,
    client: Client,
    auth: Auth,
    reference: Reference,
    name: String,
    /// Plain HTTP (a loopback registry, or `insecure`).
    plain: bool,
}

impl Session {
    fn new(remote: &Remote) -> Result<Session> {
        let name = remote.reference.clone();
        let reference: Reference = name.parse().map_err(|e| {
            Error::refused(
                subject(&name),
                format!("not a registry reference (HOST[:PORT]/REPOSITORY[:TAG]): {e}"),
            )
        })?;
        if !name.contains('/') {
            return Err(Error::refused(
                subject(&name),
                "name the registry: HOST[:PORT]/REPOSITORY",
            ));
        }
        let host = reference.resolve_registry().to_string();
        let plain = is_loopback(&host) || remote.insecure;
        let protocol = if plain {
            ClientProtocol::HttpsExcept(vec![host.clone()])
        } else {
            ClientProtocol::Https
        };
        // One process-wide crypto provider for TLS (ring); installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(ClientConfig {
            protocol,
            use_monolithic_push: true,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        });
        let auth = remote.auth.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io(subject(&name), "start the I/O runtime", e))?;
        Ok(Session {
            rt,
            client,
            auth,
            reference,
            name,
            plain,
        })
    }

    fn tagged(&self, tag: &str) -> Reference {
        Reference::with_tag(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            tag.to_string(),
        )
    }

    /// What the registry answered that we refuse.
    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::refused(subject(&self.name), format!("{what}: {e}"))
    }

    /// A failure on the way to the registry, or its refusal.
    fn net(&self, what: &str, e: impl std::error::Error + 'static) -> Error {
        net_err(&self.name, what, &e)
    }
}

/// sha256 of a file, streamed: ("sha256:<hex>", length).
fn sha256_file(path: &std::path::Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((format!("sha256:{}", hex(&h.finalize())), len))
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

fn descriptor(
    media: &str,
    digest: String,
    size: u64,
    id: &[u8; 32],
    title: String,
) -> OciDescriptor {
    OciDescriptor {
        media_type: media.to_string(),
        digest,
        size: size as i64,
        annotations: Some(BTreeMap::from([
            (ID_ANNOTATION.to_string(), hex(id)),
            ("org.opencontainers.image.title".to_string(), title),
        ])),
        ..Default::default()
    }
}

/// Publish this hoard's newest generation at `remote` (tags `gen-N` and `latest`).
pub fn push(h: &Hoard, remote: &Remote) -> Result<PushReport> {
    let t0 = std::time::Instant::now();
    let _lock = h.read_lock()?;
    let (gid, g) = h
        .head()?
        .ok_or_else(|| Error::refused(h.dir(), "no generation to push (nothing hoarded yet)"))?;
    let s = Session::new(remote)?;
    let mut rep = PushReport {
        generation: g.generation,
        id: hex(&gid),
        reference: remote.reference.clone(),
        ..Default::default()
    };
    let need = super::stream::needs(h, &g, None)?;
    let rec = h.gen_bytes(&gid)?;
    let r = s.tagged("latest");
    s.rt.block_on(async {
        s.client
            .store_auth_if_needed(r.resolve_registry(), &s.auth)
            .await;
        let upload = |media: &'static str, path: std::path::PathBuf, id: [u8; 32]| {
            let title = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (media, path, id, title)
        };
        let mut files: Vec<_> = need
            .indexes
            .iter()
            .map(|id| upload(INDEX_TYPE, h.stored_index_path(id), *id))
            .collect();
        files.extend(
            need.packs
                .iter()
                .map(|id| upload(PACK_TYPE, h.pack_path(id), *id)),
        );
        let mut layers = Vec::new();
        for (media, path, id, title) in files {
            let (digest, size) = sha256_file(&path)?;
            let have = s
                .client
                .blob_exists(&r, &digest)
                .await
                .map_err(|e| s.net("blob exists?", e))?;
            if have {
                rep.present += 1;
                rep.present_bytes += size;
            } else {
                let f = tokio::fs::File::open(&path)
                    .await
                    .map_err(|e| Error::io(&path, "open", e))?;
                let body = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
                    .map(|x| x.map_err(oci_client::errors::OciDistributionError::from));
                s.client
                    .push_blob_stream(&r, body, &digest, Some(size))
                    .await
                    .map_err(|e| s.net(&format!("upload {title}"), e))?;
                rep.uploaded += 1;
                rep.uploaded_bytes += size;
            }
            layers.push(descriptor(media, digest, size, &id, title));
        }
        let cdigest = sha256(&rec);
        if !s
            .client
            .blob_exists(&r, &cdigest)
            .await
            .map_err(|e| s.net("blob exists?", e))?
        {
            s.client
                .push_blob(&r, rec.clone(), &cdigest)
                .await
                .map_err(|e| s.net("upload the generation record", e))?;
        }
        let m = OciImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            artifact_type: Some(ARTIFACT_TYPE.to_string()),
            config: descriptor(
                GEN_TYPE,
                cdigest,
                rec.len() as u64,
                &gid,
                format!("{}.gen", hex(&gid)),
            ),
            layers,
            annotations: Some(BTreeMap::from([
                (GEN_ANNOTATION.to_string(), g.generation.to_string()),
                (
                    "org.opencontainers.image.created".to_string(),
                    super::gens::rfc3339(g.time),
                ),
            ])),
            ..Default::default()
        };
        let body = serde_json::to_vec(&m).map_err(|e| s.err("manifest", e))?;
        rep.manifest_digest = sha256(&body);
        for tag in [format!("gen-{}", g.generation), "latest".to_string()] {
            s.client
                .push_manifest_raw(
                    &s.tagged(&tag),
                    body.clone(),
                    OCI_IMAGE_MEDIA_TYPE.parse().expect("a header value"),
                )
                .await
                .map_err(|e| s.net(&format!("push the manifest as {tag}"), e))?;
            rep.tags.push(tag);
        }
        Ok::<(), Error>(())
    })?;
    rep.seconds = t0.elapsed().as_secs_f64();
    log::info!(
        "{}: pushed generation {} to {} ({} blobs uploaded, {} there already)",
        h.dir().display(),
        g.generation,
        remote.reference,
        rep.uploaded,
        rep.present
    );
    Ok(rep)
}
