//! Next-hop resolution for backends: egress interface, its MAC and the next hop's MAC, read from the
//! kernel's routing and neighbour tables over rtnetlink, and a watcher that says when they may have changed.
//!
//! [`Resolver::resolve`] does what `ip route get <backend>` followed by `ip neigh get` would: the route
//! gives the egress interface and, if the backend is not directly connected, the gateway; the neighbour
//! table gives the MAC of the backend or of that gateway. When that neighbour entry has no usable address
//! the resolver sends an `RTM_NEWNEIGH` with `NTF_USE`, which makes the kernel act as if a packet were
//! waiting for the entry (it creates it if needed and starts ARP or neighbour discovery), then polls the
//! entry for a bounded time. `NTF_USE` is used rather than a UDP datagram to the next hop because it goes
//! through the resolver's own netlink socket: it acts in the namespace the resolver was created in, on
//! whichever thread the task runs, with no source address, socket option or firewall rule involved, and
//! identically for IPv4 and IPv6 (IPv6 solicitations then come from the interface's link-local
//! address, which must have finished duplicate address detection). Packets that lbd forwards bypass
//! the kernel and never confirm an entry, so a STALE entry is used but also sent back to validation
//! the same way; if the next hop no longer answers at that MAC the entry fails and [`Changes`] says so.
//!
//! Everything happens in the network namespace of the thread that creates the [`Resolver`] or calls
//! [`watch_changes`]: netlink sockets stay in the namespace they were opened in.

use std::{fmt, io, net::IpAddr, time::Duration};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    Handle,
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkAttribute, LinkLayerType},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia},
    },
};
use tokio::{
    task::JoinHandle,
    time::{Instant, sleep},
};

mod watch;

pub use watch::{CHANGE_DEBOUNCE, Changes, watch_changes};

/// How long [`Resolver::resolve`] waits for a neighbour to resolve by default. A neighbour on a live
/// link answers within milliseconds; this bounds the wait for one that does not.
pub const DEFAULT_NEIGHBOUR_TIMEOUT: Duration = Duration::from_secs(1);

/// Where to send packets for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface index.
    pub ifindex: u32,
    /// Egress interface name.
    pub ifname: String,
    /// MAC of the egress interface: the outer source MAC.
    pub src_mac: [u8; 6],
    /// MAC of the backend if directly connected, else of the gateway: the outer destination MAC.
    pub dst_mac: [u8; 6],
    /// The gateway the route goes through; `None` when the backend is directly connected.
    pub gateway: Option<IpAddr>,
}

/// The type of a route that exists but cannot carry traffic to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Unreachable,
    Blackhole,
    Prohibit,
    /// The address is one of this host's own.
    Local,
    Broadcast,
    Multicast,
    /// Any other `RTN_*` type, by number.
    Other(u8),
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable => f.write_str("unreachable"),
            Self::Blackhole => f.write_str("blackhole"),
            Self::Prohibit => f.write_str("prohibit"),
            Self::Local => f.write_str("local"),
            Self::Broadcast => f.write_str("broadcast"),
            Self::Multicast => f.write_str("multicast"),
            Self::Other(kind) => write!(f, "type {kind}"),
        }
    }
}

/// The state of a neighbour entry that has no usable link-layer address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeighbourStatus {
    /// No entry at all.
    Missing,
    /// Resolution is under way but no answer came within the timeout.
    Incomplete,
    /// Resolution failed: nothing answered.
    Failed,
    /// Any other `NUD_*` state, or a usable state without an Ethernet address.
    Other(u16),
}

impl fmt::Display for NeighbourStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("missing"),
            Self::Incomplete => f.write_str("incomplete"),
            Self::Failed => f.write_str("failed"),
            Self::Other(state) => write!(f, "state {state:#x} without an Ethernet address"),
        }
    }
}

