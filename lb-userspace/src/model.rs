//! Desired state: the VIPs and backends lbd should install, and the validation every change to
//! them passes. Mutators validate first and leave the state untouched when they refuse.
//!
//! Errors name where the problem is as a path: by position when the state comes from a file
//! (`vip[1].backends[0].weight`), by key when it comes from a request
//! (`vip["10.0.0.1:80/tcp"].backends["10.10.0.11"].weight`).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use lb_common::{
    keys::{ENCAP_GUE, ENCAP_IPIP, PROTO_TCP, PROTO_UDP, VIP_F_HASH_SRC_ONLY, VipKey},
    maps::{MAX_BACKENDS, MAX_VIPS},
};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use thiserror::Error;

use crate::{
    check::{CheckKind, CheckSpec},
    maglev,
};

/// Largest backend weight (weights are relative; 0 takes no new flows).
pub const MAX_WEIGHT: u32 = 65_535;
pub const DEFAULT_WEIGHT: u32 = 100;
/// Smallest Maglev table: tiny tables only make sense in tests.
pub const MIN_RING_SIZE: u32 = 7;
/// Largest Maglev table: the largest prime below 2^20. The paper wants the size well above
/// 100 x the backend count for low disruption; this allows that for a VIP of ~10,000 backends
/// (more than `MAX_BACKENDS`), and two such tables (old and new during a swap) fit in the
/// default ring pool.
pub const MAX_RING_SIZE: u32 = 1_048_573;
pub const DEFAULT_RING_SIZE: u32 = lb_common::maps::DEFAULT_RING_SIZE;

/// A VIP's transport protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(ParseError::new(
                "protocol",
                s,
                "expected \"tcp\" or \"udp\"",
            )),
        }
    }
}

/// What a VIP hashes to pick a backend for a new flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashMode {
    /// Addresses, ports and protocol.
    #[default]
    #[serde(rename = "5tuple")]
    FiveTuple,
    /// The client address only: all of a client's flows go to one backend.
    #[serde(rename = "src-ip")]
    SrcIp,
}

impl HashMode {
    /// The `VIP_F_*` bits for `VipMeta::flags`.
    pub fn vip_flags(self) -> u32 {
        match self {
            HashMode::FiveTuple => 0,
            HashMode::SrcIp => VIP_F_HASH_SRC_ONLY,
        }
    }
}

impl fmt::Display for HashMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HashMode::FiveTuple => "5tuple",
            HashMode::SrcIp => "src-ip",
        })
    }
}

impl FromStr for HashMode {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "5tuple" => Ok(HashMode::FiveTuple),
            "src-ip" => Ok(HashMode::SrcIp),
            _ => Err(ParseError::new(
                "hash mode",
                s,
                "expected \"5tuple\" or \"src-ip\"",
            )),
        }
    }
}

/// How a VIP's packets travel to its backends. The outer header takes the backend's address
/// family, whatever the VIP's, so IPv4 and IPv6 VIPs and backends mix freely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// IP in IP (protocol 4 or 41): the kernel's ipip/ip6tnl devices or `lb_decap` strip it.
    #[default]
    Ipip,
    /// GUE variant 1: the client's packet in UDP to `[settings]` `gue_port`, whose source port
    /// carries per-flow entropy for ECMP and receive-side scaling; fou devices or `lb_decap`
    /// strip it.
    Gue,
}

impl Encap {
    /// `BackendSlot::encap`.
    pub fn slot_kind(self) -> u8 {
        match self {
            Encap::Ipip => ENCAP_IPIP,
            Encap::Gue => ENCAP_GUE,
        }
    }
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encap::Ipip => "ipip",
            Encap::Gue => "gue",
        })
    }
}

impl FromStr for Encap {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "ipip" => Ok(Encap::Ipip),
            "gue" => Ok(Encap::Gue),
            _ => Err(ParseError::new(
                "encapsulation",
                s,
                "expected \"ipip\" or \"gue\"",
            )),
        }
    }
}

/// A VIP's identity, written `10.0.0.100:80/tcp` or `[2001:db8::1]:443/udp` (also in serde).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipId {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl VipId {
    /// The data plane's key for this VIP.
    pub fn key(&self) -> VipKey {
        VipKey::new(self.addr, self.port, self.proto.number())
    }
}

impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.addr, self.port),
            self.proto
        )
    }
}

impl FromStr for VipId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        const FORM: &str = "expected \"address:port/protocol\", e.g. \"10.0.0.1:80/tcp\" or \
                            \"[2001:db8::1]:443/udp\"";
        let (sock, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| ParseError::new("VIP", s, FORM))?;
        let sock: SocketAddr = sock.parse().map_err(|_| ParseError::new("VIP", s, FORM))?;
        let proto = proto
            .parse()
            .map_err(|_| ParseError::new("VIP", s, "the protocol must be \"tcp\" or \"udp\""))?;
        Ok(VipId {
            addr: sock.ip(),
            port: sock.port(),
            proto,
        })
    }
}

impl Serialize for VipId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VipId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A string that does not parse as the thing it should name.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{input:?} is not a valid {what}: {reason}")]
pub struct ParseError {
    pub what: &'static str,
    pub input: String,
    pub reason: &'static str,
}

impl ParseError {
    pub(crate) fn new(what: &'static str, input: &str, reason: &'static str) -> Self {
        Self {
            what,
            input: input.to_owned(),
            reason,
        }
    }
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

fn default_ring_size() -> u32 {
    DEFAULT_RING_SIZE
}

/// One backend of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    #[serde(rename = "address")]
    pub addr: IpAddr,
    /// `0..=MAX_WEIGHT`; 0 takes no new flows, existing ones stay.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Draining: no new flows, existing ones stay. Kept apart from the weight so undraining
    /// restores it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drain: bool,
    /// Health check; the VIP's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

impl BackendSpec {
    pub fn new(addr: IpAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            drain: false,
            check: None,
        }
    }

