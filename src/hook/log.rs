//! The hook's own log, `STATE/hook.log`.

use super::confine::{confine, open_append};
use crate::config::Config;
use std::io::Write;
use std::path::PathBuf;

/// `STATE/hook.log`: one line per action, for the operator (opened at the first line, so a
/// refusal leaves the state directory as it was).
pub(super) struct HookLog(Option<PathBuf>);

impl HookLog {
    pub(super) fn open(cfg: &Config) -> HookLog {
        let p = cfg.dirs.state.0.join("hook.log");
        HookLog(confine(&p, &cfg.dirs.state.0, "state").ok())
    }
    pub(super) fn line(&self, what: &str) {
        let Some(Ok(mut f)) = self.0.as_ref().map(|p| open_append(p, 0o640)) else {
            return;
        };
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let _ = writeln!(f, "{t} [{}] {what}", std::process::id());
    }
}
