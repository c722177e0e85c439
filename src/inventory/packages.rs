//! Installed packages, from the guest's dpkg database (`/var/lib/dpkg/status`). An rpm
//! database is noticed and said to be unread: reading it needs SQLite or Berkeley DB.

use super::Package;

/// A status file larger than this is not read.
pub const MAX_STATUS: u64 = 64 << 20;
pub const STATUS: &str = "/var/lib/dpkg/status";

/// The packages of a dpkg status file that are on the system: installed, or unpacked and
/// not (fully) configured yet; in file order.
pub fn parse(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let (mut name, mut version, mut arch, mut status) = ("", "", "", "");
        for line in stanza.lines() {
            if line.starts_with([' ', '\t']) {
                continue; // continuation of a multi-line field
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k {
                "Package" => name = v,
                "Version" => version = v,
                "Architecture" => arch = v,
                "Status" => status = v,
                _ => {}
            }
        }
        // Installed, or between unpacked and configured; not removed (config-files) nor
        // purged (not-installed).
        let state = status.split_whitespace().nth(2).unwrap_or("");
        let present = matches!(
            state,
            "installed"
                | "unpacked"
                | "half-configured"
                | "half-installed"
                | "triggers-awaited"
                | "triggers-pending"
        );
        if name.is_empty() || !present {
            continue;
        }
        out.push(Package {
            name: name.to_string(),
            version: version.to_string(),
            arch: arch.to_string(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_installed_packages_only() {
        let text =
            "Package: a\nStatus: install ok installed\nVersion: 1.0\nDescription: x\n more\n\n\
                    Package: b\nStatus: purge ok not-installed\n\n\
                    Package: r\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                    Package: c\nStatus: install ok unpacked\nArchitecture: amd64\nVersion: 2:3-4\n";
        let p = super::parse(text);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].name.as_str(), p[0].version.as_str()), ("a", "1.0"));
        assert_eq!((p[1].name.as_str(), p[1].arch.as_str()), ("c", "amd64"));
    }
}
