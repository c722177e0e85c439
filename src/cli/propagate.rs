//! `vmicache hoard log|send|receive|push|pull|sync`: a hoard's generations, and how they
//! travel between nodes.

use super::exit;
use super::util::human;
use anyhow::{bail, Context, Result};
use std::path::Path;
use vmicache::hoard::{self, Hoard};

/// Seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(t: u64) -> String {
    let (days, s) = ((t / 86_400) as i64, t % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

pub fn log(h: &Hoard, json: bool) -> Result<i32> {
    let hist = h.history()?;
    if json {
        let v: Vec<_> = hist
            .iter()
            .map(|(id, g)| {
                serde_json::json!({
                    "id": vmicache::hoard::format::hex(id),
                    "generation": g.generation,
                    "time": g.time,
                    "parent": g.parent,
                    "change": g.change,
                    "caches": g.caches,
                })
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(exit::OK);
    }
    if hist.is_empty() {
        outln!("no generations yet (the first `hoard add` makes generation 1)");
    }
    for (id, g) in &hist {
        outln!(
            "generation {:<5} {}  {}  {:>4} caches  {}",
            g.generation,
            utc(g.time),
            &vmicache::hoard::format::hex(id)[..16],
            g.caches.len(),
            g.change
        );
    }
    if let Some((_, g)) = hist.last() {
        if g.parent.is_some() {
            outln!("(older generations are not kept here)");
        }
    }
    Ok(exit::OK)
}


pub fn send(
    h: &Hoard,
    from: Option<u64>,
    output: Option<&Path>,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    use std::io::IsTerminal;
    let r = match output {
        Some(p) => {
            let tmp = p.with_file_name(format!(
                ".{}.partial",
                p.file_name()
                    .map_or("stream".into(), |n| n.to_string_lossy())
            ));
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("{}: create", tmp.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            let r = hoard::stream::send(h, from, &mut w);
            let r = r.and_then(|r| {
                w.into_inner()
                    .map_err(|e| vmicache::Error::io(p, "write", e.into_error()))?
                    .sync_all()
                    .map_err(|e| vmicache::Error::io(p, "sync", e))?;
                Ok(r)
            });
            match r {
                Ok(r) => {
                    std::fs::rename(&tmp, p).with_context(|| format!("{}: rename", p.display()))?;
                    r
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        }
        None => {
            let out = std::io::stdout();
            if out.is_terminal() {
                bail!("hoard send writes a binary stream: give -o FILE or pipe it (to `hoard receive`, ssh, ...)");
            }
            let mut w = std::io::BufWriter::with_capacity(1 << 20, out.lock());
            hoard::stream::send(h, from, &mut w)?
        }
    };
    report(
        &r,
        "sent",
        json && output.is_some(),
        quiet || output.is_none(),
    );
    Ok(exit::OK)
}

pub fn receive(
    h: &Hoard,
    file: Option<&Path>,
    force: bool,
    json: bool,
    quiet: bool,
) -> Result<i32> {
    let r = match file.filter(|f| f.as_os_str() != "-") {
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| format!("{}: open", p.display()))?;
            hoard::stream::receive(h, &mut std::io::BufReader::with_capacity(1 << 20, f), force)?
        }
        None => {
            let i = std::io::stdin();
            hoard::stream::receive(
                h,
                &mut std::io::BufReader::with_capacity(1 << 20, i.lock()),
                force,
            )?
        }
    };
    report(&r, "received", json, quiet);
    Ok(exit::OK)
}

fn report(r: &hoard::stream::StreamReport, what: &str, json: bool, quiet: bool) {
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(r).expect("a report serializes")
        );
        return;
    }
    if quiet {
        return;
    }
    if r.up_to_date {
        outln!("already at generation {}", r.generation);
        return;
    }
    outln!(
        "{what} generation {}{}: {} indexes, {} packs ({}){}; stream {} in {:.2} s",
        r.generation,
        r.from
            .map_or(" (full)".to_string(), |f| format!(" from {f}")),
        r.indexes,
        r.packs,
        human(r.pack_bytes),
        if r.packs_present > 0 {
            format!(", {} packs already here", r.packs_present)
        } else {
            String::new()
        },
        human(r.bytes),
        r.seconds
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_764_600_000), "2025-12-01 14:40:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
    }
}
