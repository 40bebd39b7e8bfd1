//! lbd's configuration file (TOML): data-plane settings and the VIPs to serve. Parsing is strict
//! (unknown keys are errors, defaults are explicit) and a file that does not parse or validate is
//! refused whole, never half-applied.
//!
//! The commented example, also in `lb-userspace/lb.example.toml` (and tested to parse):
//!
//! ```toml
#![doc = include_str!("../lb.example.toml")]
//! ```

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    str::FromStr,
};

use lb_common::{
    GlobalConfig,
    config::{CFG_F_ECHO_REPLY, CFG_F_TOO_BIG_REPLY},
    keys::wire_addr,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use thiserror::Error;

use crate::model::{DesiredState, Limits, ModelError, ParseError, VipSpec};

/// A parsed and validated configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub settings: Settings,
    pub state: DesiredState,
}

/// The `[settings]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Outer IPv4 source of encapsulated packets: `prefix | (entropy & host bits)`.
    #[serde(rename = "encap_source_prefix", default = "default_encap_source")]
    pub encap_source: Ipv4Prefix,
    /// Outer IPv6 source toward IPv6 backends: `prefix | (entropy & host bits)`; the prefix
    /// is at least /96, so the host bits lie in the last 32.
    #[serde(rename = "encap_source_prefix_v6", default = "default_encap_source_v6")]
    pub encap_source_v6: Ipv6Prefix,
    /// UDP destination port of GUE-encapsulated packets (VIPs with `encap = "gue"`).
    #[serde(default = "default_gue_port")]
    pub gue_port: u16,
    /// Answer ICMP/ICMPv6 echo requests to VIP addresses (`CFG_F_ECHO_REPLY`).
    #[serde(default = "yes")]
    pub icmp_echo_reply: bool,
    /// Answer a client packet too big for the egress MTU once encapsulated with ICMP
    /// fragmentation-needed / ICMPv6 packet-too-big (`CFG_F_TOO_BIG_REPLY`); dropped as
    /// `too_big` otherwise.
    #[serde(default = "yes")]
    pub icmp_too_big_reply: bool,
    /// Most VIPs lbd accepts (`1..=MAX_VIPS`).
    #[serde(default = "default_max_vips")]
    pub max_vips: u32,
    /// Most backends over all VIPs (`1..=MAX_BACKENDS`): each takes a data-plane slot.
    #[serde(default = "default_max_backends")]
    pub max_backends: u32,
    /// Most backends of one VIP (`1..=MAX_BACKENDS`).
    #[serde(default = "default_max_backends")]
    pub max_backends_per_vip: u32,
    /// The new-flow rate guard: new flows each CPU records in the flow table per second at
    /// most (0: no limit). Unset: a tenth of each CPU's share of the table
    /// ([`Settings::new_flow_limit_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_limit: Option<u32>,
}

/// 172.16.0.0/16, Katran's choice too: a private range that gives 16 bits of per-flow
/// entropy. Backends decapsulating in XDP never route it back; ones using the kernel's ipip
/// device need it to pass their reverse-path filter (loose mode with a default route does).
pub const DEFAULT_ENCAP_SOURCE: Ipv4Prefix = Ipv4Prefix {
    addr: Ipv4Addr::new(172, 16, 0, 0),
    len: 16,
};

fn default_encap_source() -> Ipv4Prefix {
    DEFAULT_ENCAP_SOURCE
}

/// `fd00:4c42::/96` ("LB" in a ULA): 32 bits of per-flow entropy, in a unique-local range no
/// backend routes back.
pub const DEFAULT_ENCAP_SOURCE_V6: Ipv6Prefix = Ipv6Prefix {
    addr: Ipv6Addr::new(0xfd00, 0x4c42, 0, 0, 0, 0, 0, 0),
    len: 96,
};

/// Shortest IPv6 encapsulation source prefix: the data plane puts the flow's entropy into the
/// address's last 32 bits only.
pub const MIN_ENCAP_SOURCE_V6_LEN: u8 = 96;

/// The GUE port: what Linux's fou examples and Katran use, so a backend's
/// `ip fou add port 6080 ...` pairs with it.
pub const DEFAULT_GUE_PORT: u16 = 6080;

