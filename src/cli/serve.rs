//! `vmicache serve` and `vmicache warm --boot`.

use super::exit;
use super::util::human;
use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmicache::chain::build::make_instance;
use vmicache::chain::serve::{self, ChainExport, ServeSummary};
use vmicache::chain::warm::seal;
use vmicache::nbd::{Export, Limits, Server};

/// The NBD server's limits on the command line (`vmicache serve`); unset ones keep the
/// library's defaults ([`Limits::default`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Open connections at most (any phase); more are closed at once. Default 16.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Connections in transmission per export at most; more are refused. Default 8.
    #[arg(long, value_name = "N")]
    max_connections_per_export: Option<usize>,
    /// Seconds a client may take from connecting to choosing an export. Default 10.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    handshake_timeout: Option<Duration>,
    /// Bytes of replies one connection may hold while its client does not read them; then
    /// its requests are no longer read. Default 32M.
    #[arg(long, value_name = "SIZE", value_parser = parse_usize_size)]
    max_queued_reply_bytes: Option<usize>,
    /// Seconds requests being served may take to finish once stopped. Default 1.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    shutdown_grace: Option<Duration>,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_export: self
                .max_connections_per_export
                .unwrap_or(d.max_connections_per_export),
            handshake_timeout: self.handshake_timeout.unwrap_or(d.handshake_timeout),
            max_queued_reply_bytes: self
                .max_queued_reply_bytes
                .unwrap_or(d.max_queued_reply_bytes),
            shutdown_grace: self.shutdown_grace.unwrap_or(d.shutdown_grace),
        }
    }
}

/// Seconds, fractions allowed ("2", "0.5").
fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=86400.0 * 365.0).contains(&x) => {
            Ok(Duration::from_secs_f64(x))
        }
        _ => Err(format!("'{s}' is not a number of seconds")),
    }
}

fn parse_usize_size(s: &str) -> std::result::Result<usize, String> {
    let n = super::util::parse_size(s)?;
    usize::try_from(n).map_err(|_| format!("'{s}' is too large"))
}

