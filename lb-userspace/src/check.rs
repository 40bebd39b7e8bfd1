//! Health-check settings of a VIP (the default for its backends) or of one backend, as written
//! in lb.toml and sent by lbctl. The defaults are `HAProxy`'s: every 2 s, up after 2
//! successes, down after 3 failures; the kind defaults to none (no checks), as in `HAProxy`
//! without `check`.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::model::ParseError;

/// What a check does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CheckKind {
    /// No checks: the backend is always up.
    #[default]
    None,
    /// A TCP connect.
    Tcp,
    /// An HTTP GET of this path, expecting a status in the check's range.
    Http { path: String },
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::None => f.write_str("none"),
            CheckKind::Tcp => f.write_str("tcp"),
            CheckKind::Http { path } => write!(f, "http:{path}"),
        }
    }
}

impl FromStr for CheckKind {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "none" => Ok(CheckKind::None),
            "tcp" => Ok(CheckKind::Tcp),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') && is_clean(path) => Ok(CheckKind::Http {
                    path: path.to_owned(),
                }),
                Some(_) => Err(ParseError::new(
                    "check kind",
                    s,
                    "the HTTP path must start with '/' and hold no spaces or control characters",
                )),
                None => Err(ParseError::new(
                    "check kind",
                    s,
                    "expected \"none\", \"tcp\" or \"http:/path\"",
                )),
            },
        }
    }
}

/// Printable ASCII without spaces: nothing that could split an HTTP request line or header.
fn is_clean(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// A duration written `500ms`, `2s` or `1m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl FromStr for Span {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || {
            ParseError::new(
                "duration",
                s,
                "expected a number and ms, s or m, e.g. \"2s\"",
            )
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = s[..split].parse().map_err(|_| bad())?;
        let ms = match &s[split..] {
            "ms" => n,
            "s" => n.checked_mul(1000).ok_or_else(bad)?,
            "m" => n.checked_mul(60_000).ok_or_else(bad)?,
            _ => return Err(bad()),
        };
        Ok(Span(Duration::from_millis(ms)))
    }
}

/// HTTP statuses that count as healthy, written `200-399`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub lo: u16,
    pub hi: u16,
}

impl StatusRange {
    pub fn contains(&self, status: u16) -> bool {
        (self.lo..=self.hi).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl FromStr for StatusRange {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || {
            ParseError::new(
                "status range",
                s,
                "expected \"LOW-HIGH\" with 100 <= LOW <= HIGH <= 599, e.g. \"200-399\"",
            )
        };
        let (lo, hi) = s.split_once('-').unwrap_or((s, s));
        let lo: u16 = lo.parse().map_err(|_| bad())?;
        let hi: u16 = hi.parse().map_err(|_| bad())?;
        if !(100..=599).contains(&lo) || !(lo..=599).contains(&hi) {
            return Err(bad());
        }
        Ok(StatusRange { lo, hi })
    }
}

macro_rules! serde_by_string {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    )*};
}

serde_by_string!(CheckKind, Span, StatusRange);

pub const DEFAULT_INTERVAL: Span = Span(Duration::from_secs(2));
pub const DEFAULT_TIMEOUT: Span = Span(Duration::from_secs(1));
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_STATUS: StatusRange = StatusRange { lo: 200, hi: 399 };
const INTERVALS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_hours(1));
const TIMEOUTS: (Duration, Duration) = (Duration::from_millis(10), Duration::from_mins(1));
const MAX_COUNT: u32 = 100;

/// One check configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    #[serde(default)]
    pub kind: CheckKind,
    #[serde(default = "default_interval")]
    pub interval: Span,
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// Consecutive successes that bring a down backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Port to check; the VIP's port when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP statuses that pass.
    #[serde(default = "default_status")]
    pub status: StatusRange,
    /// HTTP Host header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Send the check through the encapsulated path (to the VIP, via the backend's tunnel), so a
    /// backend whose decapsulation is broken fails it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub via_tunnel: bool,
}