fn default_encap_source_v6() -> Ipv6Prefix {
    DEFAULT_ENCAP_SOURCE_V6
}

fn default_gue_port() -> u16 {
    DEFAULT_GUE_PORT
}

fn yes() -> bool {
    true
}

fn default_max_vips() -> u32 {
    Limits::HARD.max_vips
}

fn default_max_backends() -> u32 {
    Limits::HARD.max_backends
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            encap_source: DEFAULT_ENCAP_SOURCE,
            encap_source_v6: DEFAULT_ENCAP_SOURCE_V6,
            gue_port: DEFAULT_GUE_PORT,
            icmp_echo_reply: true,
            icmp_too_big_reply: true,
            max_vips: Limits::HARD.max_vips,
            max_backends: Limits::HARD.max_backends,
            max_backends_per_vip: Limits::HARD.max_backends_per_vip,
            new_flow_limit: None,
        }
    }
}

impl Settings {
    /// The operator's maximums on VIPs and backends.
    pub fn limits(&self) -> Limits {
        Limits {
            max_vips: self.max_vips,
            max_backends: self.max_backends,
            max_backends_per_vip: self.max_backends_per_vip,
        }
    }

    /// Refuses a limit of 0 or above what the data plane has room for, an IPv6 source prefix
    /// shorter than /96 and GUE port 0.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.encap_source_v6.len < MIN_ENCAP_SOURCE_V6_LEN {
            return Err(ConfigError::Setting {
                key: "encap_source_prefix_v6",
                value: self.encap_source_v6.to_string(),
                reason: "is too short: the prefix length must be 96..=128 (the per-flow \
                         entropy goes into the last 32 bits)",
            });
        }
        if self.gue_port == 0 {
            return Err(ConfigError::Setting {
                key: "gue_port",
                value: "0".into(),
                reason: "is not a valid UDP destination port (1..=65535)",
            });
        }
        let hard = Limits::HARD;
        for (key, value, max) in [
            ("max_vips", self.max_vips, hard.max_vips),
            ("max_backends", self.max_backends, hard.max_backends),
            (
                "max_backends_per_vip",
                self.max_backends_per_vip,
                hard.max_backends_per_vip,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::Limit { key, value, max });
            }
        }
        Ok(())
    }

    /// The guard's limit for a flow table of `table_size` entries over `cpus` CPUs: the
    /// setting, or a tenth of each CPU's share of the table, so that a flood turns the table
    /// over in ten seconds at the fastest (at least 1).
    pub fn new_flow_limit_for(&self, table_size: u32, cpus: u32) -> u32 {
        self.new_flow_limit
            .unwrap_or_else(|| (table_size / cpus.max(1) / 10).max(1))
    }

    /// The data plane's `LB_CONFIG` value for these settings.
    pub fn global_config(&self) -> GlobalConfig {
        let mut flags = 0;
        if self.icmp_echo_reply {
            flags |= CFG_F_ECHO_REPLY;
        }
        if self.icmp_too_big_reply {
            flags |= CFG_F_TOO_BIG_REPLY;
        }
        let (encap_src_v6, _) = wire_addr(IpAddr::V6(self.encap_source_v6.addr));
        // The prefix is at least /96 (validated), so the host bits are the last word's; a
        // shorter one, were it let through, keeps only the last 32 of them.
        let mask_v6 = (self.encap_source_v6.host_mask() & u128::from(u32::MAX)) as u32;
        GlobalConfig {
            // Wire order: the bytes as they go on the wire, read as a native u32.
            encap_src_v4: u32::from_ne_bytes(self.encap_source.addr.octets()),
            encap_src_v4_mask: u32::from_ne_bytes(self.encap_source.host_mask().to_be_bytes()),
            flags,
            encap_src_v6,
            encap_src_v6_mask: u32::from_ne_bytes(mask_v6.to_be_bytes()),
            ..GlobalConfig::default()
        }
    }
}