fn export_names(instances: &[PathBuf], name: Option<&str>) -> Result<Vec<(String, PathBuf)>> {
    if name.is_some() && instances.len() > 1 {
        bail!(
            "--export names a single instance; with several, each is exported under its file stem"
        );
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for p in instances {
        let n = match name {
            Some(n) => n.to_string(),
            None => p
                .file_stem()
                .and_then(|s| s.to_str())
                .context("instance path has no usable file name")?
                .to_string(),
        };
        if out.iter().any(|(m, _)| *m == n) {
            bail!("two instances would be exported as '{n}'");
        }
        out.push((n, p.clone()));
    }
    Ok(out)
}

fn summary_line(s: &ServeSummary) -> String {
    format!(
        "{} read requests reached the cache: {} hits, {} misses; read {} from the base; stored {} data and {} zero clusters",
        s.requests,
        s.hits,
        s.misses,
        human(s.base_bytes),
        s.data_clusters,
        s.zero_clusters
    )
}

/// Open, bind, and return the server plus what it serves.
fn start(
    instances: &[(String, PathBuf)],
    socket: &Path,
    record: bool,
    pass_through_if_busy: bool,
    limits: Limits,
) -> Result<(Server, serve::Served)> {
    let served = serve::open_with(instances, record, pass_through_if_busy)?;
    let exports: Vec<(String, Arc<dyn Export>)> = served
        .exports
        .iter()
        .map(|(n, img)| {
            let e: Arc<dyn Export> = Arc::new(ChainExport { image: img.clone() });
            (n.clone(), e)
        })
        .collect();
    let server = Server::bind_with(socket, exports, limits)?;
    Ok((server, served))
}

pub fn run_serve(
    instances: &[PathBuf],
    socket: &Path,
    record: Option<&Path>,
    export: Option<&str>,
    pass_through_if_busy: bool,
    limits: Limits,
    quiet: bool,
) -> Result<i32> {
    // Signals go to one waiting thread; block them before any other thread starts.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()?;
    let names = export_names(instances, export)?;
    let (server, served) = start(
        &names,
        socket,
        record.is_some(),
        pass_through_if_busy,
        limits,
    )?;
    if !quiet {
        errln!(
            "vmicache: serving {} on {} over cache {} ({})",
            names
                .iter()
                .map(|(n, p)| format!("'{n}' ({})", p.display()))
                .collect::<Vec<_>>()
                .join(", "),
            socket.display(),
            served.cache.path().display(),
            if served.filling {
                "copy-on-read, filling"
            } else if served.passing_through {
                "its cache is busy filling for another server: reads pass through to the base"
            } else {
                "read-only"
            }
        );
    }
    let stopper = server.stopper();
    let signal_thread_died = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let died = signal_thread_died.clone();
    std::thread::spawn(move || {
        // However this thread ends (a panic included), the server stops: a server nobody
        // can stop must not live on.
        let _stop = OnExit(|| {
            if std::thread::panicking() {
                died.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            stopper.stop();
        });
        if let Ok(sig) = sigs.wait() {
            if !quiet {
                errln!("vmicache: {sig:?}: stopping");
            }
        }
    });
    let ran = server.run();
    let s = serve::finish(&served, record);
    ran?;
    if signal_thread_died.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("the signal-handling thread died; server stopped");
    }
    let s = s?;
    if !quiet {
        errln!("vmicache: {}", summary_line(&s));
        if let (Some(t), false) = (record, served.filling) {
            errln!(
                "vmicache: no trace written to {}: the cache was not being filled",
                t.display()
            );
        } else if let Some(t) = record {
            errln!(
                "vmicache: trace of {} base reads written to {}",
                s.trace_reads,
                t.display()
            );
        }
    }
    Ok(exit::OK)
}

/// Runs a closure when dropped (also when the thread unwinds).
struct OnExit<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnExit<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// `warm --boot`: a recorded first boot, then seal.
pub fn run_boot(
    cache: &Path,
    command: &[String],
    timeout: u64,
    trace: Option<&Path>,
    quiet: bool,
) -> Result<i32> {
    if command.is_empty() {
        bail!("warm --boot needs a command after --, e.g. -- qemu-system-x86_64 ... -drive file={{nbd}},format=raw");
    }
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()?;
    static INTERRUPTED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
    std::thread::spawn(move || {
        // A panic here counts as an interruption (-1): nobody could stop us otherwise.
        let _died = OnExit(|| {
            if std::thread::panicking() {
                INTERRUPTED.store(-1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        if let Ok(sig) = sigs.wait() {
            INTERRUPTED.store(sig as i32, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let dir = std::env::temp_dir().join(format!("vmicache-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cleanup = |d: &Path| {
        let _ = std::fs::remove_dir_all(d);
    };
    let inst = dir.join("instance.qcow2");
    let socket = dir.join("nbd.sock");
    let trace_path = trace
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{}.trace", cache.display())));
    let result = (|| -> Result<(ServeSummary, f64)> {
        // The instance made here, in a scratch directory, stands on the cache it was given.
        if let Some(dir) = std::fs::canonicalize(cache)?.parent() {
            vmicache::engine::open::allow_backing_in(dir)?;
        }
        make_instance(cache, &inst, vmicache::chain::build::INSTANCE_CLUSTER_SIZE)?;
        let names = vec![("boot".to_string(), inst.clone())];
        let (server, served) = start(&names, &socket, true, false, Limits::default())?;
        if !served.filling {
            bail!(
                "{}: cache is sealed or not a vmicache cache: nothing to record",
                cache.display()
            );
        }
        let stopper = server.stopper();
        let srv = std::thread::spawn(move || server.run());
        let uri = format!("nbd+unix:///boot?socket={}", socket.display());
        let args: Vec<String> = command.iter().map(|a| a.replace("{nbd}", &uri)).collect();
        if !quiet {
            errln!("vmicache: recording first boot: {}", args.join(" "));
        }
        let t0 = Instant::now();
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .spawn()
            .with_context(|| format!("cannot start {}", args[0]))?;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if t0.elapsed() > Duration::from_secs(timeout) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            let sig = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
            if sig != 0 {
                let _ = child.kill();
                let _ = child.wait();
                stopper.stop();
                let _ = srv.join();
                bail!("interrupted by signal {sig}; cache left unsealed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let secs = t0.elapsed().as_secs_f64();
        stopper.stop();
        srv.join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        let sum = serve::finish(&served, Some(&trace_path))?;
        drop(served);
        match status {
            None => bail!("boot command did not finish within {timeout} s; cache left unsealed"),
            Some(st) if !st.success() => bail!("boot command failed ({st}); cache left unsealed"),
            Some(_) => {}
        }
        seal(cache)?;
        Ok((sum, secs))
    })();
    cleanup(&dir);
    let (sum, secs) = result?;
    if !quiet {
        outln!(
            "recorded first boot in {secs:.1} s: {}; trace {} ({} reads); {} sealed",
            summary_line(&sum),
            trace_path.display(),
            sum.trace_reads,
            cache.display()
        );
    }
    Ok(exit::OK)
}