    /// The weight new flows see: 0 while draining.
    pub fn effective_weight(&self) -> u32 {
        if self.drain { 0 } else { self.weight }
    }
}

/// One VIP and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSpec {
    #[serde(rename = "address")]
    pub id: VipId,
    /// Maglev table size: a prime in `MIN_RING_SIZE..=MAX_RING_SIZE`, at least the number of
    /// backends.
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    #[serde(default)]
    pub hash: HashMode,
    /// Tunnel to the backends; IPIP when absent.
    #[serde(default)]
    pub encap: Encap,
    /// Health check of its backends (each may have its own); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckSpec>,
    /// In the order given; addresses are unique.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

impl VipSpec {
    /// A VIP with the default table size and hash and no backends.
    pub fn new(id: VipId) -> Self {
        Self {
            id,
            ring_size: DEFAULT_RING_SIZE,
            hash: HashMode::default(),
            encap: Encap::default(),
            check: None,
            backends: Vec::new(),
        }
    }

    /// The check a backend gets: its own, else the VIP's; `None` when it is not checked.
    pub fn check_of<'a>(&'a self, backend: &'a BackendSpec) -> Option<&'a CheckSpec> {
        backend
            .check
            .as_ref()
            .or(self.check.as_ref())
            .filter(|c| c.kind != CheckKind::None)
    }

    pub fn backend(&self, addr: IpAddr) -> Option<&BackendSpec> {
        self.backends.iter().find(|b| b.addr == addr)
    }

    /// This VIP's Maglev table; entries index `self.backends`.
    pub fn maglev_table(&self) -> Vec<u32> {
        let weighted: Vec<maglev::Weighted> = self
            .backends
            .iter()
            .map(|b| maglev::Weighted {
                addr: b.addr,
                weight: b.effective_weight(),
            })
            .collect();
        maglev::build_table(&weighted, self.ring_size)
    }

    /// Checks this VIP on its own (not against other VIPs or the global limits).
    pub fn validate(&self) -> Result<(), ModelError> {
        check_vip(self, &Where::Key(self.id))
    }
}

/// Everything lbd should install: VIPs by identity.
///
/// Serialized as `{ vip = [ VipSpec, ... ] }` in identity order, the shape of the config file's
/// VIP list; deserializing validates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StateFile", into = "StateFile")]
pub struct DesiredState {
    /// Each key equals its spec's `id`.
    pub vips: BTreeMap<VipId, VipSpec>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    #[serde(default)]
    vip: Vec<VipSpec>,
}

impl TryFrom<StateFile> for DesiredState {
    type Error = ModelError;

    fn try_from(file: StateFile) -> Result<Self, ModelError> {
        DesiredState::from_vips(file.vip)
    }
}

impl From<DesiredState> for StateFile {
    fn from(state: DesiredState) -> Self {
        StateFile {
            vip: state.into_vips(),
        }
    }
}

impl DesiredState {
    /// Builds and validates a state from a list (such as a file's), naming problems by position
    /// in the list.
    pub fn from_vips(vips: Vec<VipSpec>) -> Result<Self, ModelError> {
        let mut seen: BTreeMap<VipId, usize> = BTreeMap::new();
        for (i, vip) in vips.iter().enumerate() {
            check_vip(vip, &Where::Index(i))?;
            if let Some(&first) = seen.get(&vip.id) {
                return Err(ModelError::DuplicateVip {
                    at: format!("vip[{i}]"),
                    id: vip.id,
                    first: format!("vip[{first}]"),
                });
            }
            seen.insert(vip.id, i);
        }
        let state = DesiredState {
            vips: vips.into_iter().map(|v| (v.id, v)).collect(),
        };
        state.check_limits(0, 0)?;
        Ok(state)
    }

    /// The VIPs in identity order.
    pub fn into_vips(self) -> Vec<VipSpec> {
        self.vips.into_values().collect()
    }