/// Why a backend has no usable next hop. Every variant but `Runtime`, `Socket` and `Netlink` is a fact
/// about the kernel's tables, not a failure of the resolver.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("next-hop resolution needs a Tokio runtime")]
    Runtime(#[source] tokio::runtime::TryCurrentError),
    #[error("opening an rtnetlink socket")]
    Socket(#[source] io::Error),
    #[error("no route to {addr}")]
    NoRoute { addr: IpAddr },
    #[error("the route to {addr} is {kind}")]
    Unreachable { addr: IpAddr, kind: RouteKind },
    #[error("the route to {addr} cannot be used: {reason}")]
    UnsupportedRoute { addr: IpAddr, reason: &'static str },
    #[error("egress interface {ifindex} of the route to {addr} does not exist")]
    LinkNotFound { addr: IpAddr, ifindex: u32 },
    #[error("egress interface {ifname} of the route to {addr} is not Ethernet")]
    NotEthernet { addr: IpAddr, ifname: String },
    #[error("next hop {next_hop} for {addr} on {ifname} is unresolved (neighbour {status})")]
    NeighbourUnresolved {
        addr: IpAddr,
        next_hop: IpAddr,
        ifname: String,
        status: NeighbourStatus,
    },
    #[error("reading the neighbour table for the change watcher")]
    Dump(#[source] rtnetlink::Error),
    #[error("rtnetlink {request} for {addr} failed")]
    Netlink {
        request: &'static str,
        addr: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The egress side of a route: interface and gateway.
struct Route {
    ifindex: u32,
    gateway: Option<IpAddr>,
}

/// Resolves backends to next hops. Owns one rtnetlink connection, served by a task on the current
/// Tokio runtime that ends when the resolver is dropped.
pub struct Resolver {
    handle: Handle,
    _connection: AbortOnDrop,
    neighbour_timeout: Duration,
}

impl Resolver {
    /// Opens a netlink socket in the calling thread's network namespace. Must be called from within a
    /// Tokio runtime, which serves the connection.
    pub fn new() -> Result<Self, ResolveError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(ResolveError::Runtime)?;
        let (connection, handle, _unsolicited) =
            rtnetlink::new_connection().map_err(ResolveError::Socket)?;
        Ok(Self {
            handle,
            _connection: AbortOnDrop(runtime.spawn(connection)),
            neighbour_timeout: DEFAULT_NEIGHBOUR_TIMEOUT,
        })
    }

    /// Sets how long [`Self::resolve`] waits for an unresolved neighbour before giving up.
    #[must_use]
    pub fn with_neighbour_timeout(mut self, timeout: Duration) -> Self {
        self.neighbour_timeout = timeout;
        self
    }

    /// Finds the egress interface, its MAC and the next hop's MAC for `addr`, starting neighbour
    /// resolution and waiting for it (bounded) if the kernel has no usable entry yet.
    pub async fn resolve(&self, addr: IpAddr) -> Result<NextHop, ResolveError> {
        let route = self.route(addr).await?;
        let (ifname, src_mac) = self.link(addr, route.ifindex).await?;
        let next_hop = route.gateway.unwrap_or(addr);
        let dst_mac = self
            .neighbour_mac(addr, next_hop, route.ifindex, &ifname)
            .await?;
        Ok(NextHop {
            ifindex: route.ifindex,
            ifname,
            src_mac,
            dst_mac,
            gateway: route.gateway,
        })
    }

    /// `ip route get addr`: the kernel's own choice, policy rules and multipath included.
    async fn route(&self, addr: IpAddr) -> Result<Route, ResolveError> {
        let mut request = RouteMessage::default();
        let (family, prefix, destination) = match addr {
            IpAddr::V4(v4) => (AddressFamily::Inet, 32, RouteAddress::Inet(v4)),
            IpAddr::V6(v6) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(v6)),
        };
        request.header.address_family = family;
        request.header.destination_prefix_length = prefix;
        request
            .attributes
            .push(RouteAttribute::Destination(destination));
        let reply = self
            .handle
            .route()
            .get(request)
            .execute()
            .try_next()
            .await
            .map_err(|error| route_error(addr, error))?
            .ok_or(ResolveError::NoRoute { addr })?;

        let kind = match reply.header.kind {
            RouteType::Unicast => None,
            RouteType::Unreachable => Some(RouteKind::Unreachable),
            RouteType::BlackHole => Some(RouteKind::Blackhole),
            RouteType::Prohibit => Some(RouteKind::Prohibit),
            RouteType::Local => Some(RouteKind::Local),
            RouteType::Broadcast => Some(RouteKind::Broadcast),
            RouteType::Multicast => Some(RouteKind::Multicast),
            other => Some(RouteKind::Other(other.into())),
        };
        if let Some(kind) = kind {
            return Err(ResolveError::Unreachable { addr, kind });
        }

        let mut ifindex = None;
        let mut gateway = None;
        for attribute in reply.attributes {
            match attribute {
                RouteAttribute::Oif(index) => ifindex = Some(index),
                // `Via` is an IPv4 route through an IPv6 gateway (RFC 5549): it resolves through
                // the IPv6 neighbour table.
                RouteAttribute::Gateway(RouteAddress::Inet(v4))
                | RouteAttribute::Via(RouteVia::Inet(v4)) => gateway = Some(v4.into()),
                RouteAttribute::Gateway(RouteAddress::Inet6(v6))
                | RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(v6.into()),
                RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => {
                    return Err(ResolveError::UnsupportedRoute {
                        addr,
                        reason: "the gateway is not an IP address",
                    });
                }
                _ => {}
            }
        }
        let ifindex = ifindex.ok_or(ResolveError::UnsupportedRoute {
            addr,
            reason: "it has no output interface",
        })?;
        Ok(Route { ifindex, gateway })
    }

    /// Name and MAC of the egress interface.
    async fn link(&self, addr: IpAddr, ifindex: u32) -> Result<(String, [u8; 6]), ResolveError> {
        let reply = self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_next()
            .await;
        let link = match reply {
            Ok(Some(link)) => link,
            Ok(None) => return Err(ResolveError::LinkNotFound { addr, ifindex }),
            Err(error) if netlink_errno(&error) == Some(libc::ENODEV) => {
                return Err(ResolveError::LinkNotFound { addr, ifindex });
            }
            Err(source) => {
                return Err(ResolveError::Netlink {
                    request: "RTM_GETLINK",
                    addr,
                    source,
                });
            }
        };
        let mut ifname = format!("if{ifindex}");
        let mut mac = None;
        for attribute in link.attributes {
            match attribute {
                LinkAttribute::IfName(name) => ifname = name,
                LinkAttribute::Address(bytes) => mac = <[u8; 6]>::try_from(bytes).ok(),
                _ => {}
            }
        }
        match mac {
            Some(mac) if link.header.link_layer_type == LinkLayerType::Ether => Ok((ifname, mac)),
            _ => Err(ResolveError::NotEthernet { addr, ifname }),
        }
    }

    /// MAC of `next_hop` on `ifindex`, resolving it first if the kernel has no usable entry.
    async fn neighbour_mac(
        &self,
        addr: IpAddr,
        next_hop: IpAddr,
        ifindex: u32,
        ifname: &str,
    ) -> Result<[u8; 6], ResolveError> {
        let entry = self.neighbour(addr, next_hop, ifindex).await?;
        let mut status = match entry
            .as_ref()
            .map_or(Err(NeighbourStatus::Missing), usable_mac)
        {
            Ok(mac) => {
                // Forwarded packets bypass the kernel, so nothing ever confirms this entry. A STALE
                // one is sent to re-validation (DELAY, then unicast probes): a next hop that died or
                // changed its MAC then fails, which the watcher reports, instead of lingering.
                if entry.is_some_and(|entry| entry.header.state == NeighbourState::Stale) {
                    self.trigger_resolution(addr, next_hop, ifindex).await?;
                }
                return Ok(mac);
            }
            Err(status) => status,
        };
        self.trigger_resolution(addr, next_hop, ifindex).await?;

        let deadline = Instant::now() + self.neighbour_timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            let entry = self.neighbour(addr, next_hop, ifindex).await?;
            match entry
                .as_ref()
                .map_or(Err(NeighbourStatus::Missing), usable_mac)
            {
                Ok(mac) => return Ok(mac),
                Err(now) => status = now,
            }
            // The kernel has sent all its probes: waiting longer changes nothing.
            if status == NeighbourStatus::Failed {
                break;
            }
        }
        Err(ResolveError::NeighbourUnresolved {
            addr,
            next_hop,
            ifname: ifname.to_owned(),
            status,
        })
    }

    /// One neighbour entry, like `ip neigh get next_hop dev ifindex`; `None` if there is none.
    async fn neighbour(
        &self,
        addr: IpAddr,
        next_hop: IpAddr,
        ifindex: u32,
    ) -> Result<Option<NeighbourMessage>, ResolveError> {
        let mut query = NeighbourMessage::default();
        let (family, destination) = match next_hop {
            IpAddr::V4(v4) => (AddressFamily::Inet, NeighbourAddress::Inet(v4)),
            IpAddr::V6(v6) => (AddressFamily::Inet6, NeighbourAddress::Inet6(v6)),
        };
        query.header.family = family;
        query.header.ifindex = ifindex;
        query
            .attributes
            .push(NeighbourAttribute::Destination(destination));
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNeighbour(query));
        // A single-entry get, not a dump: the neighbour table can be large.
        request.header.flags = NLM_F_REQUEST;
        let netlink_error = |source| ResolveError::Netlink {
            request: "RTM_GETNEIGH",
            addr,
            source,
        };
        let mut replies = self
            .handle
            .clone()
            .request(request)
            .map_err(netlink_error)?;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry)) => {
                    return Ok(Some(entry));
                }
                NetlinkPayload::Error(error) if error.raw_code() == -libc::ENOENT => break,
                NetlinkPayload::Error(error) if error.code.is_some() => {
                    return Err(netlink_error(rtnetlink::Error::NetlinkError(error)));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// Asks the kernel to resolve `next_hop` now, creating the entry if needed (`NTF_USE`).
    async fn trigger_resolution(
        &self,
        addr: IpAddr,
        next_hop: IpAddr,
        ifindex: u32,
    ) -> Result<(), ResolveError> {
        self.handle
            .neighbours()
            .add(ifindex, next_hop)
            .state(NeighbourState::None)
            .flags(NeighbourFlags::Use)
            // Without NLM_F_EXCL, so an existing entry is restarted or re-validated, not refused.
            .replace()
            .execute()
            .await
            .map_err(|source| ResolveError::Netlink {
                request: "RTM_NEWNEIGH (NTF_USE)",
                addr,
                source,
            })
    }
}

/// The entry's Ethernet address if its state lets packets be sent to it, else why not.
fn usable_mac(entry: &NeighbourMessage) -> Result<[u8; 6], NeighbourStatus> {
    let mac = entry
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                <[u8; 6]>::try_from(bytes.as_slice()).ok()
            }
            _ => None,
        });
    match (entry.header.state, mac) {
        (
            NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp,
            Some(mac),
        ) => Ok(mac),
        (NeighbourState::Incomplete, _) => Err(NeighbourStatus::Incomplete),
        (NeighbourState::Failed, _) => Err(NeighbourStatus::Failed),
        (NeighbourState::None, _) => Err(NeighbourStatus::Missing),
        (state, _) => Err(NeighbourStatus::Other(state.into())),
    }
}

/// The errno of a netlink error reply, if that is what `error` is.
fn netlink_errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(-message.raw_code()),
        _ => None,
    }
}

/// Route lookups that hit a non-forwarding route fail with the errno of its type
/// (`fib_props` in the kernel), for IPv4 and IPv6 alike; `RTM_F_FIB_MATCH` fails the same way, so the
/// errno is all there is to go on. Our request is well formed, so `EINVAL` means a blackhole.
fn route_error(addr: IpAddr, error: rtnetlink::Error) -> ResolveError {
    let kind = match netlink_errno(&error) {
        Some(libc::ENETUNREACH) => return ResolveError::NoRoute { addr },
        Some(libc::EHOSTUNREACH) => RouteKind::Unreachable,
        Some(libc::EINVAL) => RouteKind::Blackhole,
        Some(libc::EACCES) => RouteKind::Prohibit,
        _ => {
            return ResolveError::Netlink {
                request: "RTM_GETROUTE",
                addr,
                source: error,
            };
        }
    };
    ResolveError::Unreachable { addr, kind }
}

/// A background task that ends with its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