/// An address family a [`Prefix`] can be written in: its address as an integer, and the
/// words of its parse errors.
pub trait PrefixFamily: Copy + fmt::Display + FromStr {
    /// The address as an integer (host byte order).
    type Bits: Copy + PartialEq + Default + std::ops::BitAnd<Output = Self::Bits>;
    const MAX_LEN: u8;
    /// `ParseError` words: what is parsed, and why it failed.
    const WHAT: &'static str;
    const EXPECTED: &'static str;
    const BAD_ADDRESS: &'static str;
    const BAD_LENGTH: &'static str;
    fn bits(self) -> Self::Bits;
    /// The host bits of a prefix of length `len` (at most `MAX_LEN`).
    fn host_mask(len: u8) -> Self::Bits;
}

impl PrefixFamily for Ipv4Addr {
    type Bits = u32;
    const MAX_LEN: u8 = 32;
    const WHAT: &'static str = "IPv4 prefix";
    const EXPECTED: &'static str = "expected \"address/length\", e.g. \"172.16.0.0/16\"";
    const BAD_ADDRESS: &'static str = "bad IPv4 address";
    const BAD_LENGTH: &'static str = "the length must be 0..=32";
    fn bits(self) -> u32 {
        u32::from(self)
    }
    fn host_mask(len: u8) -> u32 {
        u32::MAX.checked_shr(u32::from(len)).unwrap_or(0)
    }
}

impl PrefixFamily for Ipv6Addr {
    type Bits = u128;
    const MAX_LEN: u8 = 128;
    const WHAT: &'static str = "IPv6 prefix";
    const EXPECTED: &'static str = "expected \"address/length\", e.g. \"fd00:4c42::/96\"";
    const BAD_ADDRESS: &'static str = "bad IPv6 address";
    const BAD_LENGTH: &'static str = "the length must be 0..=128";
    fn bits(self) -> u128 {
        u128::from(self)
    }
    fn host_mask(len: u8) -> u128 {
        u128::MAX.checked_shr(u32::from(len)).unwrap_or(0)
    }
}

/// An address prefix with its host bits zero, written `172.16.0.0/16` or `fd00:4c42::/96`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix<A> {
    addr: A,
    len: u8,
}

pub type Ipv4Prefix = Prefix<Ipv4Addr>;
pub type Ipv6Prefix = Prefix<Ipv6Addr>;

impl<A: PrefixFamily> Prefix<A> {
    /// `None` when `len` is longer than the address or `addr` has bits set beyond the prefix.
    pub fn new(addr: A, len: u8) -> Option<Self> {
        let prefix = Self { addr, len };
        (len <= A::MAX_LEN && addr.bits() & prefix.host_mask() == A::Bits::default())
            .then_some(prefix)
    }

    pub fn addr(&self) -> A {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The host bits, in host byte order.
    pub fn host_mask(&self) -> A::Bits {
        A::host_mask(self.len)
    }
}

impl<A: fmt::Display> fmt::Display for Prefix<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl<A: PrefixFamily> FromStr for Prefix<A> {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = |reason| ParseError::new(A::WHAT, s, reason);
        let (addr, len) = s.split_once('/').ok_or_else(|| bad(A::EXPECTED))?;
        let addr: A = addr.parse().map_err(|_| bad(A::BAD_ADDRESS))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|&l| l <= A::MAX_LEN)
            .ok_or_else(|| bad(A::BAD_LENGTH))?;
        Self::new(addr, len).ok_or_else(|| bad("the address has bits set beyond the prefix"))
    }
}

impl<A: fmt::Display> Serialize for Prefix<A> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, A: PrefixFamily> Deserialize<'de> for Prefix<A> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    settings: Settings,
    #[serde(default)]
    vip: Vec<VipSpec>,
}

