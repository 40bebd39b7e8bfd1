//! Test packets: builds Ethernet / IPv4 / IPv6 / TCP / UDP / ICMP frames with correct checksums
//! (and lets a test break any field afterwards), and parses the frames a program hands back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPv6 inside IPv4 or IPv6 (next header 41).
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// MACs the builders use unless told otherwise.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// The Internet checksum (RFC 1071) of `data`, with `initial` added to the sum first (a
/// pseudo-header sum, or zero). The result goes into the packet big-endian.
pub fn internet_checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let words = |addr: Ipv4Addr| {
        let o = addr.octets();
        u32::from(u16::from_be_bytes([o[0], o[1]])) + u32::from(u16::from_be_bytes([o[2], o[3]]))
    };
    words(src) + words(dst) + u32::from(proto) + len as u32
}

/// The pseudo-header sum of either family (RFC 793 / RFC 8200 section 8.1); both addresses must
/// be of the same family.
pub fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let words = |addr: IpAddr| -> u32 {
        let bytes = match addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum()
    };
    words(src) + words(dst) + u32::from(proto) + (len as u32 >> 16) + (len as u32 & 0xffff)
}

/// A TCP segment (20-byte header, no options) of either family with a correct checksum.
pub fn tcp_segment_ip(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&1_000u32.to_be_bytes()); // seq
    let ack = if flags & TCP_ACK != 0 { 2_000u32 } else { 0 };
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.push(5 << 4);
    seg.push(flags);
    seg.extend_from_slice(&64_240u16.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 0]);
    seg.extend_from_slice(payload);
    let csum = internet_checksum(pseudo_sum(src.ip(), dst.ip(), IPPROTO_TCP, seg.len()), &seg);
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// A UDP datagram of either family with a correct checksum.
pub fn udp_datagram_ip(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let len = UDP_HLEN + payload.len();
    let mut dgram = Vec::with_capacity(len);
    dgram.extend_from_slice(&src.port().to_be_bytes());
    dgram.extend_from_slice(&dst.port().to_be_bytes());
    dgram.extend_from_slice(&(len as u16).to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(payload);
    let csum = match internet_checksum(pseudo_sum(src.ip(), dst.ip(), IPPROTO_UDP, len), &dgram) {
        0 => 0xffff,
        c => c,
    };
    dgram[6..8].copy_from_slice(&csum.to_be_bytes());
    dgram
}

/// An ICMP (IPv4) message `type`, `code`, the 4 bytes `rest` and `body`, checksum filled in.
pub fn icmp_message(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(body);
    let csum = internet_checksum(0, &msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

/// An ICMPv6 message from `src` to `dst`, checksum (with the pseudo header) filled in.
pub fn icmpv6_message(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    kind: u8,
    code: u8,
    rest: [u8; 4],
    body: &[u8],
) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(body);
    let sum = pseudo_sum(src.into(), dst.into(), IPPROTO_ICMPV6, msg.len());
    let csum = internet_checksum(sum, &msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

/// Fields of an IPv6 header to build; `Ipv6::new` gives sane defaults.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub traffic_class: u8,
    /// 20 bits.
    pub flow_label: u32,
    pub hop_limit: u8,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8) -> Self {
        Self {
            src,
            dst,
            next_header,
            traffic_class: 0,
            flow_label: 0,
            hop_limit: 64,
        }
    }

    /// The 40-byte header for `payload_len` bytes of payload.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        let first =
            (6u32 << 28) | (u32::from(self.traffic_class) << 20) | (self.flow_label & 0xf_ffff);
        let mut h = Vec::with_capacity(IPV6_HLEN);
        h.extend_from_slice(&first.to_be_bytes());
        h.extend_from_slice(&(payload_len as u16).to_be_bytes());
        h.push(self.next_header);
        h.push(self.hop_limit);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h
    }

    /// Header followed by `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let mut pkt = self.header(payload.len());
        pkt.extend_from_slice(payload);
        pkt
    }
}

/// A client's TCP frame of either family to the gateway (traffic class / TOS 0).
pub fn tcp_frame_ip(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    let seg = tcp_segment_ip(src, dst, flags, payload);
    ip_frame(src.ip(), dst.ip(), IPPROTO_TCP, &seg)
}

/// A client's UDP frame of either family to the gateway.
pub fn udp_frame_ip(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let dgram = udp_datagram_ip(src, dst, payload);
    ip_frame(src.ip(), dst.ip(), IPPROTO_UDP, &dgram)
}

