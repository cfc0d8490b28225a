//! Formatting helpers: sizes, durations, rates, and the migration report lines.

use std::time::Duration;

use migration_core::MigrationReport;

/// `1234567` → `1.18 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// A duration in the unit that reads best.
pub fn duration(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Bytes per second as `x MiB/s`.
pub fn rate(bytes_per_sec: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_sec / (1024.0 * 1024.0))
}

/// Parses a size: a number with an optional `K`, `M`, `G` or `T` suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mul: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in `{s}` (use K, M, G or T)")),
            };
            (&t[..i], mul)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim_end_matches(['i', 'I'])
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 64M)"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// The lines describing one migration.
pub fn migration_lines(r: &MigrationReport) -> Vec<String> {
    let d = &r.downtime;
    let guest: u64 = r.rounds.iter().map(|x| x.guest_bytes).sum();
    let throughput = if r.total_time.as_secs_f64() > 0.0 {
        r.bytes_sent as f64 / r.total_time.as_secs_f64()
    } else {
        0.0
    };
    let rounds: Vec<String> = r.rounds.iter().map(|x| bytes(x.wire_bytes)).collect();
    vec![
        format!(
            "rounds {} ({}), {} on the wire for {} of guest memory",
            r.rounds.len(),
            rounds.join(" + "),
            bytes(r.bytes_sent),
            bytes(guest)
        ),
        format!(
            "total {}, throughput {} (memory rounds {}), converged: {}",
            duration(r.total_time),
            rate(throughput),
            rate(r.bandwidth),
            if r.converged { "yes" } else { "no (forced)" }
        ),
        format!(
            "per round, dirty rate / link bandwidth / throttle: {}",
            r.rounds
                .iter()
                .map(|x| format!(
                    "{:.0}/{:.0} MB/s {}%",
                    x.dirty_rate / 1e6,
                    x.bandwidth / 1e6,
                    x.throttle
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "downtime {} = final round {} + state capture {} + state send/restore {} + resume {}",
            duration(d.total),
            duration(d.final_round),
            duration(d.state_capture),
            duration(d.state_send),
            duration(d.resume)
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1MiB").ok(), None);
        assert!(parse_size("x").is_err());
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(12), "12 B");
    }
}
