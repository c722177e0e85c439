//! The domain XML: which disks vmicache manages and where QEMU reads them from.

use crate::config::DiskMode;
use crate::{Error, Result, Subject};
use std::path::PathBuf;

/// The XML namespace of the `<metadata>` element.
pub const NS: &str = "https://vmicache.dev/ns/1";

/// A managed disk as the domain XML declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedDisk {
    /// Target dev (`vda`).
    pub dev: String,
    /// `base=`: an image name of the configuration or an absolute path.
    pub base: String,
    /// `mode=` if given.
    pub mode: Option<DiskMode>,
    /// `instance=` (NBD mode only; default `INSTANCES/GUEST.DEV.qcow2`).
    pub instance: Option<PathBuf>,
    /// The `<disk>`'s source.
    pub source: Source,
}

/// Where QEMU reads a managed disk from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `<disk type='file'>`: the instance overlay itself.
    File { path: PathBuf },
    /// `<disk type='network'>` NBD over a Unix socket.
    Nbd { socket: PathBuf, export: String },
}

/// What the hook needs from a domain XML.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub disks: Vec<ManagedDisk>,
}

/// The first child element `name` of `n` in no namespace.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| {
        c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none()
    })
}

pub(super) fn xml_err(what: impl Into<String>) -> Error {
    Error::refused(Subject::DomainXml, what)
}

/// Parse a domain XML (as `virsh dumpxml` prints it) and find the managed disks.
pub fn parse_domain(xml: &str) -> Result<Domain> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| xml_err(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(xml_err(format!(
            "root element is <{}>, expected <domain>",
            root.tag_name().name()
        )));
    }
    let name = child(root, "name")
        .and_then(|n| n.text())
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut decls = Vec::new();
    if let Some(meta) = child(root, "metadata") {
        for group in meta
            .children()
            .filter(|c| c.is_element() && c.tag_name().namespace() == Some(NS))
        {
            if group.tag_name().name() != "disks" {
                return Err(xml_err(format!(
                    "unknown element <{}> in the vmicache namespace (expected <disks>)",
                    group.tag_name().name()
                )));
            }
            for d in group.children().filter(|c| c.is_element()) {
                if d.tag_name().namespace() != Some(NS) || d.tag_name().name() != "disk" {
                    return Err(xml_err(format!(
                        "unexpected <{}> in <vmicache:disks> (expected <vmicache:disk>)",
                        d.tag_name().name()
                    )));
                }
                for a in d.attributes() {
                    if !["dev", "base", "mode", "instance"].contains(&a.name()) {
                        return Err(xml_err(format!(
                            "<vmicache:disk>: unknown attribute '{}' (dev, base, mode, instance)",
                            a.name()
                        )));
                    }
                }
                let dev = d
                    .attribute("dev")
                    .ok_or_else(|| xml_err("<vmicache:disk> without dev="))?;
                let base = d
                    .attribute("base")
                    .ok_or_else(|| xml_err(format!("<vmicache:disk dev='{dev}'> without base=")))?;
                let mode = match d.attribute("mode") {
                    None => None,
                    Some("nbd") => Some(DiskMode::Nbd),
                    Some("native") => Some(DiskMode::Native),
                    Some(m) => {
                        return Err(xml_err(format!(
                            "<vmicache:disk dev='{dev}'>: mode '{m}' (nbd or native)"
                        )))
                    }
                };
                if decls.iter().any(|(d2, ..): &(String, _, _, _)| d2 == dev) {
                    return Err(xml_err(format!(
                        "disk '{dev}' declared twice in <vmicache:disks>"
                    )));
                }
                decls.push((
                    dev.to_string(),
                    base.to_string(),
                    mode,
                    d.attribute("instance").map(PathBuf::from),
                ));
            }
        }
    }
    let mut disks = Vec::new();
    if decls.is_empty() {
        return Ok(Domain { name, disks });
    }
    let devices = child(root, "devices").ok_or_else(|| xml_err("no <devices>"))?;
    for (dev, base, mode, instance) in decls {
        let disk = devices
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "disk")
            .find(|d| child(*d, "target").and_then(|t| t.attribute("dev")) == Some(dev.as_str()))
            .ok_or_else(|| {
                xml_err(format!(
                    "<vmicache:disk dev='{dev}'>: no <disk> with <target dev='{dev}'/>"
                ))
            })?;
        let src =
            child(disk, "source").ok_or_else(|| xml_err(format!("disk '{dev}': no <source>")))?;
        let driver = child(disk, "driver").and_then(|d| d.attribute("type"));
        let source = match disk.attribute("type") {
            Some("file") => {
                if let Some(t) = driver.filter(|t| *t != "qcow2") {
                    return Err(xml_err(format!(
                        "disk '{dev}': <driver type='{t}'/>: a vmicache instance is qcow2"
                    )));
                }
                let f = src
                    .attribute("file")
                    .ok_or_else(|| xml_err(format!("disk '{dev}': <source> without file=")))?;
                Source::File {
                    path: PathBuf::from(f),
                }
            }
            Some("network") => {
                if src.attribute("protocol") != Some("nbd") {
                    return Err(xml_err(format!(
                        "disk '{dev}': network source protocol must be 'nbd'"
                    )));
                }
                if let Some(t) = driver.filter(|t| *t != "raw") {
                    return Err(xml_err(format!(
                        "disk '{dev}': <driver type='{t}'/>: an NBD export is raw"
                    )));
                }
                let host = child(src, "host").ok_or_else(|| {
                    xml_err(format!(
                        "disk '{dev}': NBD source without <host transport='unix'>"
                    ))
                })?;
                if host.attribute("transport") != Some("unix") {
                    return Err(xml_err(format!(
                        "disk '{dev}': NBD source must use <host transport='unix' socket='...'/>"
                    )));
                }
                let socket = host.attribute("socket").ok_or_else(|| {
                    xml_err(format!(
                        "disk '{dev}': <host transport='unix'> without socket="
                    ))
                })?;
                Source::Nbd {
                    socket: PathBuf::from(socket),
                    export: src.attribute("name").unwrap_or_default().to_string(),
                }
            }
            t => {
                return Err(xml_err(format!(
                    "disk '{dev}': type '{}' cannot be managed (file or network)",
                    t.unwrap_or("?")
                )))
            }
        };
        disks.push(ManagedDisk {
            dev,
            base,
            mode,
            instance,
            source,
        });
    }
    Ok(Domain { name, disks })
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='kvm' id='3' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>0b8c6a36-3b1b-4a0e-9a43-2b6b2d7e3f10</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <vmicache:disks xmlns:vmicache="https://vmicache.dev/ns/1">
      <vmicache:disk dev="vda" base="debian" mode="nbd"/>
      <vmicache:disk dev="vdb" base="/srv/bases/data.raw"/>
    </vmicache:disks>
  </metadata>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='web1'>
        <host transport='unix' socket='/run/vmicache/web1.sock'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/vmicache/instances/web1-data.qcow2' index='1'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
    </disk>
  </devices>
