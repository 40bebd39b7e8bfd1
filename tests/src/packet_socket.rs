//! A raw `AF_PACKET` socket that sends whole Ethernet frames past the qdisc: the load of the
//! throughput bench and the SYN-flood test (the machine has no pktgen, and Debian's
//! `xdp-trafficgen` does not load on 6.18).

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use anyhow::{Context as _, Result, bail};

use crate::packet::ETH_P_IP;

/// Frames per `sendmmsg` call.
const BATCH: usize = 64;

/// A raw `AF_PACKET` socket bound to one interface, sending whole frames past the qdisc.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
    sent: std::sync::atomic::AtomicU64,
}

impl PacketSocket {
    /// Opens the socket in the calling thread's namespace.
    pub fn open(ifindex: u32) -> Result<Self> {
        // Protocol 0: this socket only sends, so it receives nothing.
        // SAFETY: plain socket(2).
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            ifindex,
            sent: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Sends `frame` in batches until `stop` is set; counts every frame the kernel took.
    pub fn send_until(&self, frame: &[u8], stop: &AtomicBool) -> Result<()> {
        let mut addr = self.address()?;
        let mut iov = libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        };
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| message(&mut addr, &mut iov)).collect();
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `msgs` points at `addr` and `iov`, which outlive the call.
            let n = unsafe { self.send_batch(&mut msgs)? };
            self.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sends each of `frames` once (in batches, retrying on back-pressure); returns how many
    /// the kernel took.
    pub fn send_all(&self, frames: &[Vec<u8>]) -> Result<u64> {
        let mut addr = self.address()?;
        let mut sent = 0u64;
        for chunk in frames.chunks(BATCH) {
            let mut iovs: Vec<libc::iovec> = chunk
                .iter()
                .map(|f| libc::iovec {
                    iov_base: f.as_ptr().cast_mut().cast(),
                    iov_len: f.len(),
                })
                .collect();
            let mut msgs: Vec<libc::mmsghdr> =
                iovs.iter_mut().map(|iov| message(&mut addr, iov)).collect();
            let mut done = 0;
            while done < msgs.len() {
                // SAFETY: `msgs` points at `addr` and `iovs`, which outlive the call.
                done += unsafe { self.send_batch(&mut msgs[done..])? };
            }
            sent += done as u64;
        }
        self.sent.fetch_add(sent, Ordering::Relaxed);
        Ok(sent)
    }

    /// One `sendmmsg` of `msgs`: how many frames the kernel took, 0 when its device queue was
    /// full (back-pressure, not a failure).
    ///
    /// # Safety
    /// Every message's address and iovec pointers must be valid for the call; the kernel only
    /// reads through them.
    unsafe fn send_batch(&self, msgs: &mut [libc::mmsghdr]) -> Result<usize> {
        // SAFETY: the caller keeps the pointers in `msgs` valid.
        let n = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n >= 0 {
            return Ok(n.unsigned_abs() as usize);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {
                thread::yield_now();
                Ok(0)
            }
            _ => Err(err).context("sendmmsg"),
        }
    }

    /// The link-layer address every frame goes to: this socket's interface.
    fn address(&self) -> Result<libc::sockaddr_ll> {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_IP.to_be();
        addr.sll_ifindex = i32::try_from(self.ifindex)?;
        addr.sll_halen = 6;
        Ok(addr)
    }
}

/// One `sendmmsg` entry: `iov` to `addr`.
fn message(addr: &mut libc::sockaddr_ll, iov: &mut libc::iovec) -> libc::mmsghdr {
    // SAFETY: all-zero is a valid msghdr; the pointers are set below.
    let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
    msg.msg_hdr.msg_name = std::ptr::from_mut(addr).cast();
    msg.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    msg.msg_hdr.msg_iov = iov;
    msg.msg_hdr.msg_iovlen = 1;
    msg
}