#[derive(Serialize)]
struct FileRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    settings: Option<&'a Settings>,
    vip: Vec<&'a VipSpec>,
}

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A problem in the named file.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    /// Not TOML, an unknown key, or a value of the wrong type or form; toml's message shows the
    /// line, the column and the offending text.
    #[error("{0}")]
    Syntax(#[source] toml::de::Error),
    /// Well-formed but refused by the model's validation; the message names the field.
    #[error("{0}")]
    Invalid(#[source] ModelError),
    /// A `[settings]` value the data plane cannot use.
    #[error("settings.{key}: {value} {reason}")]
    Setting {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    /// A `[settings]` limit outside what the data plane can hold.
    #[error("settings.{key}: {value} is out of range 1..={max} (the data plane's maximum)")]
    Limit {
        key: &'static str,
        value: u32,
        max: u32,
    },
}

/// Parses and validates a configuration.
pub fn parse_config(text: &str) -> Result<Config, ConfigError> {
    let file: File = toml::from_str(text).map_err(ConfigError::Syntax)?;
    file.settings.validate()?;
    let state = DesiredState::from_vips(file.vip).map_err(ConfigError::Invalid)?;
    file.settings
        .limits()
        .check(&state)
        .map_err(ConfigError::Invalid)?;
    Ok(Config {
        settings: file.settings,
        state,
    })
}

/// Reads, parses and validates a configuration file; errors name the file.
pub fn load_config(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_config(&text).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

impl Config {
    /// The configuration as a file that [`parse_config`] reads back to the same value, with
    /// every default written out.
    pub fn to_toml(&self) -> String {
        render(&FileRef {
            settings: Some(&self.settings),
            vip: self.state.vips.values().collect(),
        })
    }
}

/// The VIP list alone, as the state file holds it; [`parse_state`] reads it back.
pub fn state_to_toml(state: &DesiredState) -> String {
    render(&FileRef {
        settings: None,
        vip: state.vips.values().collect(),
    })
}

/// Parses and validates a VIP list without `[settings]` (the state file's content).
pub fn parse_state(text: &str) -> Result<DesiredState, ConfigError> {
    // DesiredState's serde form is the `[[vip]]` list; deserializing validates.
    toml::from_str(text).map_err(ConfigError::Syntax)
}

fn render(file: &FileRef<'_>) -> String {
    {
        // Strings, integers and tables only: always representable in TOML.
        let text = toml::to_string(file).expect("a Config always serializes");
        let mut doc: toml_edit::DocumentMut = text.parse().expect("toml reads its own output");
        // One inline table per backend, as in the example file, rather than a
        // `[[vip.backends]]` block of three lines each.
        let vips = doc
            .get_mut("vip")
            .and_then(toml_edit::Item::as_array_of_tables_mut);
        for vip in vips
            .into_iter()
            .flat_map(toml_edit::ArrayOfTables::iter_mut)
        {
            let Some((mut key, item)) = vip.get_key_value_mut("backends") else {
                continue;
            };
            // An empty list is already written inline.
            let toml_edit::Item::ArrayOfTables(backends) = item else {
                continue;
            };
            let mut array = std::mem::take(backends).into_array();
            for backend in array.iter_mut() {
                backend.decor_mut().set_prefix("\n  ");
            }
            array.set_trailing("\n");
            array.set_trailing_comma(true);
            let mut value = toml_edit::Value::Array(array);
            value.decor_mut().set_prefix(" ");
            key.leaf_decor_mut().set_suffix(" ");
            *item = toml_edit::Item::Value(value);
        }
        doc.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::model::{BackendSpec, HashMode, VipId};

    const EXAMPLE: &str = include_str!("../lb.example.toml");

    fn parse_err(text: &str) -> String {
        parse_config(text).unwrap_err().to_string()
    }

    #[test]
    fn example_parses() {
        let config = parse_config(EXAMPLE).unwrap();
        assert_eq!(config.settings, Settings::default());
        let web: VipId = "10.200.0.100:80/tcp".parse().unwrap();
        let dns: VipId = "10.200.0.100:53/udp".parse().unwrap();
        let web = config.state.vip(&web).unwrap();
        assert_eq!(web.ring_size, 65_537);
        assert_eq!(web.hash, HashMode::FiveTuple);
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            web.backends,
            [
                BackendSpec::new(addr("10.10.0.11"), 100),
                BackendSpec::new(addr("10.10.0.12"), 100),
                BackendSpec::new(addr("10.10.0.13"), 0),
            ]
        );
        assert_eq!(config.state.vip(&dns).unwrap().hash, HashMode::SrcIp);
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = parse_config("").unwrap();
        assert_eq!(config, Config::default());
        let cfg = config.settings.global_config();
        assert_eq!(cfg.encap_src_v4.to_ne_bytes(), [172, 16, 0, 0]);
        assert_eq!(cfg.encap_src_v4_mask.to_ne_bytes(), [0, 0, 255, 255]);
    }

    #[test]
    fn export_round_trips() {
        let config = parse_config(EXAMPLE).unwrap();
        let text = config.to_toml();
        assert_eq!(parse_config(&text).unwrap(), config, "{text}");
        assert!(
            text.contains("\n[[vip]]\naddress = \"10.200.0.100:80/tcp\"\nring_size = 65537\nhash = \"5tuple\"\nencap = \"ipip\"\nbackends = [\n  { address = \"10.10.0.11\", weight = 100 },\n"),
            "{text}"
        );
        let empty = parse_config("[[vip]]\naddress = \"10.0.0.1:80/tcp\"").unwrap();
        let text = empty.to_toml();
        assert!(text.contains("\nbackends = []\n"), "{text}");
        assert_eq!(parse_config(&text).unwrap(), empty);
        let other = parse_config("[settings]\nencap_source_prefix = \"192.0.2.7/32\"").unwrap();
        assert_eq!(parse_config(&other.to_toml()).unwrap(), other);
        let limited =
            parse_config("[settings]\nmax_vips = 7\nmax_backends = 100\nmax_backends_per_vip = 10")
                .unwrap();
        assert_eq!(
            limited.settings.limits(),
            Limits {
                max_vips: 7,
                max_backends: 100,
                max_backends_per_vip: 10
            }
        );
        assert_eq!(parse_config(&limited.to_toml()).unwrap(), limited);
        assert_eq!(Settings::default().limits(), Limits::HARD);
        assert_eq!(other.settings.global_config().encap_src_v4_mask, 0);
    }

    /// The IPv6 source prefix, the GUE port and the ICMP switches: defaults, what the data
    /// plane gets, and round trips.
    #[test]
    fn issue9_settings_reach_the_global_config() {
        let d = Settings::default();
        assert_eq!(d.gue_port, DEFAULT_GUE_PORT);
        assert_eq!(DEFAULT_GUE_PORT, 6080);
        assert_eq!(d.encap_source_v6.to_string(), "fd00:4c42::/96");
        assert!(d.icmp_echo_reply && d.icmp_too_big_reply);
        let cfg = d.global_config();
        assert_eq!(cfg.flags, CFG_F_ECHO_REPLY | CFG_F_TOO_BIG_REPLY);
        let bytes: Vec<u8> = cfg
            .encap_src_v6
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        assert_eq!(
            bytes,
            [0xfd, 0, 0x4c, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(cfg.encap_src_v6_mask.to_ne_bytes(), [0xff; 4]);

        let text = "[settings]\nencap_source_prefix_v6 = \"2001:db8:ff::ab:0/112\"\n\
                    gue_port = 5555\nicmp_echo_reply = false\nicmp_too_big_reply = false\n";
        let set = parse_config(text).unwrap();
        assert_eq!(set.settings.gue_port, 5555);
        let cfg = set.settings.global_config();
        assert_eq!(cfg.flags, 0);
        assert_eq!(cfg.encap_src_v6[3].to_ne_bytes(), [0, 0xab, 0, 0]);
        assert_eq!(cfg.encap_src_v6[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(cfg.encap_src_v6_mask.to_ne_bytes(), [0, 0, 0xff, 0xff]);
        // The v4 fields are untouched by the v6 ones.
        assert_eq!(cfg.encap_src_v4.to_ne_bytes(), [172, 16, 0, 0]);
        assert_eq!(parse_config(&set.to_toml()).unwrap(), set);
        let one = parse_config("[settings]\nicmp_too_big_reply = false").unwrap();
        assert_eq!(one.settings.global_config().flags, CFG_F_ECHO_REPLY);
        let fixed = parse_config("[settings]\nencap_source_prefix_v6 = \"fd00::7/128\"").unwrap();
        assert_eq!(fixed.settings.global_config().encap_src_v6_mask, 0);
        // A refused setting leaves nothing half-applied: the whole file is refused.
        assert!(matches!(
            parse_config("[settings]\ngue_port = 0\nmax_vips = 3"),
            Err(ConfigError::Setting {
                key: "gue_port",
                ..
            })
        ));
    }

    #[test]
    fn ipv6_prefixes() {
        for (s, mask) in [
            ("fd00:4c42::/96", u128::from(u32::MAX)),
            ("::/0", u128::MAX),
            ("2001:db8::1/128", 0),
        ] {
            let p: Ipv6Prefix = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(p.host_mask(), mask);
        }
        for (s, why) in [
            ("fd00::1/96", "bits set beyond the prefix"),
            ("fd00::/129", "the length must be 0..=128"),
            ("fd00::", "expected \"address/length\""),
            ("10.0.0.0/8", "bad IPv6 address"),
        ] {
            let e = s.parse::<Ipv6Prefix>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    /// IPv6 VIPs, mixed families and GUE in a file, and back out of an export.
    #[test]
    fn ipv6_vips_and_encap_in_the_file() {
        let text = r#"
[[vip]]
address = "[2001:db8::1]:443/tcp"
encap = "gue"
backends = [{ address = "10.1.0.1" }, { address = "2001:db8:1::1" }]
[[vip]]
address = "10.0.0.1:80/tcp"
backends = [{ address = "2001:db8:1::2" }]
"#;
        let config = parse_config(text).unwrap();
        let v6: VipId = "[2001:db8::1]:443/tcp".parse().unwrap();
        let v4: VipId = "10.0.0.1:80/tcp".parse().unwrap();
        assert_eq!(
            config.state.vip(&v6).unwrap().encap,
            crate::model::Encap::Gue
        );
        assert_eq!(
            config.state.vip(&v4).unwrap().encap,
            crate::model::Encap::Ipip
        );
        let out = config.to_toml();
        assert!(out.contains("address = \"[2001:db8::1]:443/tcp\""), "{out}");
        assert!(out.contains("encap = \"gue\""), "{out}");
        assert_eq!(parse_config(&out).unwrap(), config);
        let saved = state_to_toml(&config.state);
        assert_eq!(parse_state(&saved).unwrap(), config.state);
    }

    #[test]
    fn new_flow_limit_defaults_to_a_tenth_of_each_cpus_share_per_second() {
        let auto = Settings::default();
        assert_eq!(auto.new_flow_limit_for(1 << 20, 2), 52_428);
        assert_eq!(
            auto.new_flow_limit_for(8, 4),
            1,
            "never 0 (off) by rounding"
        );
        let set = parse_config("[settings]\nnew_flow_limit = 200").unwrap();
        assert_eq!(set.settings.new_flow_limit_for(1 << 20, 2), 200);
        assert_eq!(parse_config(&set.to_toml()).unwrap(), set);
        let off = parse_config("[settings]\nnew_flow_limit = 0").unwrap();
        assert_eq!(off.settings.new_flow_limit_for(1 << 20, 2), 0);
        assert!(
            parse_err("[settings]\nnew_flow_limit = -1").contains("new_flow_limit"),
            "{}",
            parse_err("[settings]\nnew_flow_limit = -1")
        );
    }

    #[test]
    fn checks_round_trip_in_both_file_forms() {
        let text = r#"
[[vip]]
address = "10.0.0.1:80/tcp"
check = { kind = "http:/healthz", interval = "500ms", host = "example.com", status = "200-204" }
backends = [
  { address = "10.1.0.1" },
  { address = "10.1.0.2", check = { kind = "tcp", port = 8080, via_tunnel = true } },
  { address = "10.1.0.3", check = { kind = "none" } },
]
"#;
        let config = parse_config(text).unwrap();
        assert_eq!(parse_config(&config.to_toml()).unwrap(), config);
        let saved = state_to_toml(&config.state);
        assert_eq!(parse_state(&saved).unwrap(), config.state, "{saved}");
        let vip = config.state.vips.values().next().unwrap();
        let kinds: Vec<String> = vip
            .backends
            .iter()
            .map(|b| vip.check_of(b).map_or("-".into(), |c| c.kind.to_string()))
            .collect();
        assert_eq!(kinds, ["http:/healthz", "tcp", "-"]);
        let e = parse_err(
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\ncheck = { kind = \"tcp\", rise = 0 }",
        );
        assert!(
            e.contains("vip[0].check.rise: 0 is out of range 1..=100"),
            "{e}"
        );
    }

    #[test]
    fn prefixes() {
        for (s, mask) in [
            ("172.16.0.0/16", 0xffff),
            ("0.0.0.0/0", u32::MAX),
            ("10.1.2.3/32", 0),
        ] {
            let p: Ipv4Prefix = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
            assert_eq!(p.host_mask(), mask);
        }
        for (s, why) in [
            ("172.16.0.1/16", "bits set beyond the prefix"),
            ("172.16.0.0/33", "the length must be 0..=32"),
            ("172.16.0.0", "expected \"address/length\""),
            ("2001:db8::/32", "bad IPv4 address"),
        ] {
            let e = s.parse::<Ipv4Prefix>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    /// Every class of refusal, with the field it names.
    #[test]
    #[allow(clippy::too_many_lines)] // a table of cases
    fn errors_name_the_field() {
        let vip = |body: &str| format!("[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n{body}\n");
        let cases: Vec<(String, &str)> = vec![
            // Syntax and shape, reported by toml with the line and the text.
            ("[[vip]\n".into(), "TOML parse error at line 1"),
            (
                "[settings]\nencap_source = \"1.2.3.0/24\"".into(),
                "unknown field `encap_source`",
            ),
            ("[setings]\n".into(), "unknown field `setings`"),
            (vip("port = 1"), "unknown field `port`"),
            (
                vip("backends = [{ address = \"10.1.0.1\", wieght = 1 }]"),
                "unknown field `wieght`",
            ),
            (
                vip("backends = [{ address = \"10.1.0.1\", weight = -1 }]"),
                "invalid value: integer `-1`",
            ),
            (
                vip("backends = [{ weight = 1 }]"),
                "missing field `address`",
            ),
            (
                vip("backends = [{ address = \"10.1.0\" }]"),
                "invalid IP address syntax",
            ),
            (
                vip("hash = \"5-tuple\""),
                "unknown variant `5-tuple`, expected `5tuple` or `src-ip`",
            ),
            ("[[vip]]\nring_size = 7".into(), "missing field `address`"),
            (
                "[[vip]]\naddress = \"10.0.0.1:80\"".into(),
                "\"10.0.0.1:80\" is not a valid VIP",
            ),
            (
                "[[vip]]\naddress = \"10.0.0.1:80/sctp\"".into(),
                "the protocol must be \"tcp\" or \"udp\"",
            ),
            (
                "[settings]\nencap_source_prefix = \"1.2.3.4/24\"".into(),
                "bits set beyond the prefix",
            ),
            // Semantics, reported by the model with the field's path.
            (
                vip("ring_size = 65536"),
                "vip[0].ring_size: 65536 is not prime (the next prime is 65537)",
            ),
            (
                vip("ring_size = 3"),
                "vip[0].ring_size: 3 is out of range 7..=1048573",
            ),
            (
                vip("backends = [{ address = \"10.1.0.1\", weight = 70000 }]"),
                "vip[0].backends[0].weight: 70000 is out of range 0..=65535",
            ),
            (
                vip("backends = [{ address = \"10.1.0.1\" }, { address = \"10.1.0.1\" }]"),
                "vip[0].backends[1].address: backend 10.1.0.1 is a duplicate of vip[0].backends[0]",
            ),
            (
                vip("encap = \"vxlan\""),
                "unknown variant `vxlan`, expected `ipip` or `gue`",
            ),
            (
                vip("backends = [{ address = \"ff02::1\" }]"),
                "vip[0].backends[0].address: ff02::1 is a multicast address",
            ),
            (
                vip("backends = [{ address = \"224.0.0.5\" }]"),
                "vip[0].backends[0].address: 224.0.0.5 is a multicast address",
            ),
            (
                "[[vip]]\naddress = \"10.0.0.1:0/tcp\"".into(),
                "vip[0].address: port 0 is not a valid VIP port",
            ),
            (
                "[[vip]]\naddress = \"0.0.0.0:80/tcp\"".into(),
                "vip[0].address: 0.0.0.0 is the unspecified address",
            ),
            (
                "[[vip]]\naddress = \"[2001:db8::1]:0/tcp\"".into(),
                "vip[0].address: port 0 is not a valid VIP port",
            ),
            (
                "[[vip]]\naddress = \"2001:db8::1:80/tcp\"".into(),
                "\"2001:db8::1:80/tcp\" is not a valid VIP",
            ),
            // The new settings: the key, the value and why.
            (
                "[settings]\nencap_source_prefix_v6 = \"fd00::/64\"".into(),
                "settings.encap_source_prefix_v6: fd00::/64 is too short: the prefix length must \
                 be 96..=128",
            ),
            (
                "[settings]\nencap_source_prefix_v6 = \"fd00::1/96\"".into(),
                "bits set beyond the prefix",
            ),
            (
                "[settings]\nencap_source_prefix_v6 = \"172.16.0.0/16\"".into(),
                "bad IPv6 address",
            ),
            (
                "[settings]\ngue_port = 0".into(),
                "settings.gue_port: 0 is not a valid UDP destination port",
            ),
            (
                "[settings]\ngue_port = 65536".into(),
                "invalid value: integer `65536`, expected u16",
            ),
            (
                "[settings]\nicmp_echo_reply = \"yes\"".into(),
                "invalid type: string \"yes\", expected a boolean",
            ),
            (
                format!("{}{}", vip(""), vip("")),
                "vip[1].address: VIP \"10.0.0.1:80/tcp\" is a duplicate of vip[0]",
            ),
            // Limits: the key, its value and the range.
            (
                "[settings]\nmax_vips = 513".into(),
                "settings.max_vips: 513 is out of range 1..=512 (the data plane's maximum)",
            ),
            (
                "[settings]\nmax_backends = 0".into(),
                "settings.max_backends: 0 is out of range 1..=8192",
            ),
            (
                "[settings]\nmax_backends_per_vip = 100000".into(),
                "settings.max_backends_per_vip: 100000 is out of range 1..=8192",
            ),
            (
                "[settings]\nmax_vips = -1".into(),
                "invalid value: integer `-1`, expected u32",
            ),
            (
                format!(
                    "[settings]\nmax_vips = 1\n{}[[vip]]\naddress = \"10.0.0.2:80/tcp\"\n",
                    vip("")
                ),
                "vip: 2 VIPs exceed the limit of 1 (settings.max_vips)",
            ),
            (
                format!(
                    "[settings]\nmax_backends_per_vip = 1\n{}",
                    vip("backends = [{ address = \"10.1.0.1\" }, { address = \"10.1.0.2\" }]")
                ),
                "vip[\"10.0.0.1:80/tcp\"].backends: 2 backends exceed the limit of 1 per VIP \
                 (settings.max_backends_per_vip)",
            ),
        ];
        for (text, want) in cases {
            let e = parse_err(&text);
            assert!(e.contains(want), "{text:?}:\ngot  {e}\nwant {want}");
        }
        let e = parse_err(&vip("backends = [{ address = \"10.1.0.1\", weight = -1 }]"));
        assert!(e.contains("line 3"), "toml names the line: {e}");
    }

    /// Removes the test's temp folder even when the test fails.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            // Best effort: a leftover temp folder is harmless and must not hide the result.
            std::fs::remove_dir_all(&self.0).ok();
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("lb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _cleanup = Cleanup(dir.clone());

        let good = dir.join("lb.toml");
        std::fs::write(&good, EXAMPLE).unwrap();
        assert_eq!(load_config(&good).unwrap(), parse_config(EXAMPLE).unwrap());

        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 10\n",
        )
        .unwrap();
        let e = load_config(&bad).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: vip[0].ring_size: 10 is not prime (the next prime is 11)",
                bad.display()
            )
        );

        let missing = dir.join("missing.toml");
        let e = load_config(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read:", missing.display())),
            "{e}"
        );
    }
}
