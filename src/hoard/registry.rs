//! `hoard push` / `hoard pull`: a generation as an OCI artifact in any OCI registry (the
//! distribution engine that Harbor, Quay, ECR and the CNCF registry serve and peer-to-peer
//! distributors accelerate), through the ORAS project's `oci-client`.
//!
//! An artifact of type `application/vnd.vmicache.hoard.v1`: its config blob is the
//! generation's record; its layers are every index and pack the generation names, each
//! annotated with its BLAKE3 id. Tags: `gen-N` for each generation and `latest`. A pull
//! downloads only the blobs whose ids it lacks, checks each (sha256 by the client, BLAKE3 and
//! the pack's tables by us) and installs the generation as a stream does: `HEAD` last.

use super::format::{hex, parse_hex};
use super::gens::{GenId, Generation};
use super::store::Hoard;
use super::stream::{adopt, install_index, PackSink, StreamReport, MAX_PACK_BYTES};
use crate::{Error, Result, Subject};
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
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

#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    Anonymous,
    Basic(String, String),
    Bearer(String),
}

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

fn subject(r: &str) -> Subject {
    Subject::Other(format!("registry {r}"))
}

/// An error with its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = x.source();
    }
    s
}

/// The kinds of I/O error that mean "the registry cannot be reached now" (what `hoard
/// sync` waits out); every other failure is an answer, and final.
pub fn unreachable(e: &Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e, Error::Io { path: Subject::Other(s), source, .. }
        if s.starts_with("registry ")
            && matches!(source.kind(), ConnectionRefused | ConnectionReset | ConnectionAborted
                | NotConnected | TimedOut | BrokenPipe | UnexpectedEof | HostUnreachable
                | NetworkUnreachable | NetworkDown))
}

/// A failure of the registry or the way to it, classified (see [`unreachable`]).
fn net_err(r: &str, what: &str, e: &(dyn std::error::Error + 'static)) -> Error {
    use oci_client::errors::OciDistributionError as Oci;
    use std::io::ErrorKind;
    fn of_reqwest(x: &reqwest::Error) -> ErrorKind {
        if x.is_timeout() {
            ErrorKind::TimedOut
        } else if x
            .status()
            .is_some_and(|s| [429, 502, 503, 504].contains(&s.as_u16()))
        {
            ErrorKind::ConnectionRefused
        } else if x.is_connect() || x.is_request() || x.is_body() || x.is_decode() {
            ErrorKind::ConnectionReset
        } else {
            ErrorKind::Other
        }
    }
    fn of_io(x: &std::io::Error) -> ErrorKind {
        // A download's stream wraps the HTTP client's errors in io::Error::other.
        match x.get_ref().and_then(|i| i.downcast_ref::<reqwest::Error>()) {
            Some(r) => of_reqwest(r),
            None => x.kind(),
        }
    }
    let kind = match e.downcast_ref::<Oci>() {
        Some(Oci::RequestError(x)) => of_reqwest(x),
        Some(Oci::IoError(x)) => of_io(x),
        // A proxy or registry that is restarting or overloaded: try again later.
        Some(Oci::ServerError { code, .. }) if [429, 502, 503, 504].contains(code) => {
            ErrorKind::ConnectionRefused
        }
        Some(Oci::RegistryError { envelope, .. })
            if envelope
                .errors
                .iter()
                .any(|x| x.code == oci_client::errors::OciErrorCode::Toomanyrequests) =>
        {
            ErrorKind::ConnectionRefused
        }
        Some(_) => ErrorKind::Other,
        None => e
            .downcast_ref::<std::io::Error>()
            .map(of_io)
            .or_else(|| e.downcast_ref::<reqwest::Error>().map(of_reqwest))
            .unwrap_or(ErrorKind::Other),
    };
    let denied = match e.downcast_ref::<Oci>() {
        Some(Oci::AuthenticationFailure(_) | Oci::UnauthorizedError { .. }) => true,
        Some(Oci::RequestError(x)) => x.status().is_some_and(|s| [401, 403].contains(&s.as_u16())),
        Some(Oci::ServerError { code, .. }) => [401, 403].contains(code),
        Some(Oci::RegistryError { envelope, .. }) => envelope.errors.iter().any(|x| {
            use oci_client::errors::OciErrorCode::{Denied, Unauthorized};
            matches!(x.code, Denied | Unauthorized)
        }),
        _ => false,
    };
    let mut text = format!("{what}: {}", chain(e));
    if denied {
        text.push_str(
            " (credentials: VMICACHE_REGISTRY_USER and VMICACHE_REGISTRY_PASSWORD, or VMICACHE_REGISTRY_TOKEN, or the configuration's registry: section)",
        );
    }
    if denied || matches!(kind, ErrorKind::Other | ErrorKind::InvalidData) {
        Error::refused(subject(r), text)
    } else {
        Error::io(subject(r), "registry", std::io::Error::new(kind, text))
    }
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
    auth: RegistryAuth,
    reference: Reference,
    name: String,
    /// Plain HTTP (a loopback registry, or `insecure`).
    plain: bool,
    remote_auth: Auth,
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
        let auth = match &remote.auth {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic(u, p) => RegistryAuth::Basic(u.clone(), p.clone()),
            Auth::Bearer(t) => RegistryAuth::Bearer(t.clone()),
        };
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
            remote_auth: remote.auth.clone(),
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
    let rec = fetch_small(s, r, &m.config, 64 << 20).await?;
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
        if hg.generation > g.generation && !force {
            return Err(Error::refused(
                h.dir(),
                format!(
                    "this hoard is at generation {}, newer than {tag}'s {} (--force to go back)",
                    hg.generation, g.generation
                ),
            ));
        }
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
            let b = fetch_small(&s, &r, d, super::format::MAX_INDEX_BYTES).await?;
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
    match h.head()? {
        Some((hid, _)) if hid == gid => return done(rep),
        Some((_, hg)) if hg.generation > g.generation && !force => {
            return Err(Error::refused(
                h.dir(),
                format!(
                    "this hoard moved to generation {} meanwhile, newer than {tag}'s {}",
                    hg.generation, g.generation
                ),
            ))
        }
        _ => {}
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
            req = match &s.remote_auth {
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