    /// Checks every VIP and the global limits.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (id, vip) in &self.vips {
            if *id != vip.id {
                return Err(ModelError::KeyMismatch {
                    key: *id,
                    id: vip.id,
                });
            }
            check_vip(vip, &Where::Key(*id))?;
        }
        self.check_limits(0, 0)
    }

    /// Every backend address, over all VIPs, sorted and without repeats.
    pub fn backend_addrs(&self) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> = self
            .vips
            .values()
            .flat_map(|v| v.backends.iter().map(|b| b.addr))
            .collect();
        addrs.sort_unstable();
        addrs.dedup();
        addrs
    }

    /// Backends over all VIPs: each takes one data-plane slot.
    pub fn backend_count(&self) -> usize {
        self.vips.values().map(|v| v.backends.len()).sum()
    }

    pub fn vip(&self, id: &VipId) -> Option<&VipSpec> {
        self.vips.get(id)
    }

    /// Adds a new VIP (with its backends).
    pub fn add_vip(&mut self, spec: VipSpec) -> Result<(), ModelError> {
        if self.vips.contains_key(&spec.id) {
            return Err(ModelError::VipExists { id: spec.id });
        }
        spec.validate()?;
        self.check_limits(1, spec.backends.len())?;
        self.vips.insert(spec.id, spec);
        Ok(())
    }

    /// Replaces an existing VIP whole (table size, hash mode, backends); returns the old spec.
    pub fn replace_vip(&mut self, spec: VipSpec) -> Result<VipSpec, ModelError> {
        let old = self.existing(&spec.id)?;
        spec.validate()?;
        self.check_limits(0, spec.backends.len().saturating_sub(old.backends.len()))?;
        Ok(self.vips.insert(spec.id, spec).expect("checked above"))
    }

    /// Removes a VIP; returns its spec.
    pub fn del_vip(&mut self, id: &VipId) -> Result<VipSpec, ModelError> {
        self.vips
            .remove(id)
            .ok_or(ModelError::NoSuchVip { id: *id })
    }

    /// Adds a backend to an existing VIP.
    pub fn add_backend(&mut self, vip: &VipId, backend: BackendSpec) -> Result<(), ModelError> {
        let spec = self.existing(vip)?;
        if spec.backend(backend.addr).is_some() {
            return Err(ModelError::BackendExists {
                vip: *vip,
                addr: backend.addr,
            });
        }
        let mut new = spec.clone();
        new.backends.push(backend);
        new.validate()?;
        self.check_limits(0, 1)?;
        self.vips.insert(*vip, new);
        Ok(())
    }

    /// Removes a backend from a VIP; returns it.
    pub fn del_backend(&mut self, vip: &VipId, addr: IpAddr) -> Result<BackendSpec, ModelError> {
        let spec = self.existing(vip)?;
        let i = backend_index(spec, addr)?;
        Ok(self
            .vips
            .get_mut(vip)
            .expect("checked above")
            .backends
            .remove(i))
    }

    /// Sets a backend's weight (0 drains it); returns the old weight.
    pub fn set_weight(
        &mut self,
        vip: &VipId,
        addr: IpAddr,
        weight: u32,
    ) -> Result<u32, ModelError> {
        let spec = self.existing(vip)?;
        let i = backend_index(spec, addr)?;
        check_weight(weight, || backend_path(&Where::Key(*vip), i, addr))?;
        let backend = &mut self.vips.get_mut(vip).expect("checked above").backends[i];
        Ok(std::mem::replace(&mut backend.weight, weight))
    }

    /// Drains (`true`) or undrains a backend; returns whether it was draining.
    pub fn set_drain(
        &mut self,
        vip: &VipId,
        addr: IpAddr,
        drain: bool,
    ) -> Result<bool, ModelError> {
        let spec = self.existing(vip)?;
        let i = backend_index(spec, addr)?;
        let backend = &mut self.vips.get_mut(vip).expect("checked above").backends[i];
        Ok(std::mem::replace(&mut backend.drain, drain))
    }

    /// Sets (or with `None` clears) the check of a VIP, or of one of its backends.
    pub fn set_check(
        &mut self,
        vip: &VipId,
        backend: Option<IpAddr>,
        check: Option<CheckSpec>,
    ) -> Result<(), ModelError> {
        let mut spec = self.existing(vip)?.clone();
        match backend {
            Some(addr) => {
                let i = backend_index(&spec, addr)?;
                spec.backends[i].check = check;
            }
            None => spec.check = check,
        }
        spec.validate()?;
        self.vips.insert(*vip, spec);
        Ok(())
    }

    /// Changes a VIP's table size, hash mode and (when given) encapsulation, keeping its
    /// backends; returns the old spec.
    pub fn set_vip_options(
        &mut self,
        vip: &VipId,
        ring_size: u32,
        hash: HashMode,
        encap: Option<Encap>,
    ) -> Result<VipSpec, ModelError> {
        let old = self.existing(vip)?;
        let spec = VipSpec {
            ring_size,
            hash,
            encap: encap.unwrap_or(old.encap),
            ..old.clone()
        };
        self.replace_vip(spec)
    }

    fn existing(&self, id: &VipId) -> Result<&VipSpec, ModelError> {
        self.vips.get(id).ok_or(ModelError::NoSuchVip { id: *id })
    }

    /// Checks the data plane's hard limits as they would be after adding `vips` VIPs and
    /// `backends` backends (the operator's limits are [`Limits`], checked by the caller).
    fn check_limits(&self, vips: usize, backends: usize) -> Result<(), ModelError> {
        let vips = self.vips.len() + vips;
        if vips > MAX_VIPS as usize {
            return Err(ModelError::TooManyVips {
                count: vips,
                limit: MAX_VIPS,
                setting: HARD_LIMIT,
            });
        }
        let backends = self.backend_count() + backends;
        if backends > MAX_BACKENDS as usize {
            return Err(ModelError::TooManyBackends {
                count: backends,
                limit: MAX_BACKENDS,
                setting: HARD_LIMIT,
            });
        }
        Ok(())
    }
}

/// How errors name a hard limit (the operator's limits are named by their setting).
const HARD_LIMIT: &str = "the data plane's maximum";

/// The operator's maximums (`[settings]` `max_vips`, `max_backends`, `max_backends_per_vip`),
/// at most the data plane's hard limits ([`Limits::HARD`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vips: u32,
    /// Backends over all VIPs (each takes a data-plane slot).
    pub max_backends: u32,
    pub max_backends_per_vip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self::HARD
    }
}

impl Limits {
    /// What the data plane has room for: `LB_VIPS` and `LB_BACKENDS` sizes. One VIP could in
    /// principle hold every backend slot.
    pub const HARD: Limits = Limits {
        max_vips: MAX_VIPS,
        max_backends: MAX_BACKENDS,
        max_backends_per_vip: MAX_BACKENDS,
    };

    /// Refuses a state above any limit (a config file, the state lbd starts with).
    pub fn check(&self, state: &DesiredState) -> Result<(), ModelError> {
        self.check_change(&DesiredState::default(), state)
    }

    /// Refuses a change that takes a count above its limit. A count that was already above
    /// (limits lowered under a running state) may stay or shrink, so such a state can still
    /// be brought back within its limits one change at a time.
    pub fn check_change(&self, old: &DesiredState, new: &DesiredState) -> Result<(), ModelError> {
        let grows_past = |old: usize, new: usize, limit: u32| new > limit as usize && new > old;
        if grows_past(old.vips.len(), new.vips.len(), self.max_vips) {
            return Err(ModelError::TooManyVips {
                count: new.vips.len(),
                limit: self.max_vips,
                setting: "settings.max_vips",
            });
        }
        if grows_past(old.backend_count(), new.backend_count(), self.max_backends) {
            return Err(ModelError::TooManyBackends {
                count: new.backend_count(),
                limit: self.max_backends,
                setting: "settings.max_backends",
            });
        }
        for (id, vip) in &new.vips {
            let before = old.vip(id).map_or(0, |v| v.backends.len());
            if grows_past(before, vip.backends.len(), self.max_backends_per_vip) {
                return Err(ModelError::TooManyBackendsPerVip {
                    at: vip_path(&Where::Key(*id)),
                    count: vip.backends.len(),
                    limit: self.max_backends_per_vip,
                });
            }
        }
        Ok(())
    }
}

