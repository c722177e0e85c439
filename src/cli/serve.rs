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
use vmicache::nbd::{Export, Server};

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
    let server = Server::bind(socket, exports)?;
    Ok((server, served))
}

pub fn run_serve(
    instances: &[PathBuf],
    socket: &Path,
    record: Option<&Path>,
    export: Option<&str>,
    pass_through_if_busy: bool,
    quiet: bool,
) -> Result<i32> {
    // Signals go to one waiting thread; block them before any other thread starts.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()?;
    let names = export_names(instances, export)?;
    let (server, served) = start(&names, socket, record.is_some(), pass_through_if_busy)?;
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
    std::thread::spawn(move || {
        if let Ok(sig) = sigs.wait() {
            if !quiet {
                errln!("vmicache: {sig:?}: stopping");
            }
        }
        stopper.stop();
    });
    server.run()?;
    let s = serve::finish(&served, record)?;
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
        make_instance(cache, &inst, vmicache::chain::build::INSTANCE_CLUSTER_SIZE)?;
        let names = vec![("boot".to_string(), inst.clone())];
        let (server, served) = start(&names, &socket, true, false)?;
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
