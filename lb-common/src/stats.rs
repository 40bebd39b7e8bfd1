//! Counters: one typed enum indexes `LB_GLOBAL_STATS`, and one `DropReason` enum serves the data
//! plane, the metrics labels and the documentation.

/// Why the data plane dropped a packet addressed to a VIP.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// IPv4 header with IHL < 5, a version other than 4, or a total length that does not fit;
    /// IPv6 header with a version other than 6, or a payload length of zero (a jumbogram) or
    /// one that does not fit.
    BadIpHeader = 0,
    /// IPv4 options (IHL > 5), or IPv6 extension headers (hop-by-hop, routing, destination
    /// options): not forwarded, as in Katran.
    IpOptions = 1,
    /// IPv4 fragment (MF set or non-zero offset), or an IPv6 fragment header: the L4 ports are
    /// not in every fragment.
    Fragment = 2,
    /// TCP, UDP, ICMP or ICMPv6 header cut short, or TCP data offset < 5.
    BadL4Header = 3,
    /// A VIP address with a protocol no VIP serves (not TCP or UDP), or an ICMP message the
    /// balancer does not handle (echo requests while echo replies are off included).
    UnsupportedProtocol = 4,
    /// The VIP has no usable backend.
    NoBackend = 5,
    /// Growing the packet for the outer header failed.
    EncapFailed = 6,
    /// The backend slot names no egress interface the program can reach.
    NoRoute = 7,
    /// An ICMP or ICMPv6 error to a VIP address whose quoted packet is cut short, has IPv4
    /// options or IPv6 extension headers, is not TCP or UDP, or is not from a VIP.
    BadIcmp = 8,
    /// Encapsulated, the packet would exceed the egress interface's MTU, and too-big replies
    /// are off (`CFG_F_TOO_BIG_REPLY`).
    TooBig = 9,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::BadIpHeader,
        DropReason::IpOptions,
        DropReason::Fragment,
        DropReason::BadL4Header,
        DropReason::UnsupportedProtocol,
        DropReason::NoBackend,
        DropReason::EncapFailed,
        DropReason::NoRoute,
        DropReason::BadIcmp,
        DropReason::TooBig,
    ];

    /// The metric label and documentation name.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::IpOptions => "ip_options",
            DropReason::Fragment => "fragment",
            DropReason::BadL4Header => "bad_l4_header",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::NoBackend => "no_backend",
            DropReason::EncapFailed => "encap_failed",
            DropReason::NoRoute => "no_route",
            DropReason::BadIcmp => "bad_icmp",
            DropReason::TooBig => "too_big",
        }
    }
}

/// Global counters: index into `LB_GLOBAL_STATS` (a per-CPU array of u64).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets that were not for a VIP and went on untouched.
    Pass = 0,
    /// Packets sent back out of the ingress interface.
    Tx = 1,
    /// Packets redirected to another interface.
    Redirect = 2,
    /// Packets dropped (also counted by reason below).
    Drop = 3,
    /// New flow entries written.
    NewFlows = 4,
    /// Packets whose flow entry was found and still valid.
    FlowHits = 5,
    /// TCP packets other than a SYN with no valid flow entry (the flow began on another host,
    /// or its backend went away, or its entry was evicted): re-hashed through Maglev. A UDP
    /// datagram with no entry starts a new flow and is not a miss.
    FlowMisses = 6,
    /// ICMP and ICMPv6 errors quoting a VIP flow, sent on to the flow's backend.
    IcmpForwarded = 7,
    /// Echo replies the balancer sent for a VIP address (`CFG_F_ECHO_REPLY`).
    EchoReplies = 8,
    /// Fragmentation-needed or packet-too-big replies sent to clients whose packet would not
    /// fit the egress MTU once encapsulated (`CFG_F_TOO_BIG_REPLY`).
    TooBigReplies = 9,
    /// First of `DropReason::ALL.len()` per-reason drop counters.
    DropBase = 16,
}

/// Number of entries in `LB_GLOBAL_STATS`.
pub const COUNTER_COUNT: u32 = Counter::DropBase as u32 + DropReason::ALL.len() as u32;

impl DropReason {
    /// This reason's index in `LB_GLOBAL_STATS`.
    pub const fn counter_index(self) -> u32 {
        Counter::DropBase as u32 + self as u32
    }
}

/// Value of `LB_VIP_STATS` and `LB_BACKEND_STATS` (per-CPU; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    /// Bytes as received (before encapsulation).
    pub bytes: u64,
    pub new_flows: u64,
}