fn default_interval() -> Span {
    DEFAULT_INTERVAL
}
fn default_timeout() -> Span {
    DEFAULT_TIMEOUT
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}
fn default_status() -> StatusRange {
    DEFAULT_STATUS
}

impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            kind: CheckKind::None,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            port: None,
            status: DEFAULT_STATUS,
            host: None,
            via_tunnel: false,
        }
    }
}

impl CheckSpec {
    /// A check of this kind with every other setting at its default.
    pub fn of(kind: CheckKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    /// The first field out of range, as (field, reason).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        let within = |d: Span, (lo, hi): (Duration, Duration)| (lo..=hi).contains(&d.0);
        if !within(self.interval, INTERVALS) {
            return Some((
                "interval",
                format!("{} is out of range 100ms..=60m", self.interval),
            ));
        }
        if !within(self.timeout, TIMEOUTS) {
            return Some((
                "timeout",
                format!("{} is out of range 10ms..=60s", self.timeout),
            ));
        }
        for (field, n) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=MAX_COUNT).contains(&n) {
                return Some((field, format!("{n} is out of range 1..={MAX_COUNT}")));
            }
        }
        if self.port == Some(0) {
            return Some(("port", "0 is not a valid port".into()));
        }
        if let Some(host) = &self.host
            && (host.is_empty() || !is_clean(host))
        {
            return Some((
                "host",
                format!("{host:?} must be non-empty printable ASCII without spaces"),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip() {
        for s in ["none", "tcp", "http:/healthz", "http:/a/b?c=d"] {
            assert_eq!(s.parse::<CheckKind>().unwrap().to_string(), s);
        }
        for s in ["500ms", "2s", "1m", "1500ms"] {
            assert_eq!(s.parse::<Span>().unwrap().to_string(), s);
        }
        assert_eq!("90s".parse::<Span>().unwrap().to_string(), "90s");
        assert_eq!("200-399".parse::<StatusRange>().unwrap(), DEFAULT_STATUS);
        assert_eq!("204".parse::<StatusRange>().unwrap().to_string(), "204-204");
    }

    #[test]
    fn bad_strings_say_what_is_expected() {
        for (s, why) in [
            ("http", "expected \"none\", \"tcp\" or \"http:/path\""),
            ("http:healthz", "must start with '/'"),
            ("http:/a b", "no spaces or control characters"),
            ("udp", "expected \"none\""),
        ] {
            let e = s.parse::<CheckKind>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
        for s in ["2", "s", "2h", "-1s", "1.5s", "99999999999999999999m"] {
            assert!(s.parse::<Span>().is_err(), "{s}");
        }
        for s in ["399-200", "99-200", "200-600", "abc"] {
            assert!(s.parse::<StatusRange>().is_err(), "{s}");
        }
    }

    #[test]
    fn toml_defaults_and_problems() {
        let spec: CheckSpec = toml::from_str("kind = \"http:/healthz\"").unwrap();
        assert_eq!(
            spec,
            CheckSpec::of(CheckKind::Http {
                path: "/healthz".into()
            })
        );
        assert_eq!(spec.problem(), None);
        let e = toml::from_str::<CheckSpec>("kind = \"tcp\"\nintervall = \"1s\"").unwrap_err();
        assert!(e.to_string().contains("unknown field `intervall`"), "{e}");
        for (text, field) in [
            ("interval = \"50ms\"", "interval"),
            ("timeout = \"2m\"", "timeout"),
            ("rise = 0", "rise"),
            ("fall = 101", "fall"),
            ("port = 0", "port"),
            ("host = \"a\\r\\nX: y\"", "host"),
        ] {
            let spec: CheckSpec = toml::from_str(text).unwrap();
            assert_eq!(spec.problem().map(|p| p.0), Some(field), "{text}");
        }
    }
}
