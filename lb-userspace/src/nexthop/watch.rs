//! Change notifications for next hops: rtnetlink link, neighbour and route events, filtered and
//! debounced into "re-resolve now" signals.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, TryStreamExt, channel::mpsc::UnboundedReceiver};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
    },
    sys::{AsyncSocket, SocketAddr},
};
use tokio::{sync::mpsc, time::sleep};

use super::{AbortOnDrop, ResolveError, usable_mac};

/// How long [`Changes`] gathers a burst of kernel notifications into one: a link going down removes
/// many routes and neighbours at once, and one re-resolution covers them all.
pub const CHANGE_DEBOUNCE: Duration = Duration::from_millis(50);

/// Receive buffer for the notification socket, so a burst does not overflow it (an overflow is still
/// reported as a change, so nothing is missed, but it costs a spurious re-resolution).
const NOTIFY_RCVBUF: usize = 1 << 20;

/// Notifications that next hops may have changed: one item per burst of relevant kernel events
/// (links, IPv4 and IPv6 routes, neighbours whose usable address appeared, changed or went away).
/// Consumers re-resolve on each item. The stream ends if the netlink socket fails; the tasks behind it
/// stop when this is dropped.
pub struct Changes {
    notifications: mpsc::Receiver<()>,
    _connection: AbortOnDrop,
    _forwarder: AbortOnDrop,
}

impl Stream for Changes {
    type Item = ();

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.notifications.poll_recv(cx)
    }
}

/// Subscribes to rtnetlink notifications in the calling thread's network namespace, and reads the
/// neighbour table once so the filter knows the addresses already in use. Must be called from within
/// a Tokio runtime.
pub async fn watch_changes() -> Result<Changes, ResolveError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(ResolveError::Runtime)?;
    let (mut connection, handle, messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])
    .map_err(ResolveError::Socket)?;
    connection
        .socket_mut()
        .socket_mut()
        .set_rx_buf_sz(NOTIFY_RCVBUF)
        .map_err(ResolveError::Socket)?;
    let connection = AbortOnDrop(runtime.spawn(connection));
    let mut neighbours = NeighbourFilter::default();
    neighbours.seed(&handle).await?;
    // Capacity 1 and try_send: a notification already waiting covers any later change.
    let (sender, notifications) = mpsc::channel(1);
    let forwarder =
        AbortOnDrop(runtime.spawn(forward_changes(handle, messages, neighbours, sender)));
    Ok(Changes {
        notifications,
        _connection: connection,
        _forwarder: forwarder,
    })
}

type Notification = (NetlinkMessage<RouteNetlinkMessage>, SocketAddr);

/// Turns kernel notifications into debounced change signals until the receiver goes away.
async fn forward_changes(
    handle: Handle,
    mut messages: UnboundedReceiver<Notification>,
    mut neighbours: NeighbourFilter,
    sender: mpsc::Sender<()>,
) {
    while let Some((message, _)) = messages.next().await {
        let mut relevant = neighbours.is_relevant(message.payload);
        if relevant {
            sleep(CHANGE_DEBOUNCE).await;
        }
        // Fold the rest of the burst in, keeping the neighbour filter up to date.
        while let Ok((message, _)) = messages.try_recv() {
            relevant |= neighbours.is_relevant(message.payload);
        }
        if neighbours.overrun {
            // Notifications were lost: re-read the table, or end the stream if that fails too.
            if neighbours.seed(&handle).await.is_err() {
                return;
            }
        }
        if !relevant {
            continue;
        }
        if let Err(mpsc::error::TrySendError::Closed(())) = sender.try_send(()) {
            return;
        }
    }
}

/// Drops neighbour notifications that change nothing a next hop depends on. Neighbour entries move
/// between REACHABLE, STALE, DELAY and PROBE all the time and each move is a notification; only the
/// usable address matters, so the filter remembers it per entry and passes changes of it alone. It is
/// seeded from a table dump: a deletion notification carries no usable address, so only the filter's
/// memory tells whether the deleted entry had one.
#[derive(Default)]
struct NeighbourFilter {
    usable: HashMap<(u32, IpAddr), [u8; 6]>,
    /// The socket overflowed since the last seed: the memory may be wrong.
    overrun: bool,
}

impl NeighbourFilter {
    /// Replaces the memory with the kernel's current neighbour table.
    async fn seed(&mut self, handle: &Handle) -> Result<(), ResolveError> {
        let mut entries = handle.neighbours().get().execute();
        self.usable.clear();
        while let Some(entry) = entries.try_next().await.map_err(ResolveError::Dump)? {
            if let (Some(key), Ok(mac)) = (neighbour_key(&entry), usable_mac(&entry)) {
                self.usable.insert(key, mac);
            }
        }
        self.overrun = false;
        Ok(())
    }

    /// Whether `payload` may change a next hop, updating the memory.
    fn is_relevant(&mut self, payload: NetlinkPayload<RouteNetlinkMessage>) -> bool {
        let (entry, deleted) = match payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(entry)) => {
                (entry, false)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(entry)) => (entry, true),
            NetlinkPayload::Overrun(_) => {
                self.overrun = true;
                return true;
            }
            // Links and routes: always worth a re-resolution.
            _ => return true,
        };
        // Bridge FDB entries and the like are not next hops.
        let Some(key) = neighbour_key(&entry) else {
            return false;
        };
        let now = if deleted {
            None
        } else {
            usable_mac(&entry).ok()
        };
        let before = match now {
            Some(mac) => self.usable.insert(key, mac),
            None => self.usable.remove(&key),
        };
        before != now
    }
}

/// (ifindex, IP address) of an IPv4 or IPv6 neighbour entry.
fn neighbour_key(entry: &NeighbourMessage) -> Option<(u32, IpAddr)> {
    entry
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                Some((entry.header.ifindex, IpAddr::from(*v4)))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                Some((entry.header.ifindex, IpAddr::from(*v6)))
            }
            _ => None,
        })
}
