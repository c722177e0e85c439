//! `vmicache hoard log|send|receive|push|pull|sync`: a hoard's generations, and how they
//! travel between nodes.

use super::exit;
use anyhow::Result;
use vmicache::hoard::Hoard;

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

#[cfg(test)]
mod tests {
    #[test]
    fn utc() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_764_600_000), "2025-12-01 14:40:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
    }
}
