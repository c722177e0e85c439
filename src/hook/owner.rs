//! Which guest an instance belongs to. Beside each instance `DIR/NAME` the hook keeps an
//! owner record `DIR/.NAME.owner` holding the name of the guest it was made for (created
//! with `O_EXCL`/`O_NOFOLLOW`, mode 0600, before the instance itself). Another guest's XML
//! that names the instance (as `instance=` or as a native `<source file>`, ephemeral or not)
//! is refused, so no guest can replace, remove or serve another's disk. The record stays
//! when an ephemeral instance is removed: the name stays its guest's.
//!
//! Instances made before records existed have none: the guest whose default instance
//! `INSTANCES/GUEST.DEV.qcow2` it is adopts it at its next `prepare`; any other is refused
//! until the operator writes the guest's name into the record.

use crate::config::safe_name;
use crate::{Error, Result};
use std::fs::OpenOptions as FsOpen;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Whose an instance is, as far as this guest is concerned (refusals are errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Its record names this guest.
    Mine,
    /// Neither record nor instance: this guest may make both.
    Free,
    /// No record, but the instance is this guest's default one: adopted at `prepare`.
    Adoptable,
}

/// `DIR/.NAME.owner` for the instance `DIR/NAME`.
pub(super) fn record_path(instance: &Path) -> PathBuf {
    let name = instance.file_name().unwrap_or_default().to_string_lossy();
    instance.with_file_name(format!(".{name}.owner"))
}

/// The guest a record names, `None` if there is no record.
fn read_record(rec: &Path) -> Result<Option<String>> {
    let f = match FsOpen::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(rec)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(rec, "open owner record", e)),
    };
    let m = f
        .metadata()
        .map_err(|e| Error::io(rec, "stat owner record", e))?;
    if !m.is_file() {
        return Err(Error::refused(
            rec,
            "refused: owner record is not a regular file",
        ));
    }
    let mut s = String::new();
    f.take(256)
        .read_to_string(&mut s)
        .map_err(|e| Error::io(rec, "read owner record", e))?;
    let who = s.trim_end_matches('\n');
    if !safe_name(who) {
        return Err(Error::refused(
            rec,
            "refused: owner record does not hold a guest name",
        ));
    }
    Ok(Some(who.to_string()))
}

/// Whose `instance` is for `guest`, whose default instance path is `default`; `Err(what)`
/// (the refusal, without the path) if it is not this guest's to use.
pub(super) fn check(
    instance: &Path,
    guest: &str,
    default: &Path,
) -> std::result::Result<Owner, String> {
    let rec = record_path(instance);
    match read_record(&rec) {
        Err(e) => Err(e.to_string()),
        Ok(Some(who)) if who == guest => Ok(Owner::Mine),
        Ok(Some(who)) => Err(format!(
            "refused: belongs to guest '{who}' (owner record {})",
            rec.display()
        )),
        Ok(None) if std::fs::symlink_metadata(instance).is_err() => Ok(Owner::Free),
        Ok(None) if instance == default => Ok(Owner::Adoptable),
        Ok(None) => Err(format!(
            "refused: has no owner record and is not {}, the default instance of guest '{guest}'; \
             if it is this guest's, write '{guest}' into {}",
            default.display(),
            rec.display()
        )),
    }
}

/// Record `guest` as the owner of `instance`. Returns the record's path if this call created
/// it; `Ok(None)` if it already names `guest`; refused if another guest got there first.
pub(super) fn claim(instance: &Path, guest: &str) -> Result<Option<PathBuf>> {
    let rec = record_path(instance);
    match FsOpen::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&rec)
    {
        Ok(mut f) => {
            if let Err(e) = f
                .write_all(format!("{guest}\n").as_bytes())
                .and_then(|()| f.sync_all())
            {
                // An empty record would refuse this guest for good: leave none.
                let _ = std::fs::remove_file(&rec);
                return Err(Error::io(&rec, "write owner record", e));
            }
            Ok(Some(rec))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_record(&rec)? {
            Some(who) if who == guest => Ok(None),
            who => Err(Error::refused(
                instance,
                format!(
                    "refused: belongs to guest '{}' (owner record {})",
                    who.unwrap_or_default(),
                    rec.display()
                ),
            )),
        },
        Err(e) => Err(Error::io(&rec, "create owner record", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decide() {
        let d = tempfile::tempdir().unwrap();
        let inst = d.path().join("a.vda.qcow2");
        let other = d.path().join("x.qcow2");
        assert_eq!(record_path(&inst), d.path().join(".a.vda.qcow2.owner"));
        assert_eq!(check(&inst, "a", &inst), Ok(Owner::Free));
        std::fs::write(&inst, b"").unwrap();
        std::fs::write(&other, b"").unwrap();
        assert_eq!(check(&inst, "a", &inst), Ok(Owner::Adoptable));
        assert!(check(&inst, "b", &other)
            .unwrap_err()
            .contains("has no owner record"));
        assert_eq!(claim(&inst, "a").unwrap(), Some(record_path(&inst)));
        assert_eq!(claim(&inst, "a").unwrap(), None);
        assert_eq!(check(&inst, "a", &inst), Ok(Owner::Mine));
        let e = check(&inst, "b", &other).unwrap_err();
        assert!(e.contains("belongs to guest 'a'"), "{e}");
        assert!(claim(&inst, "b")
            .unwrap_err()
            .to_string()
            .contains("belongs to guest 'a'"));
        std::fs::write(record_path(&other), b"a\nb\n").unwrap();
        assert!(check(&other, "a", &inst)
            .unwrap_err()
            .contains("does not hold a guest name"));
    }
}
