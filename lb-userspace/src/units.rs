//! Numbers as people read them, the same in lbctl and on the status page: counts, rates and
//! bytes with SI prefixes (1 kB = 1000 B, as network rates are given), short durations and
//! probe latencies. The status page's script formats the same way (keep the two in step).

/// A count or rate with an SI prefix: `0`, `12.5`, `1.23k`, `45.6M`.
pub fn count(value: f64) -> String {
    let (number, prefix) = si(value);
    format!("{number}{prefix}")
}

/// Bytes with an SI prefix: `0 B`, `512 B`, `1.23 kB`, `45.6 MB`.
pub fn bytes(value: f64) -> String {
    let (number, prefix) = si(value);
    format!("{number} {prefix}B")
}

/// SI prefixes from 1000 up (`u64::MAX` is 18.4 E).
const PREFIXES: [&str; 6] = ["k", "M", "G", "T", "P", "E"];

/// `value` as three significant digits and an SI prefix (1000 apart); below 1000, whole
/// numbers as they are and fractions with one decimal.
fn si(value: f64) -> (String, &'static str) {
    let value = if value.is_finite() && value > 0.0 {
        value
    } else {
        0.0
    };
    // Below 999.95 one decimal cannot round up to 1000.0.
    if value < 999.95 {
        let number = if value.fract() == 0.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.1}")
        };
        return (number, "");
    }
    let mut m = value / 1000.0;
    let mut i = 0;
    // 999.5 and up would print as 1000 with no decimals: the next prefix says it better.
    while m >= 999.5 && i + 1 < PREFIXES.len() {
        m /= 1000.0;
        i += 1;
    }
    (three_digits(m), PREFIXES[i])
}

/// Time in a state: `45 s`, `3 m 12 s`, `5 h 3 m`, `2 d 4 h`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if secs < 60 {
        format!("{s} s")
    } else if secs < 3600 {
        format!("{m} m {s} s")
    } else if secs < 86_400 {
        format!("{h} h {m} m")
    } else {
        format!("{d} d {h} h")
    }
}

/// A probe's latency: `312 µs`, `1.50 ms`.
pub fn latency(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else {
        format!("{} ms", three_digits(us as f64 / 1000.0))
    }
}

/// Three significant digits: `1.23`, `12.3`, `123`.
fn three_digits(v: f64) -> String {
    if v < 9.995 {
        format!("{v:.2}")
    } else if v < 99.95 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        for (value, want) in [
            (0.0, "0"),
            (-3.0, "0"),
            (f64::NAN, "0"),
            (7.0, "7"),
            (0.04, "0.0"),
            (12.5, "12.5"),
            (999.0, "999"),
            (999.94, "999.9"),
            (999.95, "1.00k"),
            (1_000.0, "1.00k"),
            (1_234.0, "1.23k"),
            (9_994.0, "9.99k"),
            (9_995.0, "10.0k"),
            (99_949.0, "99.9k"),
            (99_950.0, "100k"),
            (999_499.0, "999k"),
            (999_500.0, "1.00M"),
            (45_600_000.0, "45.6M"),
            (3.2e9, "3.20G"),
            (1e21, "1000E"),
        ] {
            assert_eq!(count(value), want, "{value}");
        }
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1_536.0), "1.54 kB");
        assert_eq!(bytes(1_200_000.0), "1.20 MB");
        assert_eq!(bytes(u64::MAX as f64), "18.4 EB");
    }

    #[test]
    fn durations_and_latencies() {
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(3599), "59 m 59 s");
        assert_eq!(duration(3 * 3600 + 120), "3 h 2 m");
        assert_eq!(duration(2 * 86_400 + 3600), "2 d 1 h");
        assert_eq!(latency(999), "999 µs");
        assert_eq!(latency(1500), "1.50 ms");
        assert_eq!(latency(25_000), "25.0 ms");
    }
}
