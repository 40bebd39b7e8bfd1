//! ICMP echo from a namespace over a raw socket (no `ping` binary needed): each request waits
//! for its own reply, matched on the source address, identifier, sequence and payload.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
const PAYLOAD_LEN: usize = 56;
/// How long one `recvfrom` blocks before the deadline is looked at again.
const POLL: Duration = Duration::from_millis(100);

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

/// Sends `count` echo requests (ICMPv6 for an IPv6 `dst`) from inside `ns`, one after the
/// other, each waiting up to `wait` for its reply. Returns how many were answered from `dst`
/// with the request's identifier, sequence and payload (and for IPv4 a valid ICMP checksum; the
/// kernel checks ICMPv6's and the IP headers').
pub fn ping(ns: &Netns, dst: IpAddr, count: u16, wait: Duration) -> Result<u16> {
    ns.run(|| {
        let socket = open(dst)
            .with_context(|| format!("raw ICMP socket in {} (are we root?)", ns.name()))?;
        set_recv_timeout(&socket, POLL).context("SO_RCVTIMEO")?;
        // Identifiers differ per call so concurrent pings in one process do not match each
        // other's replies.
        let id = (std::process::id() as u16)
            .wrapping_mul(31)
            .wrapping_add(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let mut answered = 0;
        for seq in 0..count {
            let payload: Vec<u8> = (0..PAYLOAD_LEN)
                .map(|i| (i as u8) ^ (seq as u8).wrapping_mul(7))
                .collect();
            let request = echo_request(dst, id, seq, &payload);
            send_to(&socket, &request, dst).with_context(|| format!("echo request to {dst}"))?;
            if wait_reply(&socket, dst, id, seq, &payload, wait)? {
                answered += 1;
            }
        }
        Ok(answered)
    })
}

fn open(dst: IpAddr) -> io::Result<OwnedFd> {
    let (domain, protocol) = match dst {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_recv_timeout(socket: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    // SAFETY: tv lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The ICMP message: type, code 0, checksum (IPv4 only: the kernel fills ICMPv6's), id, seq,
/// payload.
fn echo_request(dst: IpAddr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let kind = if dst.is_ipv4() {
        ECHO_REQUEST_V4
    } else {
        ECHO_REQUEST_V6
    };
    let mut msg = vec![kind, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(payload);
    if dst.is_ipv4() {
        let sum = internet_checksum(&msg);
        msg[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    msg
}

fn send_to(socket: &OwnedFd, msg: &[u8], dst: IpAddr) -> io::Result<()> {
    // SAFETY: both sockaddr types are plain C structs for which all-zero is valid.
    let rc = match dst {
        IpAddr::V4(ip) => {
            let mut sa: libc::sockaddr_in = unsafe { zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
            // SAFETY: msg and sa outlive the call; their lengths are passed.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const sa).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        IpAddr::V6(ip) => {
            let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_addr.s6_addr = ip.octets();
            // SAFETY: as above.
            unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const sa).cast(),
                    size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads ICMP messages until the reply to (`id`, `seq`) from `dst` arrives or `wait` is over.
/// A raw socket sees every ICMP message of the namespace, so others are skipped.
fn wait_reply(
    socket: &OwnedFd,
    dst: IpAddr,
    id: u16,
    seq: u16,
    payload: &[u8],
    wait: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        let Some((len, from)) = recv_from(socket, &mut buf)? else {
            continue;
        };
        let icmp = match from {
            // IPv4 raw sockets hand over the IP header too.
            IpAddr::V4(_) => {
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                if buf[0] >> 4 != 4 || len < ihl {
                    continue;
                }
                &buf[ihl..len]
            }
            IpAddr::V6(_) => &buf[..len],
        };
        let reply_type = if dst.is_ipv4() {
            ECHO_REPLY_V4
        } else {
            ECHO_REPLY_V6
        };
        let matches = from == dst
            && icmp.len() == 8 + payload.len()
            && icmp[0] == reply_type
            && icmp[1] == 0
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
            && &icmp[8..] == payload
            && (dst.is_ipv6() || internet_checksum(icmp) == 0);
        if matches {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One datagram and its source; `None` on a receive timeout.
fn recv_from(socket: &OwnedFd, buf: &mut [u8]) -> Result<Option<(usize, IpAddr)>> {
    // SAFETY: sockaddr_storage is a plain C struct; all-zero is valid.
    let mut sa: libc::sockaddr_storage = unsafe { zeroed() };
    let mut sa_len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf and sa outlive the call and their sizes are passed.
    let len = unsafe {
        libc::recvfrom(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut sa).cast(),
            &raw mut sa_len,
        )
    };
    if len < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                Ok(None)
            }
            _ => Err(err).context("recvfrom on the raw ICMP socket"),
        };
    }
    let from = match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
            let sin: libc::sockaddr_in = unsafe { *(&raw const sa).cast() };
            IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
            let sin6: libc::sockaddr_in6 = unsafe { *(&raw const sa).cast() };
            IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        }
        _ => return Ok(None),
    };
    Ok(Some((len as usize, from)))
}

/// RFC 1071 checksum; a message carrying its correct checksum sums to 0.
fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let msg = echo_request(IpAddr::V4(Ipv4Addr::LOCALHOST), 0x1234, 7, &[1, 2, 3]);
        assert_eq!(msg[0], ECHO_REQUEST_V4);
        assert_eq!(internet_checksum(&msg), 0);
        // RFC 1071's example words.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