fn backend_index(spec: &VipSpec, addr: IpAddr) -> Result<usize, ModelError> {
    spec.backends
        .iter()
        .position(|b| b.addr == addr)
        .ok_or(ModelError::NoSuchBackend { vip: spec.id, addr })
}

/// How error paths name VIPs and backends.
enum Where {
    /// Position in a list (a file).
    Index(usize),
    /// Identity (a request, or the state as a map).
    Key(VipId),
}

fn vip_path(at: &Where) -> String {
    match at {
        Where::Index(i) => format!("vip[{i}]"),
        Where::Key(id) => format!("vip[\"{id}\"]"),
    }
}

fn backend_path(at: &Where, index: usize, addr: IpAddr) -> String {
    match at {
        Where::Index(_) => format!("{}.backends[{index}]", vip_path(at)),
        Where::Key(_) => format!("{}.backends[\"{addr}\"]", vip_path(at)),
    }
}

/// Why an address cannot be a VIP or backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadAddress {
    Unspecified,
    Multicast,
    Broadcast,
}

impl fmt::Display for BadAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadAddress::Unspecified => "the unspecified address",
            BadAddress::Multicast => "a multicast address",
            BadAddress::Broadcast => "the broadcast address",
        })
    }
}

fn bad_address(addr: IpAddr) -> Option<BadAddress> {
    if addr.is_unspecified() {
        Some(BadAddress::Unspecified)
    } else if addr.is_multicast() {
        Some(BadAddress::Multicast)
    } else if matches!(addr, IpAddr::V4(a) if a.is_broadcast()) {
        Some(BadAddress::Broadcast)
    } else {
        None
    }
}

fn check_weight(weight: u32, path: impl FnOnce() -> String) -> Result<(), ModelError> {
    if weight > MAX_WEIGHT {
        return Err(ModelError::WeightOutOfRange { at: path(), weight });
    }
    Ok(())
}

fn check_check(check: Option<&CheckSpec>, path: impl FnOnce() -> String) -> Result<(), ModelError> {
    match check.and_then(CheckSpec::problem) {
        Some((field, reason)) => Err(ModelError::BadCheck {
            at: path(),
            field,
            reason,
        }),
        None => Ok(()),
    }
}

fn check_vip(vip: &VipSpec, at: &Where) -> Result<(), ModelError> {
    let path = vip_path(at);
    let id = vip.id;
    if let Some(why) = bad_address(id.addr) {
        return Err(ModelError::BadVipAddress {
            at: path,
            addr: id.addr,
            why,
        });
    }
    if id.port == 0 {
        return Err(ModelError::PortZero { at: path });
    }
    let size = vip.ring_size;
    if !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&size) {
        return Err(ModelError::RingSizeOutOfRange { at: path, size });
    }
    if !maglev::is_prime(size) {
        return Err(ModelError::RingSizeNotPrime {
            at: path,
            size,
            next: maglev::next_prime_at_least(size).unwrap_or(MAX_RING_SIZE),
        });
    }
    check_check(vip.check.as_ref(), || path.clone())?;
    if vip.backends.len() > size as usize {
        return Err(ModelError::RingTooSmall {
            at: path,
            size,
            backends: vip.backends.len(),
        });
    }
    for (i, b) in vip.backends.iter().enumerate() {
        let bpath = || backend_path(at, i, b.addr);
        if let Some(why) = bad_address(b.addr) {
            return Err(ModelError::BadBackendAddress {
                at: bpath(),
                addr: b.addr,
                why,
            });
        }
        // Any family mix: the outer header takes the backend's family, whatever the VIP's.
        check_weight(b.weight, bpath)?;
        check_check(b.check.as_ref(), bpath)?;
        if let Some(first) = vip.backends[..i].iter().position(|o| o.addr == b.addr) {
            return Err(ModelError::DuplicateBackend {
                at: bpath(),
                addr: b.addr,
                first: backend_path(at, first, b.addr),
            });
        }
    }
    Ok(())
}

