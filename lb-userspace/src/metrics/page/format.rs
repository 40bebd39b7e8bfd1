//! Numbers as people read them on the status page: binary byte units, k/M/G counts, short
//! durations. `script.js` formats the same way (keep the two in step).

/// Three significant digits at most: `1.23`, `12.3`, `123`.
fn significant(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Bytes in binary units: `512 B`, `1.50 KiB`, `12.3 MiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{} {}", significant(v), UNITS[unit])
    }
}

/// A count or a rate: exact below 1000 (one decimal for a fractional rate), then
/// `1.23 k`, `45.6 M`, `789 G`, `1.00 T`.
pub fn count(n: f64) -> String {
    const UNITS: [&str; 5] = ["", " k", " M", " G", " T"];
    let n = n.max(0.0);
    if n < 1000.0 {
        return if (n - n.round()).abs() < 0.05 {
            format!("{n:.0}")
        } else {
            format!("{n:.1}")
        };
    }
    let mut v = n;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    format!("{}{}", significant(v), UNITS[unit])
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
        format!("{} ms", significant(us as f64 / 1000.0))
    }
}
