//! The plan: every path of every managed disk, validated before anything changes.

use super::confine::confine;
use super::owner::{self, Owner};
use super::xml::{xml_err, Domain, Source};
use crate::config::{safe_name, Config, DiskMode, ResolvedImage};
use crate::{Error, Result, Subject};
use std::path::PathBuf;

/// One managed disk with every path the hook touches for it.
#[derive(Debug, Clone)]
pub struct DiskPlan {
    /// The guest the disk is planned for.
    pub guest: String,
    pub dev: String,
    pub mode: DiskMode,
    /// The base's resolution (an error is reported where the base is needed: prepare).
    pub image: std::result::Result<ResolvedImage, String>,
    pub cache: Option<PathBuf>,
    pub lock: Option<PathBuf>,
    pub trace: Option<PathBuf>,
    pub instance: PathBuf,
    /// Whose the instance is (`Err`: the refusal, reported by every operation).
    pub owner: std::result::Result<Owner, String>,
    pub socket: Option<PathBuf>,
    pub export: String,
    pub pid: PathBuf,
    pub log: PathBuf,
}

impl DiskPlan {
    pub(super) fn image(&self) -> Result<&ResolvedImage> {
        self.image
            .as_ref()
            .map_err(|e| Error::refused(Subject::Other(format!("disk {}", self.dev)), e.clone()))
    }
    /// The instance's ownership, or the refusal naming it.
    pub(super) fn owner(&self) -> Result<Owner> {
        self.owner
            .clone()
            .map_err(|e| Error::refused(&self.instance, e))
    }
    pub(super) fn ephemeral(&self) -> bool {
        // A base that no longer resolves keeps its instances (never delete on doubt).
        self.image
            .as_ref()
            .map(|i| i.settings.ephemeral)
            .unwrap_or(false)
    }
}

/// Validate a domain's managed disks against the configuration and name every path.
pub fn plan(cfg: &Config, guest: &str, dom: &Domain) -> Result<Vec<DiskPlan>> {
    if !safe_name(guest) {
        return Err(Error::refused(
            Subject::Other(format!("domain '{guest}'")),
            "refused: a domain with vmicache disks needs a name of letters, digits and ._-+",
        ));
    }
    let d = &cfg.dirs;
    let mut out = Vec::new();
    for m in &dom.disks {
        if !safe_name(&m.dev) {
            return Err(xml_err(format!("refused: target dev '{}'", m.dev)));
        }
        let image = cfg.resolve_image(&m.base).map_err(|e| e.to_string());
        let source_mode = match m.source {
            Source::File { .. } => DiskMode::Native,
            Source::Nbd { .. } => DiskMode::Nbd,
        };
        let wanted = m
            .mode
            .or_else(|| image.as_ref().ok().and_then(|i| i.settings.mode));
        if let Some(w) = wanted {
            if w != source_mode {
                return Err(xml_err(format!(
                    "disk '{}': mode {w} is asked for, but its <disk> source is {}",
                    m.dev,
                    if source_mode == DiskMode::Nbd {
                        "an NBD socket (mode nbd)"
                    } else {
                        "a file (mode native)"
                    }
                )));
            }
        }
        let stem = format!("{guest}.{}", m.dev);
        let (instance, socket, export) = match &m.source {
            Source::File { path } => {
                if m.instance.is_some() {
                    return Err(xml_err(format!(
                        "disk '{}': instance= is for NBD disks; a file disk's <source file> is the instance",
                        m.dev
                    )));
                }
                (
                    confine(path, &d.instances.0, "instances")?,
                    None,
                    String::new(),
                )
            }
            Source::Nbd { socket, export } => {
                let inst = m
                    .instance
                    .clone()
                    .unwrap_or_else(|| d.instances.0.join(format!("{stem}.qcow2")));
                (
                    confine(&inst, &d.instances.0, "instances")?,
                    Some(confine(socket, &d.sockets.0, "sockets")?),
                    export.clone(),
                )
            }
        };
        if instance
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
        {
            return Err(Error::refused(
                &instance,
                "refused: an instance name that starts with '.' (the hook's owner records are named so)",
            ));
        }
        // Instances made before owner records: adopted by the guest whose default one it is.
        let default = confine(
            &d.instances.0.join(format!("{stem}.qcow2")),
            &d.instances.0,
            "instances",
        )
        .unwrap_or_default();
        let owner = owner::check(&instance, guest, &default);
        let (cache, lock, trace) = match &image {
            Ok(i) => (
                Some(confine(
                    &d.caches.0.join(format!("{}.qcow2", i.name)),
                    &d.caches.0,
                    "caches",
                )?),
                Some(confine(
                    &d.caches.0.join(format!(".{}.lock", i.name)),
                    &d.caches.0,
                    "caches",
                )?),
                Some(confine(
                    &d.traces.0.join(format!("{}.trace", i.name)),
                    &d.traces.0,
                    "traces",
                )?),
            ),
            Err(_) => (None, None, None),
        };
        if out.iter().any(|p: &DiskPlan| p.instance == instance) {
            return Err(xml_err(format!(
                "refused: two disks use the instance {}",
                instance.display()
            )));
        }
        out.push(DiskPlan {
            guest: guest.to_string(),
            dev: m.dev.clone(),
            mode: source_mode,
            image,
            cache,
            lock,
            trace,
            instance,
            owner,
            socket,
            export,
            pid: confine(&d.state.0.join(format!("{stem}.pid")), &d.state.0, "state")?,
            log: confine(&d.state.0.join(format!("{stem}.log")), &d.state.0, "state")?,
        });
    }
    Ok(out)
}