/// A desired state, or a change to it, that lbd refuses.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ModelError {
    #[error("{at}.address: {addr} is {why} and cannot be a VIP")]
    BadVipAddress {
        at: String,
        addr: IpAddr,
        why: BadAddress,
    },
    #[error("{at}.address: port 0 is not a valid VIP port")]
    PortZero { at: String },
    #[error("{at}.ring_size: {size} is out of range {MIN_RING_SIZE}..={MAX_RING_SIZE}")]
    RingSizeOutOfRange { at: String, size: u32 },
    #[error("{at}.ring_size: {size} is not prime (the next prime is {next})")]
    RingSizeNotPrime { at: String, size: u32, next: u32 },
    #[error("{at}.ring_size: {size} is smaller than the number of backends ({backends})")]
    RingTooSmall {
        at: String,
        size: u32,
        backends: usize,
    },
    #[error("{at}.address: {addr} is {why} and cannot be a backend")]
    BadBackendAddress {
        at: String,
        addr: IpAddr,
        why: BadAddress,
    },
    #[error("{at}.weight: {weight} is out of range 0..={MAX_WEIGHT}")]
    WeightOutOfRange { at: String, weight: u32 },
    #[error("{at}.check.{field}: {reason}")]
    BadCheck {
        at: String,
        field: &'static str,
        reason: String,
    },
    #[error("{at}.address: backend {addr} is a duplicate of {first}")]
    DuplicateBackend {
        at: String,
        addr: IpAddr,
        first: String,
    },
    #[error("{at}.address: VIP \"{id}\" is a duplicate of {first}")]
    DuplicateVip {
        at: String,
        id: VipId,
        first: String,
    },
    /// `setting` names the limit: `settings.max_vips`, or the data plane's maximum.
    #[error("vip: {count} VIPs exceed the limit of {limit} ({setting})")]
    TooManyVips {
        count: usize,
        limit: u32,
        setting: &'static str,
    },
    #[error("backends: {count} backends over all VIPs exceed the limit of {limit} ({setting})")]
    TooManyBackends {
        count: usize,
        limit: u32,
        setting: &'static str,
    },
    #[error(
        "{at}.backends: {count} backends exceed the limit of {limit} per VIP \
         (settings.max_backends_per_vip)"
    )]
    TooManyBackendsPerVip {
        at: String,
        count: usize,
        limit: u32,
    },
    #[error("vip[\"{id}\"]: already exists")]
    VipExists { id: VipId },
    #[error("vip[\"{id}\"]: no such VIP")]
    NoSuchVip { id: VipId },
    #[error("vip[\"{vip}\"].backends[\"{addr}\"]: already exists")]
    BackendExists { vip: VipId, addr: IpAddr },
    #[error("vip[\"{vip}\"].backends[\"{addr}\"]: no such backend")]
    NoSuchBackend { vip: VipId, addr: IpAddr },
    #[error("vip[\"{key}\"]: filed under a different identity than its address \"{id}\"")]
    KeyMismatch { key: VipId, id: VipId },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> VipId {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn vip(s: &str, backends: &[(&str, u32)]) -> VipSpec {
        VipSpec {
            backends: backends
                .iter()
                .map(|&(a, w)| BackendSpec::new(ip(a), w))
                .collect(),
            ..VipSpec::new(id(s))
        }
    }

    fn err(vips: Vec<VipSpec>) -> String {
        DesiredState::from_vips(vips).unwrap_err().to_string()
    }

    #[test]
    fn names_round_trip() {
        for s in [
            "10.0.0.100:80/tcp",
            "[2001:db8::1]:443/udp",
            "192.0.2.1:65535/udp",
        ] {
            assert_eq!(id(s).to_string(), s);
        }
        let v6 = id("[2001:db8::1]:443/udp");
        assert_eq!(
            (v6.addr, v6.port, v6.proto),
            (ip("2001:db8::1"), 443, Protocol::Udp)
        );
        for p in [Protocol::Tcp, Protocol::Udp] {
            assert_eq!(p.to_string().parse::<Protocol>(), Ok(p));
        }
        for h in [HashMode::FiveTuple, HashMode::SrcIp] {
            assert_eq!(h.to_string().parse::<HashMode>(), Ok(h));
        }
        assert_eq!(Protocol::Udp.number(), PROTO_UDP);
        assert_eq!(HashMode::SrcIp.vip_flags(), VIP_F_HASH_SRC_ONLY);
        assert_eq!(
            id("10.0.0.1:80/tcp").key(),
            VipKey::new(ip("10.0.0.1"), 80, PROTO_TCP)
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for s in [
            "10.0.0.1:80",
            "10.0.0.1/tcp",
            "10.0.0.1:80/sctp",
            "2001:db8::1:80/tcp",
            "",
            "x:1/tcp",
        ] {
            let e = s.parse::<VipId>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{s:?} is not a valid VIP")), "{e}");
        }
        assert!(
            "sctp"
                .parse::<Protocol>()
                .unwrap_err()
                .to_string()
                .contains("\"tcp\" or \"udp\"")
        );
        assert!("5-tuple".parse::<HashMode>().is_err());
    }

    #[test]
    fn serde_forms_are_plain() {
        let state =
            DesiredState::from_vips(vec![vip("10.0.0.1:80/tcp", &[("10.1.0.1", 5)])]).unwrap();
        let text = toml::to_string(&state).unwrap();
        assert!(text.contains("address = \"10.0.0.1:80/tcp\""), "{text}");
        assert!(text.contains("hash = \"5tuple\""), "{text}");
        assert_eq!(toml::from_str::<DesiredState>(&text).unwrap(), state);
        // Defaults fill what a request leaves out.
        let spec: VipSpec = toml::from_str(
            "address = \"10.0.0.1:80/udp\"\nbackends = [{ address = \"10.1.0.1\" }]",
        )
        .unwrap();
        assert_eq!(spec.ring_size, DEFAULT_RING_SIZE);
        assert_eq!(spec.hash, HashMode::FiveTuple);
        assert_eq!(spec.backends[0].weight, DEFAULT_WEIGHT);
        // Deserializing a state validates it.
        let bad = "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 8\n";
        let e = toml::from_str::<DesiredState>(bad).unwrap_err().to_string();
        assert!(
            e.contains("vip[0].ring_size: 8 is out of range")
                || e.contains("vip[0].ring_size: 8 is not prime"),
            "{e}"
        );
    }

    /// One VIP with one problem each, and the start of the message it must get as `vip[0]`.
    fn broken_vips() -> Vec<(VipSpec, &'static str)> {
        vec![
            (
                vip("0.0.0.0:80/tcp", &[]),
                "vip[0].address: 0.0.0.0 is the unspecified address and cannot be a VIP",
            ),
            (
                vip("224.0.0.1:80/tcp", &[]),
                "vip[0].address: 224.0.0.1 is a multicast address and cannot be a VIP",
            ),
            (
                vip("255.255.255.255:80/tcp", &[]),
                "vip[0].address: 255.255.255.255 is the broadcast address",
            ),
            (
                vip("[ff02::1]:80/tcp", &[]),
                "vip[0].address: ff02::1 is a multicast address and cannot be a VIP",
            ),
            (
                vip("[2001:db8::1]:0/udp", &[]),
                "vip[0].address: port 0 is not a valid VIP port",
            ),
            (
                vip("10.0.0.1:0/tcp", &[]),
                "vip[0].address: port 0 is not a valid VIP port",
            ),
            (
                VipSpec {
                    ring_size: 5,
                    ..vip("10.0.0.1:80/tcp", &[])
                },
                "vip[0].ring_size: 5 is out of range 7..=1048573",
            ),
            (
                VipSpec {
                    ring_size: 1_048_583,
                    ..vip("10.0.0.1:80/tcp", &[])
                },
                "vip[0].ring_size: 1048583 is out of range",
            ),
            (
                VipSpec {
                    ring_size: 65_536,
                    ..vip("10.0.0.1:80/tcp", &[])
                },
                "vip[0].ring_size: 65536 is not prime (the next prime is 65537)",
            ),
            (
                VipSpec {
                    ring_size: 7,
                    ..vip(
                        "10.0.0.1:80/tcp",
                        &[
                            ("10.1.0.1", 1),
                            ("10.1.0.2", 1),
                            ("10.1.0.3", 1),
                            ("10.1.0.4", 1),
                            ("10.1.0.5", 1),
                            ("10.1.0.6", 1),
                            ("10.1.0.7", 1),
                            ("10.1.0.8", 1),
                        ],
                    )
                },
                "vip[0].ring_size: 7 is smaller than the number of backends (8)",
            ),
            (
                vip("10.0.0.1:80/tcp", &[("10.1.0.1", 1), ("10.1.0.2", 70_000)]),
                "vip[0].backends[1].weight: 70000 is out of range 0..=65535",
            ),
            (
                vip("10.0.0.1:80/tcp", &[("0.0.0.0", 1)]),
                "vip[0].backends[0].address: 0.0.0.0 is the unspecified address and cannot be a backend",
            ),
            (
                vip("10.0.0.1:80/tcp", &[("239.1.1.1", 1)]),
                "vip[0].backends[0].address: 239.1.1.1 is a multicast address",
            ),
            (
                vip("10.0.0.1:80/tcp", &[("255.255.255.255", 1)]),
                "vip[0].backends[0].address: 255.255.255.255 is the broadcast address",
            ),
            (
                vip("[2001:db8::1]:80/tcp", &[("::", 1)]),
                "vip[0].backends[0].address: :: is the unspecified address and cannot be a backend",
            ),
            (
                vip(
                    "[2001:db8::1]:80/tcp",
                    &[("2001:db8::2", 1), ("2001:db8::2", 1)],
                ),
                "vip[0].backends[1].address: backend 2001:db8::2 is a duplicate of vip[0].backends[0]",
            ),
            (
                vip(
                    "10.0.0.1:80/tcp",
                    &[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.1", 3)],
                ),
                "vip[0].backends[2].address: backend 10.1.0.1 is a duplicate of vip[0].backends[0]",
            ),
        ]
    }

    #[test]
    fn each_error_names_its_field() {
        for (spec, want) in broken_vips() {
            let ok = vip("10.9.0.1:80/tcp", &[]);
            let e = err(vec![ok, spec.clone()]);
            let want = want.replace("vip[0]", "vip[1]");
            assert!(e.starts_with(&want), "got {e:?}, want {want:?}");
            // The same problem found by key, as a request would see it.
            let e = spec.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("vip[\"{}\"]", spec.id)), "{e}");
        }
        let e = err(vec![
            vip("10.0.0.1:80/tcp", &[]),
            vip("10.0.0.2:80/tcp", &[]),
            vip("10.0.0.1:80/tcp", &[]),
        ]);
        assert_eq!(
            e,
            "vip[2].address: VIP \"10.0.0.1:80/tcp\" is a duplicate of vip[0]"
        );
        // Same address, other port or protocol: distinct VIPs.
        DesiredState::from_vips(vec![
            vip("10.0.0.1:80/tcp", &[]),
            vip("10.0.0.1:80/udp", &[]),
            vip("10.0.0.1:81/tcp", &[]),
        ])
        .unwrap();
    }

    #[test]
    fn by_key_paths_name_the_backend() {
        let spec = vip("10.0.0.1:80/tcp", &[("10.1.0.1", 1), ("10.1.0.2", 70_000)]);
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.2\"].weight: 70000 is out of range 0..=65535"
        );
        let mut state = DesiredState::default();
        state.vips.insert(spec.id, spec);
        assert!(
            state
                .validate()
                .unwrap_err()
                .to_string()
                .starts_with("vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.2\"]")
        );
        let mut state = DesiredState::default();
        state
            .vips
            .insert(id("10.0.0.2:80/tcp"), vip("10.0.0.1:80/tcp", &[]));
        assert!(matches!(
            state.validate(),
            Err(ModelError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn limits() {
        let many: Vec<VipSpec> = (0..=MAX_VIPS)
            .map(|i| vip(&format!("10.0.{}.{}:80/tcp", i / 256, i % 256), &[]))
            .collect();
        assert_eq!(
            err(many.clone()),
            format!(
                "vip: {} VIPs exceed the limit of {MAX_VIPS} (the data plane's maximum)",
                MAX_VIPS + 1
            )
        );
        let mut state = DesiredState::from_vips(many[..MAX_VIPS as usize].to_vec()).unwrap();
        let before = state.clone();
        assert_eq!(
            state.add_vip(many[MAX_VIPS as usize].clone()),
            Err(ModelError::TooManyVips {
                count: MAX_VIPS as usize + 1,
                limit: MAX_VIPS,
                setting: HARD_LIMIT,
            })
        );
        assert_eq!(state, before);

        // 8192 backends over 2 VIPs fit; one more does not.
        let backends = |base: u8, n: u32| -> VipSpec {
            let mut v = VipSpec::new(id(&format!("10.0.0.{base}:80/tcp")));
            v.backends = (0..n)
                .map(|i| BackendSpec::new(IpAddr::from([10, base, (i >> 8) as u8, i as u8]), 1))
                .collect();
            v
        };
        let half = MAX_BACKENDS / 2;
        let mut state =
            DesiredState::from_vips(vec![backends(1, half), backends(2, half)]).unwrap();
        assert_eq!(state.backend_count(), MAX_BACKENDS as usize);
        let before = state.clone();
        let e = state
            .add_backend(
                &id("10.0.0.1:80/tcp"),
                BackendSpec::new(ip("10.200.0.1"), 1),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "backends: {} backends over all VIPs exceed the limit of {MAX_BACKENDS} \
                 (the data plane's maximum)",
                MAX_BACKENDS + 1
            )
        );
        assert_eq!(
            state.add_vip(backends(3, 1)),
            Err(ModelError::TooManyBackends {
                count: MAX_BACKENDS as usize + 1,
                limit: MAX_BACKENDS,
                setting: HARD_LIMIT,
            })
        );
        assert_eq!(state, before);
        let e = err(vec![backends(1, half), backends(2, half + 1)]);
        assert!(e.starts_with("backends: 8193 backends"), "{e}");
    }

    /// The operator's limits: a change that grows a count past its limit is refused with the
    /// setting named; one that keeps or shrinks a count already above it passes.
    #[test]
    fn configured_limits() {
        let limits = Limits {
            max_vips: 2,
            max_backends: 3,
            max_backends_per_vip: 2,
        };
        let a = vip("10.0.0.1:80/tcp", &[("10.1.0.1", 1), ("10.1.0.2", 1)]);
        let b = vip("10.0.0.2:80/tcp", &[("10.1.0.3", 1)]);
        let c = vip("10.0.0.3:80/tcp", &[]);
        let two = DesiredState::from_vips(vec![a.clone(), b.clone()]).unwrap();
        limits.check(&two).unwrap();
        assert_eq!(Limits::default(), Limits::HARD);
        Limits::HARD.check(&two).unwrap();

        let three = DesiredState::from_vips(vec![a.clone(), b.clone(), c]).unwrap();
        assert_eq!(
            limits.check_change(&two, &three).unwrap_err().to_string(),
            "vip: 3 VIPs exceed the limit of 2 (settings.max_vips)"
        );
        let mut more = two.clone();
        more.add_backend(&b.id, BackendSpec::new(ip("10.1.0.4"), 1))
            .unwrap();
        assert_eq!(
            limits.check_change(&two, &more).unwrap_err().to_string(),
            "backends: 4 backends over all VIPs exceed the limit of 3 (settings.max_backends)"
        );
        let wide = DesiredState::from_vips(vec![vip(
            "10.0.0.1:80/tcp",
            &[("10.1.0.1", 1), ("10.1.0.2", 1), ("10.1.0.3", 1)],
        )])
        .unwrap();
        assert_eq!(
            limits.check(&wide).unwrap_err().to_string(),
            "vip[\"10.0.0.1:80/tcp\"].backends: 3 backends exceed the limit of 2 per VIP \
             (settings.max_backends_per_vip)"
        );
        // Above the limits already (they were lowered): a change that does not grow passes,
        // one that does is refused.
        let tight = Limits {
            max_vips: 1,
            max_backends: 1,
            max_backends_per_vip: 1,
        };
        let mut reweighted = two.clone();
        reweighted.set_weight(&a.id, ip("10.1.0.1"), 5).unwrap();
        tight.check_change(&two, &reweighted).unwrap();
        let mut fewer = two.clone();
        fewer.del_backend(&a.id, ip("10.1.0.2")).unwrap();
        tight.check_change(&two, &fewer).unwrap();
        assert!(tight.check_change(&fewer, &two).is_err());
    }

    #[test]
    fn mutators_apply_or_leave_the_state_alone() {
        let a = id("10.0.0.1:80/tcp");
        let b1 = ip("10.1.0.1");
        let mut state = DesiredState::default();
        state
            .add_vip(vip("10.0.0.1:80/tcp", &[("10.1.0.1", 10)]))
            .unwrap();
        state
            .add_backend(&a, BackendSpec::new(ip("10.1.0.2"), 20))
            .unwrap();
        assert_eq!(state.set_weight(&a, b1, 0), Ok(10));
        assert_eq!(state.vip(&a).unwrap().backend(b1).unwrap().weight, 0);
        state.validate().unwrap();

        let before = state.clone();
        let refusals: Vec<(Result<(), ModelError>, &str)> = vec![
            (
                state.add_vip(vip("10.0.0.1:80/tcp", &[])),
                "vip[\"10.0.0.1:80/tcp\"]: already exists",
            ),
            (
                state.add_vip(vip("10.0.0.2:80/tcp", &[("10.1.0.1", 65_536)])),
                "vip[\"10.0.0.2:80/tcp\"].backends[\"10.1.0.1\"].weight: 65536 is out of range",
            ),
            (
                state.del_vip(&id("10.0.0.9:80/tcp")).map(drop),
                "vip[\"10.0.0.9:80/tcp\"]: no such VIP",
            ),
            (
                state.add_backend(&a, BackendSpec::new(b1, 5)),
                "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.1\"]: already exists",
            ),
            (
                state.add_backend(&a, BackendSpec::new(ip("10.1.0.3"), 65_536)),
                "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.3\"].weight: 65536 is out of range",
            ),
            (
                state.add_backend(&a, BackendSpec::new(ip("ff02::1"), 1)),
                "vip[\"10.0.0.1:80/tcp\"].backends[\"ff02::1\"].address: ff02::1 is a multicast",
            ),
            (
                state.add_backend(&id("10.0.0.9:80/tcp"), BackendSpec::new(b1, 1)),
                "vip[\"10.0.0.9:80/tcp\"]: no such VIP",
            ),
            (
                state.del_backend(&a, ip("10.1.0.9")).map(drop),
                "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.9\"]: no such backend",
            ),
            (
                state.set_weight(&a, ip("10.1.0.9"), 1).map(drop),
                "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.9\"]: no such backend",
            ),
            (
                state.set_weight(&a, b1, 65_536).map(drop),
                "vip[\"10.0.0.1:80/tcp\"].backends[\"10.1.0.1\"].weight: 65536 is out of range 0..=65535",
            ),
            (
                state
                    .replace_vip(VipSpec {
                        ring_size: 9,
                        ..vip("10.0.0.1:80/tcp", &[])
                    })
                    .map(drop),
                "vip[\"10.0.0.1:80/tcp\"].ring_size: 9 is not prime",
            ),
            (
                state.replace_vip(vip("10.0.0.9:80/tcp", &[])).map(drop),
                "vip[\"10.0.0.9:80/tcp\"]: no such VIP",
            ),
        ];
        for (result, want) in refusals {
            let e = result.unwrap_err().to_string();
            assert!(e.starts_with(want), "got {e:?}, want {want:?}");
        }
        assert_eq!(state, before);

        let old = state
            .replace_vip(VipSpec {
                hash: HashMode::SrcIp,
                ..vip("10.0.0.1:80/tcp", &[("10.1.0.7", 1)])
            })
            .unwrap();
        assert_eq!(old.backends.len(), 2);
        assert_eq!(state.vip(&a).unwrap().hash, HashMode::SrcIp);
        assert_eq!(
            state.del_backend(&a, ip("10.1.0.7")),
            Ok(BackendSpec::new(ip("10.1.0.7"), 1))
        );
        assert!(state.vip(&a).unwrap().backends.is_empty());
        assert_eq!(state.del_vip(&a).map(|v| v.id), Ok(a));
        assert_eq!(state, DesiredState::default());
    }

    /// IPv6 VIPs are served, and a VIP's backends may be of either family (the outer header
    /// takes the backend's): IPv4 VIPs on IPv6 backends too.
    #[test]
    fn ipv6_and_mixed_families_are_accepted() {
        let mixed = [
            vip(
                "[2001:db8::1]:443/tcp",
                &[("2001:db8:1::1", 1), ("10.1.0.1", 1)],
            ),
            vip(
                "10.0.0.1:80/tcp",
                &[("2001:db8:1::2", 1), ("2001:db8:1::3", 1)],
            ),
            vip("[2001:db8::1]:53/udp", &[("10.1.0.2", 1)]),
        ];
        let state = DesiredState::from_vips(mixed.to_vec()).unwrap();
        state.validate().unwrap();
        assert_eq!(state.backend_count(), 5);
        let v6 = id("[2001:db8::1]:443/tcp");
        assert_eq!(
            state.vip(&v6).unwrap().id.key(),
            VipKey::new(ip("2001:db8::1"), 443, PROTO_TCP)
        );
        assert_eq!(v6.key().family, lb_common::keys::FAMILY_V6);
        // By key too, as requests are checked, and through the file form.
        let mut added = DesiredState::default();
        added.add_vip(vip("[2001:db8::9]:80/tcp", &[])).unwrap();
        added
            .add_backend(
                &id("[2001:db8::9]:80/tcp"),
                BackendSpec::new(ip("10.1.0.9"), 1),
            )
            .unwrap();
        let text = toml::to_string(&state).unwrap();
        assert!(
            text.contains("address = \"[2001:db8::1]:443/tcp\""),
            "{text}"
        );
        assert_eq!(toml::from_str::<DesiredState>(&text).unwrap(), state);
    }

    #[test]
    fn encap_defaults_to_ipip_and_round_trips() {
        assert_eq!(VipSpec::new(id("10.0.0.1:80/tcp")).encap, Encap::Ipip);
        for e in [Encap::Ipip, Encap::Gue] {
            assert_eq!(e.to_string().parse::<Encap>(), Ok(e));
        }
        assert_eq!(Encap::Ipip.slot_kind(), ENCAP_IPIP);
        assert_eq!(Encap::Gue.slot_kind(), ENCAP_GUE);
        let e = "vxlan".parse::<Encap>().unwrap_err().to_string();
        assert!(e.contains("\"ipip\" or \"gue\""), "{e}");
        let spec: VipSpec =
            toml::from_str("address = \"10.0.0.1:80/udp\"\nencap = \"gue\"").unwrap();
        assert_eq!(spec.encap, Encap::Gue);
        let text = toml::to_string(&spec).unwrap();
        assert!(text.contains("encap = \"gue\""), "{text}");
        let e = toml::from_str::<VipSpec>("address = \"10.0.0.1:80/udp\"\nencap = \"GUE\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `GUE`"), "{e}");

        // Changing the options keeps the encapsulation unless one is given.
        let a = id("10.0.0.1:80/tcp");
        let mut state = DesiredState::from_vips(vec![VipSpec {
            encap: Encap::Gue,
            ..vip("10.0.0.1:80/tcp", &[("10.1.0.1", 1)])
        }])
        .unwrap();
        state
            .set_vip_options(&a, 251, HashMode::SrcIp, None)
            .unwrap();
        assert_eq!(state.vip(&a).unwrap().encap, Encap::Gue);
        let old = state
            .set_vip_options(&a, 251, HashMode::SrcIp, Some(Encap::Ipip))
            .unwrap();
        assert_eq!(old.encap, Encap::Gue);
        assert_eq!(state.vip(&a).unwrap().encap, Encap::Ipip);
        assert_eq!(state.vip(&a).unwrap().backends.len(), 1);
    }

    #[test]
    fn maglev_table_indexes_the_backends() {
        let spec = VipSpec {
            ring_size: 13,
            ..vip(
                "10.0.0.1:80/tcp",
                &[("10.1.0.1", 1), ("10.1.0.2", 0), ("10.1.0.3", 1)],
            )
        };
        let table = spec.maglev_table();
        assert_eq!(table.len(), 13);
        assert!(table.iter().all(|&e| e == 0 || e == 2), "{table:?}");
    }
}
