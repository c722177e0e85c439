//! Small helpers for the command line: sizes in and out, one-line errors.

use humansize::{format_size, BINARY};

/// `println!` that never panics: a closed or full stdout (a log reader that went away) must
/// not kill the thread that prints, least of all the one that waits for SIGTERM.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `print!` that never panics (see [`outln!`]).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout().lock(), $($t)*);
    }};
}

/// `eprintln!` that never panics (see [`outln!`]).
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

/// Prints what the library logs (`log` facade) to stderr as `vmicache: <message>`, never
/// panicking on a closed stderr; warnings and errors, and with `-v` everything.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            errln!("vmicache: {}", r.args());
        }
    }
    fn flush(&self) {}
}

/// Install the stderr logger (once; `verbose` shows debug messages too).
pub fn init_log(verbose: bool) {
    static LOG: StderrLog = StderrLog;
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(if verbose {
            log::LevelFilter::Debug
        } else {
            log::LevelFilter::Warn
        });
    }
}

/// Sizes on the command line parse as in the configuration file.
pub use vmicache::config::parse_size;

/// "1.5 GiB".
pub fn human(bytes: u64) -> String {
    format_size(bytes, BINARY)
}

/// An error chain on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain() {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1.3").is_err());
        assert!(parse_size("12Q").is_err());
    }
}