</domain>"#;

    #[test]
    fn parses_managed_disks() {
        let d = parse_domain(XML).unwrap();
        assert_eq!(d.name, "web1");
        assert_eq!(d.disks.len(), 2);
        assert_eq!(d.disks[0].mode, Some(DiskMode::Nbd));
        assert_eq!(
            d.disks[0].source,
            Source::Nbd {
                socket: "/run/vmicache/web1.sock".into(),
                export: "web1".into()
            }
        );
        assert_eq!(
            d.disks[1].source,
            Source::File {
                path: "/var/lib/vmicache/instances/web1-data.qcow2".into()
            }
        );
    }

    #[test]
    fn example_domains_parse() {
        let n = parse_domain(include_str!("../../tools/libvirt/domain-nbd.xml")).unwrap();
        assert_eq!(n.disks[0].base, "debian-12");
        assert!(matches!(n.disks[0].source, Source::Nbd { .. }));
        let f = parse_domain(include_str!("../../tools/libvirt/domain-native.xml")).unwrap();
        assert!(matches!(f.disks[0].source, Source::File { .. }));
    }

    #[test]
    fn unmanaged_and_bad() {
        let plain = "<domain type='kvm'><name>x</name><devices/></domain>";
        assert!(parse_domain(plain).unwrap().disks.is_empty());
        assert!(parse_domain("<domain>").is_err());
        let e = parse_domain(&XML.replace("dev='vdb' bus", "dev='vdc' bus"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no <disk> with <target dev='vdb'/>"), "{e}");
        let e = parse_domain(&XML.replace("type='qcow2'", "type='raw'"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("qcow2"), "{e}");
        // No DTDs, hence no entity expansion.
        assert!(parse_domain("<!DOCTYPE d [<!ENTITY a 'b'>]><domain/>").is_err());
    }
}