/// An IPv4 (DF, TTL 64) or IPv6 (hop limit 64) packet around `payload` in a client frame.
pub fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet(
            GATEWAY_MAC,
            CLIENT_MAC,
            ETH_P_IP,
            &Ipv4::new(s, d, proto).packet(payload),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet(
            GATEWAY_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            &Ipv6::new(s, d, proto).packet(payload),
        ),
        _ => panic!("ip_frame: {src} and {dst} are of different families"),
    }
}

/// A TCP segment (20-byte header, no options) with a correct checksum.
pub fn tcp_segment(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&1_000u32.to_be_bytes()); // seq
    let ack = if flags & TCP_ACK != 0 { 2_000u32 } else { 0 };
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.push(5 << 4); // data offset 5 words
    seg.push(flags);
    seg.extend_from_slice(&64_240u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(payload);
    let sum = pseudo_header_sum(*src.ip(), *dst.ip(), IPPROTO_TCP, seg.len());
    let csum = internet_checksum(sum, &seg);
    seg[16..18].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// A UDP datagram with a correct checksum.
pub fn udp_datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut dgram = Vec::with_capacity(len);
    dgram.extend_from_slice(&src.port().to_be_bytes());
    dgram.extend_from_slice(&dst.port().to_be_bytes());
    dgram.extend_from_slice(&(len as u16).to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.extend_from_slice(payload);
    let sum = pseudo_header_sum(*src.ip(), *dst.ip(), IPPROTO_UDP, len);
    let csum = match internet_checksum(sum, &dgram) {
        0 => 0xffff, // zero means "no checksum" in UDP
        c => c,
    };
    dgram[6..8].copy_from_slice(&csum.to_be_bytes());
    dgram
}

/// Fields of an IPv4 header to build; `Ipv4::new` gives sane defaults.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub tos: u8,
    pub ttl: u8,
    pub id: u16,
    /// Flags (`IP_DF`, `IP_MF`) and the fragment offset in 8-byte units.
    pub frag: u16,
    /// Option bytes; their length must be a multiple of 4 (IHL grows with them).
    pub options: Vec<u8>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            tos: 0,
            ttl: 64,
            id: 0x1234,
            frag: IP_DF,
            options: Vec::new(),
        }
    }

    /// Header (with a correct checksum) followed by `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        assert!(
            self.options.len().is_multiple_of(4),
            "IPv4 options must fill whole words"
        );
        let hlen = IPV4_HLEN + self.options.len();
        let mut pkt = Vec::with_capacity(hlen + payload.len());
        pkt.push(0x40 | (hlen / 4) as u8);
        pkt.push(self.tos);
        pkt.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&self.id.to_be_bytes());
        pkt.extend_from_slice(&self.frag.to_be_bytes());
        pkt.push(self.ttl);
        pkt.push(self.proto);
        pkt.extend_from_slice(&[0, 0]);
        pkt.extend_from_slice(&self.src.octets());
        pkt.extend_from_slice(&self.dst.octets());
        pkt.extend_from_slice(&self.options);
        let csum = internet_checksum(0, &pkt[..hlen]);
        pkt[10..12].copy_from_slice(&csum.to_be_bytes());
        pkt.extend_from_slice(payload);
        pkt
    }
}

/// An Ethernet frame around `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + payload.len());
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A client's TCP frame to the gateway.
pub fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let seg = tcp_segment(src, dst, flags, payload);
    let ip = Ipv4::new(*src.ip(), *dst.ip(), IPPROTO_TCP).packet(&seg);
    ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IP, &ip)
}

/// A client's UDP frame to the gateway.
pub fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let dgram = udp_datagram(src, dst, payload);
    let ip = Ipv4::new(*src.ip(), *dst.ip(), IPPROTO_UDP).packet(&dgram);
    ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IP, &ip)
}

/// An ARP request frame (who-has `target` tell `sender`).
pub fn arp_frame(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&sender.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target.octets());
    ethernet([0xff; 6], CLIENT_MAC, ETH_P_ARP, &arp)
}

