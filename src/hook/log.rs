//! The hook's own log, `STATE/hook.log`.

use crate::{Error, Result};
use std::borrow::Cow;
use std::fs::{File, OpenOptions as FsOpen};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `s` with every control character (newline, carriage return, escape, ...) and every
/// backslash written as a Rust-style escape (`\n`, `\u{1b}`, `\\`): a logged string can never
/// start a line of its own or drive a terminal, and the escaping is unambiguous.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `STATE/hook.log`: one line per action, for the operator (opened at the first line, so a
/// refusal leaves the state directory as it was).
///
/// Logging never fails the hook: a log that cannot be opened (removed directory, a FIFO
/// nobody reads) or written (full file system) is skipped, never waited for.
pub(super) struct HookLog {
    path: Option<PathBuf>,
}

impl HookLog {
    /// The log at `path` (already confined to the state directory), or none.
    pub(super) fn open(path: Option<PathBuf>) -> HookLog {
        HookLog { path }
    }

    /// Append `{time} [{pid}] {what}`, `what` escaped by [`escape`].
    pub(super) fn line(&self, what: &str) {
        let t = crate::now();
        let text = format!("{t} [{}] {}\n", std::process::id(), escape(what));
        if let Some(Ok(mut f)) = self.path.as_ref().map(|p| open_append(p, 0o640)) {
            // One write of the whole line, so concurrent hooks never interleave within a
            // line; an error (full file system) is ignored.
            let _ = f.write_all(text.as_bytes());
        }
    }
}

/// Open for appending, creating with `mode`, never through a symlink and never waiting (a
/// FIFO nobody reads fails at once instead of blocking the hook; the descriptor is made
/// blocking again once open).
pub(super) fn open_append(p: &Path, mode: u32) -> Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let f = FsOpen::new()
        .append(true)
        .create(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| Error::io(p, "open", e))?;
    fcntl(&f, FcntlArg::F_SETFL(OFlag::O_APPEND)).map_err(|e| Error::io(p, "fcntl", e.into()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("/srv/a b.qcow2"), "/srv/a b.qcow2");
        assert_eq!(
            escape("x\n1700000000 [1] forged\r\u{1b}[2J\t\\n\u{7f}\u{85}"),
            "x\\n1700000000 [1] forged\\r\\u{1b}[2J\\t\\\\n\\u{7f}\\u{85}"
        );
        assert!(!escape("a\nb\rc\u{0}").contains(['\n', '\r', '\0']));
        assert_eq!(escape("héllo"), "héllo");
    }
}