/// Recomputes the IPv4 header checksum of the frame's (first) IPv4 header in place, after a test
/// broke some other field on purpose.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let hlen = usize::from(frame[ETH_HLEN] & 0xf) * 4;
    let header = &mut frame[ETH_HLEN..ETH_HLEN + hlen];
    header[10..12].copy_from_slice(&[0, 0]);
    let csum = internet_checksum(0, header);
    header[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// An Ethernet header and what follows it.
#[derive(Debug, PartialEq, Eq)]
pub struct EthView<'a> {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_ethernet(frame: &[u8]) -> Result<EthView<'_>, String> {
    if frame.len() < ETH_HLEN {
        return Err(format!(
            "frame of {} bytes has no Ethernet header",
            frame.len()
        ));
    }
    Ok(EthView {
        dst: frame[0..6].try_into().expect("6 bytes"),
        src: frame[6..12].try_into().expect("6 bytes"),
        ethertype: u16::from_be_bytes([frame[12], frame[13]]),
        payload: &frame[ETH_HLEN..],
    })
}

/// A parsed IPv4 header and its payload (cut at the total length).
#[derive(Debug, PartialEq, Eq)]
pub struct Ipv4View<'a> {
    pub version: u8,
    /// Header length in bytes.
    pub header_len: usize,
    pub tos: u8,
    pub total_len: u16,
    pub id: u16,
    /// Flags and fragment offset, as on the wire.
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    pub checksum_ok: bool,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub payload: &'a [u8],
}

pub fn parse_ipv4(packet: &[u8]) -> Result<Ipv4View<'_>, String> {
    if packet.len() < IPV4_HLEN {
        return Err(format!("{} bytes cannot hold an IPv4 header", packet.len()));
    }
    let header_len = usize::from(packet[0] & 0xf) * 4;
    let total_len = u16::from_be_bytes([packet[2], packet[3]]);
    if header_len < IPV4_HLEN || packet.len() < header_len {
        return Err(format!("bad IPv4 header length {header_len}"));
    }
    if usize::from(total_len) < header_len || usize::from(total_len) > packet.len() {
        return Err(format!(
            "IPv4 total length {total_len} does not fit {} bytes",
            packet.len()
        ));
    }
    let addr =
        |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    Ok(Ipv4View {
        version: packet[0] >> 4,
        header_len,
        tos: packet[1],
        total_len,
        id: u16::from_be_bytes([packet[4], packet[5]]),
        frag: u16::from_be_bytes([packet[6], packet[7]]),
        ttl: packet[8],
        proto: packet[9],
        checksum_ok: internet_checksum(0, &packet[..header_len]) == 0,
        src: addr(12),
        dst: addr(16),
        payload: &packet[header_len..usize::from(total_len)],
    })
}

/// Source and destination ports of a TCP or UDP header.
pub fn parse_ports(l4: &[u8]) -> Result<(u16, u16), String> {
    if l4.len() < 4 {
        return Err(format!("{} bytes cannot hold ports", l4.len()));
    }
    Ok((
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 40_000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
        let frame = tcp_frame(src, dst, TCP_SYN, b"hello");
        let eth = parse_ethernet(&frame).unwrap();
        assert_eq!(eth.ethertype, ETH_P_IP);
        let ip = parse_ipv4(eth.payload).unwrap();
        assert!(ip.checksum_ok);
        assert_eq!(
            (ip.src, ip.dst, ip.proto),
            (*src.ip(), *dst.ip(), IPPROTO_TCP)
        );
        assert_eq!(parse_ports(ip.payload).unwrap(), (40_000, 80));
        // A correct TCP checksum makes the sum over pseudo-header and segment come out zero.
        let sum = pseudo_header_sum(ip.src, ip.dst, IPPROTO_TCP, ip.payload.len());
        assert_eq!(internet_checksum(sum, ip.payload), 0);

        let frame = udp_frame(src, dst, b"odd");
        let ip = parse_ipv4(parse_ethernet(&frame).unwrap().payload).unwrap();
        let sum = pseudo_header_sum(ip.src, ip.dst, IPPROTO_UDP, ip.payload.len());
        assert_eq!(internet_checksum(sum, ip.payload), 0);
    }

    #[test]
    fn checksum_matches_known_header() {
        // Wikipedia's IPv4 header example: checksum 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(0, &header), 0xb861);
    }

    #[test]
    fn fix_checksum_repairs_a_changed_header() {
        let src = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 1);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 2);
        let mut frame = tcp_frame(src, dst, TCP_SYN, b"");
        frame[ETH_HLEN + 8] = 3; // TTL
        assert!(!parse_ipv4(&frame[ETH_HLEN..]).unwrap().checksum_ok);
        fix_ipv4_checksum(&mut frame);
        assert!(parse_ipv4(&frame[ETH_HLEN..]).unwrap().checksum_ok);
    }
}
