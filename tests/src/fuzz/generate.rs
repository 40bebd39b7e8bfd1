//! The frame generator: seeds (valid TCP/UDP to VIPs and elsewhere over IPv4 and IPv6, ICMP and
//! ICMPv6 echo requests and errors quoting VIP flows (well formed or broken), IPv6 with
//! extension headers, ARP, other IP protocols, jumbo frames, random bytes) and mutations of them
//! (truncation, padding, total / payload length, IHL and options, fragments, protocol or next
//! header, bit flips, TCP data offset and flags, ethertype, VLAN and `QinQ` tags). Every frame
//! carries a label naming its seed and mutations, for the failure report.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    fuzz::universe::Universe,
    packet::{
        self, CLIENT_MAC, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, GATEWAY_MAC, IP_DF, IP_MF,
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN,
        Ipv4, Ipv6, internet_checksum,
    },
    rng::Rng,
};

/// `BPF_PROG_TEST_RUN` refuses XDP frames shorter than an Ethernet header (EINVAL).
pub const MIN_FRAME: usize = ETH_HLEN;
/// Jumbo frames go up to this size (beyond a page, so the kernel passes the tail in frags).
pub const JUMBO_MAX: usize = 9216;

const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_GRE: u8 = 47;
const TCP_FLAGS: [u8; 9] = [0x02, 0x10, 0x12, 0x11, 0x04, 0x14, 0x18, 0x03, 0x3f];
/// Offsets in an untagged IPv4 frame.
const IP: usize = ETH_HLEN;
const L4: usize = ETH_HLEN + IPV4_HLEN;
/// Where L4 starts in an untagged IPv6 frame without extension headers.
const L4_V6: usize = ETH_HLEN + IPV6_HLEN;

/// One generated frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Seed and mutations, e.g. `tcp+tot_len+vlan`.
    pub label: String,
}

/// Produces frames from a seed, deterministically.
pub struct Generator {
    rng: Rng,
    vip_addrs: Vec<Ipv4Addr>,
    vip6_addrs: Vec<Ipv6Addr>,
    vip_ports: Vec<u16>,
    /// Every VIP's (address, port, protocol).
    vips: Vec<(IpAddr, u16, u8)>,
    /// Frames already made, waiting (a truncation sweep).
    queue: VecDeque<Frame>,
    /// Bytes of a test-run frame the program sees (see `Campaign`); jumbo sizes cluster around it.
    linear: usize,
}

/// Addresses that are no VIP's.
const OTHERS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 0, 0, 200),
    Ipv4Addr::new(10, 0, 0, 99),
    Ipv4Addr::new(192, 0, 2, 1),
];

impl Generator {
    pub fn new(seed: u64, universe: &Universe, linear: usize) -> Self {
        Self {
            rng: Rng::new(seed),
            vip_addrs: universe
                .vip_addrs()
                .into_iter()
                .filter_map(|a| match a {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                })
                .collect(),
            vip6_addrs: universe
                .vip_addrs()
                .into_iter()
                .filter_map(|a| match a {
                    IpAddr::V6(a) => Some(a),
                    IpAddr::V4(_) => None,
                })
                .collect(),
            vip_ports: universe.vip_ports(),
            vips: universe
                .vips
                .iter()
                .map(|v| (v.addr, v.port, v.proto))
                .collect(),
            queue: VecDeque::new(),
            linear,
        }
    }

    pub fn next_frame(&mut self) -> Frame {
        if let Some(frame) = self.queue.pop_front() {
            return frame;
        }
        let (mut bytes, mut label) = self.seed();
        let mutations = match self.rng.below(100) {
            0..30 => 0,
            30..65 => 1,
            65..85 => 2,
            _ => self.rng.range(3, 6),
        };
        for _ in 0..mutations {
            let name = self.mutate(&mut bytes);
            label.push('+');
            label.push_str(name);
        }
        if self.rng.chance(70) {
            fix_ipv4_checksum(&mut bytes);
        }
        if self.rng.chance(6) {
            label.push_str(self.vlan(&mut bytes));
        }
        if bytes.len() < MIN_FRAME {
            let missing = MIN_FRAME - bytes.len();
            bytes.extend(self.rng.bytes(missing));
        }
        // Now and then every prefix of the frame, one after the other.
        if self.rng.below(800) == 0 {
            for len in MIN_FRAME..bytes.len() {
                self.queue.push_back(Frame {
                    bytes: bytes[..len].to_vec(),
                    label: format!("{label}+cut@{len}"),
                });
            }
        }
        Frame { bytes, label }
    }

    fn dst(&mut self, vip_percent: u32) -> Ipv4Addr {
        if self.rng.chance(vip_percent) {
            self.rng.pick(&self.vip_addrs)
        } else {
            self.rng.pick(&OTHERS)
        }
    }

    /// Destination of a `proto` packet: mostly a VIP of that protocol, else a VIP address with
    /// any port, or another address.
    fn destination(&mut self, proto: u8) -> (Ipv4Addr, u16) {
        if self.rng.chance(65) {
            let matching: Vec<(Ipv4Addr, u16)> = self
                .vips
                .iter()
                .filter_map(|v| match v.0 {
                    IpAddr::V4(a) if v.2 == proto => Some((a, v.1)),
                    _ => None,
                })
                .collect();
            self.rng.pick(&matching)
        } else {
            (self.dst(50), self.dport())
        }
    }

    fn dport(&mut self) -> u16 {
        if self.rng.chance(80) {
            self.rng.pick(&self.vip_ports)
        } else {
            let any = self.rng.u16();
            self.rng.pick(&[22, 8443, 0, 65535, any])
        }
    }

    /// A client from a small pool (so flows repeat and hit the table), or any address.
    fn client(&mut self) -> (Ipv4Addr, u16) {
        if self.rng.chance(85) {
            let host = 1 + self.rng.below(4) as u8;
            (
                Ipv4Addr::new(198, 51, 100, host),
                40_000 + self.rng.below(6) as u16,
            )
        } else {
            (Ipv4Addr::from(self.rng.next_u64() as u32), self.rng.u16())
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = if self.rng.chance(90) {
            self.rng.below(65)
        } else {
            self.rng.below(1400)
        };
        self.rng.bytes(len)
    }

    /// A frame to start from and its label.
    fn seed(&mut self) -> (Vec<u8>, String) {
        let (frame, label) = match self.rng.below(100) {
            0..26 => (self.tcp(None), "tcp"),
            26..40 => (self.udp(None), "udp"),
            40..44 => (self.icmp_echo(), "icmp-echo"),
            44..50 => return self.icmp_error(),
            50..62 => (self.ipv6(None), "ipv6"),
            62..65 => (self.icmpv6_echo(), "icmpv6-echo"),
            65..71 => return self.icmpv6_error(),
            71..74 => (self.other_ethertype(), "non-ip"),
            74..77 => (self.other_proto(), "ip-proto"),
            77..80 => (self.jumbo(), "jumbo"),
            80..83 => (self.jumbo6(), "jumbo6"),
            _ => (self.random(), "random"),
        };
        (frame, label.to_owned())
    }

    /// TCP, `len` bytes long if given (else a small payload); sometimes with TCP options.
    fn tcp(&mut self, len: Option<usize>) -> Vec<u8> {
        let (src, sport) = self.client();
        let (dst, dport) = self.destination(IPPROTO_TCP);
        let flags = if self.rng.chance(90) {
            self.rng.pick(&TCP_FLAGS)
        } else {
            self.rng.byte()
        };
        let options = if self.rng.chance(20) {
            self.rng.range(1, 10) * 4
        } else {
            0
        };
        let payload = match len {
            Some(len) => self.rng.bytes(len.saturating_sub(L4 + 20 + options)),
            None => self.payload(),
        };
        let mut seg = Vec::with_capacity(20 + options + payload.len());
        seg.extend_from_slice(&sport.to_be_bytes());
        seg.extend_from_slice(&dport.to_be_bytes());
        seg.extend_from_slice(&self.rng.bytes(8)); // sequence and acknowledgement numbers
        seg.push((((20 + options) / 4) as u8) << 4);
        seg.push(flags);
        seg.extend_from_slice(&[0xfa, 0xf0, 0, 0, 0, 0]); // window, checksum, urgent pointer
        for i in 0..options {
            // MSS first, then NOPs: the contents do not matter to the balancer.
            seg.push(match i {
                0 => 2,
                1 => 4,
                2 => 5,
                3 => 0xb4,
                _ => 1,
            });
        }
        seg.extend_from_slice(&payload);
        let mut ip = Ipv4::new(src, dst, IPPROTO_TCP);
        ip.tos = self.tos();
        ip.frag = if self.rng.chance(80) { IP_DF } else { 0 };
        let mut frame = frame_of(&ip.packet(&seg));
        fix_l4_checksum(&mut frame);
        frame
    }

    fn udp(&mut self, len: Option<usize>) -> Vec<u8> {
        let (src, sport) = self.client();
        let (dst, dport) = self.destination(IPPROTO_UDP);
        let payload = match len {
            Some(len) => self.rng.bytes(len.saturating_sub(L4 + 8)),
            None => self.payload(),
        };
        let dgram = packet::udp_datagram(
            std::net::SocketAddrV4::new(src, sport),
            std::net::SocketAddrV4::new(dst, dport),
            &payload,
        );
        let mut ip = Ipv4::new(src, dst, IPPROTO_UDP);
        ip.tos = self.tos();
        frame_of(&ip.packet(&dgram))
    }

    fn tos(&mut self) -> u8 {
        if self.rng.chance(70) {
            0
        } else {
            self.rng.byte()
        }
    }

    fn icmp_echo(&mut self) -> Vec<u8> {
        let (src, _) = self.client();
        let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
        icmp.extend(self.payload());
        set_icmp_checksum(&mut icmp);
        frame_of(&Ipv4::new(src, self.dst(80), IPPROTO_ICMP).packet(&icmp))
    }

    /// An ICMP error quoting a packet the VIP sent (VIP:port -> client:cport, DSR), often with
    /// one flaw (see [`Generator::quote_flaw`]); mostly to the VIP address, sometimes to the
    /// client. Returns the frame and its label.
    fn icmp_error(&mut self) -> (Vec<u8>, String) {
        let (client, cport) = self.client();
        let vip = self.rng.pick(&self.vip_addrs);
        let (l4, proto) = self.quoted_l4(cport);
        let mut ip = Ipv4::new(vip, client, proto);
        ip.frag = self.rng.pick(&[IP_DF, 0, IP_MF]);
        let mut quoted = ip.packet(&l4);
        let mut label = "icmp-error".to_owned();
        if let Some(flaw) = self.quote_flaw(&mut quoted, false) {
            label.push('~');
            label.push_str(flaw);
        }
        let (kind, code) =
            self.rng
                .pick(&[(3u8, 4u8), (3, 3), (3, 1), (11, 0), (12, 0), (5, 0), (0, 0)]);
        let mut icmp = vec![kind, code, 0, 0, 0, 0];
        icmp.extend_from_slice(&1400u16.to_be_bytes()); // next-hop MTU for "fragmentation needed"
        icmp.extend_from_slice(&quoted);
        set_icmp_checksum(&mut icmp);
        let router = Ipv4Addr::new(203, 0, 113, 1);
        let dst = if self.rng.chance(85) { vip } else { client };
        let mut ip = Ipv4::new(router, dst, IPPROTO_ICMP);
        ip.tos = self.tos();
        let mut frame = frame_of(&ip.packet(&icmp));
        self.short_ip_length(&mut frame, &mut label);
        (frame, label)
    }

    /// The ICMPv6 counterpart of [`Generator::icmp_error`].
    fn icmpv6_error(&mut self) -> (Vec<u8>, String) {
        let (client, cport) = self.client6();
        let vip = self.rng.pick(&self.vip6_addrs);
        let (l4, proto) = self.quoted_l4(cport);
        let mut quoted = Ipv6::new(vip, client, proto).packet(&l4);
        let mut label = "icmpv6-error".to_owned();
        if let Some(flaw) = self.quote_flaw(&mut quoted, true) {
            label.push('~');
            label.push_str(flaw);
        }
        let (kind, code) = self.rng.pick(&[
            (1u8, 4u8),
            (1, 0),
            (2, 0),
            (3, 0),
            (4, 0),
            (129, 0),
            (135, 0),
        ]);
        let router: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xfe, 0, 0, 0, 0, 1);
        let dst = if self.rng.chance(85) { vip } else { client };
        let icmp = packet::icmpv6_message(router, dst, kind, code, [0, 0, 5, 0x78], &quoted);
        let mut ip = Ipv6::new(router, dst, IPPROTO_ICMPV6);
        ip.traffic_class = self.tos();
        ip.flow_label = self.rng.next_u64() as u32 & 0xf_ffff;
        let mut frame = packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IPV6, &ip.packet(&icmp));
        self.short_ip_length(&mut frame, &mut label);
        (frame, label)
    }

    /// The 8 quoted L4 bytes of a packet from a VIP port to `cport`, and the protocol.
    fn quoted_l4(&mut self, cport: u16) -> (Vec<u8>, u8) {
        let vport = self.rng.pick(&self.vip_ports);
        let proto = self.rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
        let mut l4 = Vec::with_capacity(8);
        l4.extend_from_slice(&vport.to_be_bytes());
        l4.extend_from_slice(&cport.to_be_bytes());
        l4.extend(self.rng.bytes(4));
        (l4, proto)
    }

    /// Half the time breaks the quoted packet: cut short, wrong version, IPv4 options or an
    /// IPv6 extension header, ICMP quoted, a source that is no VIP, or the other family.
    fn quote_flaw(&mut self, quoted: &mut Vec<u8>, v6: bool) -> Option<&'static str> {
        if self.rng.chance(50) {
            return None;
        }
        Some(match self.rng.below(6) {
            0 => {
                let len = self.rng.below(quoted.len());
                quoted.truncate(len);
                "quote-cut"
            }
            1 => {
                let version = self.rng.pick(&[4u8, 6, 0, 15]);
                quoted[0] = (version << 4) | (quoted[0] & 0xf);
                "quote-version"
            }
            2 if v6 => {
                quoted[6] = self.rng.pick(&[0u8, 43, 44, 60, 58]);
                "quote-ext"
            }
            2 => {
                quoted[0] = 0x40 | self.rng.pick(&[4u8, 6, 7, 15]);
                "quote-ihl"
            }
            3 => {
                quoted[if v6 { 6 } else { 9 }] = if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
                "quote-icmp"
            }
            4 => {
                if v6 {
                    quoted[8..24].copy_from_slice(&self.other6().octets());
                } else {
                    quoted[12..16].copy_from_slice(&self.rng.pick(&OTHERS).octets());
                }
                "quote-not-vip"
            }
            _ => {
                // The same flow quoted in the other family's header.
                let l4 = quoted[if v6 { IPV6_HLEN } else { IPV4_HLEN }..].to_vec();
                *quoted = if v6 {
                    Ipv4::new(self.rng.pick(&self.vip_addrs), self.client().0, IPPROTO_TCP)
                        .packet(&l4)
                } else {
                    Ipv6::new(
                        self.rng.pick(&self.vip6_addrs),
                        self.client6().0,
                        IPPROTO_TCP,
                    )
                    .packet(&l4)
                };
                "quote-family"
            }
        })
    }

    /// Now and then shortens the IP length of a freshly built untagged frame by 1 to 12
    /// bytes, leaving the bytes in the frame (they become padding).
    fn short_ip_length(&mut self, frame: &mut [u8], label: &mut String) {
        if !self.rng.chance(10) {
            return;
        }
        let cut = self.rng.range(1, 12) as u16;
        let at = if frame[12..14] == ETH_P_IPV6.to_be_bytes() {
            IP + 4
        } else {
            IP + 2
        };
        let len = u16::from_be_bytes([frame[at], frame[at + 1]]).saturating_sub(cut);
        frame[at..at + 2].copy_from_slice(&len.to_be_bytes());
        label.push_str("~ip-len");
    }

    /// An IPv6 client from a small pool (flows repeat) or any address, and a port.
    fn client6(&mut self) -> (Ipv6Addr, u16) {
        if self.rng.chance(85) {
            let host = 1 + self.rng.below(4) as u16;
            (
                Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, host),
                40_000 + self.rng.below(6) as u16,
            )
        } else {
            let mut o = [0u8; 16];
            self.rng.fill(&mut o);
            (Ipv6Addr::from(o), self.rng.u16())
        }
    }

    /// An IPv6 address that is no VIP's: one embedding a VIP's IPv4 address, or random.
    fn other6(&mut self) -> Ipv6Addr {
        let vip = self.rng.pick(&self.vip_addrs).octets();
        let mut dst = [0u8; 16];
        match self.rng.below(3) {
            0 => {
                dst[10..12].copy_from_slice(&[0xff, 0xff]);
                dst[12..].copy_from_slice(&vip);
            }
            1 => {
                dst[..4].copy_from_slice(&[0, 0x64, 0xff, 0x9b]);
                dst[12..].copy_from_slice(&vip);
            }
            _ => self.rng.fill(&mut dst),
        }
        Ipv6Addr::from(dst)
    }

    /// Destination of an IPv6 `proto` packet: mostly an IPv6 VIP of that protocol, else a VIP
    /// address with any port, or another address.
    fn destination6(&mut self, proto: u8) -> (Ipv6Addr, u16) {
        let matching: Vec<(Ipv6Addr, u16)> = self
            .vips
            .iter()
            .filter_map(|v| match v.0 {
                IpAddr::V6(a) if v.2 == proto => Some((a, v.1)),
                _ => None,
            })
            .collect();
        if self.rng.chance(65) && !matching.is_empty() {
            self.rng.pick(&matching)
        } else if self.rng.chance(50) {
            (self.rng.pick(&self.vip6_addrs), self.dport())
        } else {
            (self.other6(), self.dport())
        }
    }

    fn icmpv6_echo(&mut self) -> Vec<u8> {
        let (src, _) = self.client6();
        let dst = if self.rng.chance(80) {
            self.rng.pick(&self.vip6_addrs)
        } else {
            self.other6()
        };
        let payload = self.payload();
        let icmp = packet::icmpv6_message(src, dst, 128, 0, [0, 1, 0, 1], &payload);
        let mut ip = Ipv6::new(src, dst, IPPROTO_ICMPV6);
        ip.traffic_class = self.tos();
        packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IPV6, &ip.packet(&icmp))
    }

    /// IPv6 TCP or UDP (`len` bytes long if given), mostly to an IPv6 VIP, with 0 to 4
    /// extension headers before the L4 header now and then.
    fn ipv6(&mut self, len: Option<usize>) -> Vec<u8> {
        let l4_proto = self.rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
        let (dst, dport) = self.destination6(l4_proto);
        let (src, sport) = self.client6();
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend(self.rng.bytes(if l4_proto == IPPROTO_TCP { 16 } else { 4 }));
        if l4_proto == IPPROTO_TCP {
            l4[12] = 5 << 4;
            l4[13] = self.rng.pick(&TCP_FLAGS);
        }
        match len {
            Some(len) => {
                let more = len.saturating_sub(L4_V6 + l4.len());
                l4.extend(self.rng.bytes(more));
            }
            None => l4.extend(self.payload()),
        }
        // Extension headers, innermost last: (next header, bytes).
        let mut next = l4_proto;
        let mut body = l4;
        let headers = if self.rng.chance(60) {
            0
        } else {
            self.rng.range(1, 4)
        };
        for _ in 0..headers {
            let kind = self.rng.pick(&[0u8, 43, 44, 60, 51]);
            let mut ext = match kind {
                // Fragment: fixed 8 bytes, offset and M flag random.
                44 => {
                    let mut e = vec![next, 0];
                    e.extend(self.rng.bytes(6));
                    e
                }
                // AH: length in 4-byte units minus 2.
                51 => {
                    let words = self.rng.range(3, 6);
                    let mut e = vec![next, (words - 2) as u8];
                    e.extend(self.rng.bytes(words * 4 - 2));
                    e
                }
                // Hop-by-hop, routing, destination options: 8-byte units minus 1.
                _ => {
                    let units = self.rng.range(1, 3);
                    let mut e = vec![next, (units - 1) as u8];
                    e.extend(self.rng.bytes(units * 8 - 2));
                    e
                }
            };
            ext.extend_from_slice(&body);
            body = ext;
            next = kind;
        }
        let mut ip = Ipv6::new(src, dst, next);
        ip.traffic_class = self.tos();
        ip.flow_label = self.rng.next_u64() as u32 & 0xf_ffff;
        packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IPV6, &ip.packet(&body))
    }

    /// An IPv6 jumbo frame: 1,500 bytes up to `JUMBO_MAX`, or right around the linear part.
    fn jumbo6(&mut self) -> Vec<u8> {
        let len = if self.rng.chance(40) {
            self.linear - 3 + self.rng.below(7)
        } else {
            self.rng.range(1500, JUMBO_MAX)
        };
        self.ipv6(Some(len))
    }

    fn other_ethertype(&mut self) -> Vec<u8> {
        if self.rng.chance(50) {
            let (src, _) = self.client();
            return packet::arp_frame(src, self.rng.pick(&self.vip_addrs));
        }
        let any = self.rng.u16();
        let ethertype = self.rng.pick(&[ETH_P_ARP, 0x88cc, 0x8847, 0x0801, any]);
        let mut body = self.tcp(None)[ETH_HLEN..].to_vec();
        body.truncate(self.rng.range(0, body.len()));
        packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ethertype, &body)
    }

    /// IPv4 with a protocol no VIP serves (IPIP, GRE, SCTP, ESP, anything).
    fn other_proto(&mut self) -> Vec<u8> {
        let (src, _) = self.client();
        let any = self.rng.byte();
        let proto = self.rng.pick(&[IPPROTO_IPIP, IPPROTO_GRE, 132, 50, 0, any]);
        let payload = self.payload();
        frame_of(&Ipv4::new(src, self.dst(80), proto).packet(&payload))
    }

    /// A TCP or UDP frame of 1,500 bytes up to `JUMBO_MAX`, or right around the linear part a
    /// test run gives the program.
    fn jumbo(&mut self) -> Vec<u8> {
        let len = if self.rng.chance(40) {
            self.linear - 3 + self.rng.below(7)
        } else {
            self.rng.range(1500, JUMBO_MAX)
        };
        if self.rng.chance(60) {
            self.tcp(Some(len))
        } else {
            self.udp(Some(len))
        }
    }

    /// Random bytes; often with the IPv4 ethertype, a plausible first header byte and a VIP
    /// destination, so they get past the first checks.
    fn random(&mut self) -> Vec<u8> {
        let len = if self.rng.chance(90) {
            self.rng.range(MIN_FRAME, 120)
        } else {
            self.rng.range(MIN_FRAME, 2000)
        };
        let mut frame = self.rng.bytes(len);
        if self.rng.chance(70) {
            frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            if len >= L4 && self.rng.chance(60) {
                frame[IP] = 0x45;
                frame[IP + 16..L4].copy_from_slice(&self.dst(80).octets());
            }
        }
        frame
    }

    /// Applies one mutation; returns its name.
    fn mutate(&mut self, frame: &mut Vec<u8>) -> &'static str {
        let name = match self.rng.below(17) {
            0..5 => self.mutate_length(frame),
            5..10 => self.mutate_ip(frame),
            10..13 => self.mutate_l4(frame),
            _ => Some(self.mutate_bytes(frame)),
        };
        // A mutation that did not fit this frame (too short for the field) cuts it instead.
        name.unwrap_or_else(|| {
            let len = frame.len();
            frame.truncate(self.rng.range(MIN_FRAME, len.max(MIN_FRAME)));
            "cut"
        })
    }

    /// Truncation, Ethernet padding, or the IPv4 total length.
    fn mutate_length(&mut self, frame: &mut Vec<u8>) -> Option<&'static str> {
        let len = frame.len();
        match self.rng.below(3) {
            0 => {
                let pad = self.rng.range(1, 64);
                if self.rng.chance(50) {
                    frame.resize(len + pad, 0);
                } else {
                    frame.extend(self.rng.bytes(pad));
                }
                Some("pad")
            }
            1 if len >= IP + 4 => {
                let ip_len = (len - IP) as u16;
                let any = self.rng.u16();
                let near = ip_len.wrapping_sub(self.rng.below(8) as u16);
                let tot_len = self.rng.pick(&[
                    0,
                    19,
                    20,
                    21,
                    27,
                    28,
                    39,
                    40,
                    ip_len.wrapping_sub(1),
                    ip_len.wrapping_add(1),
                    near,
                    0xffff,
                    any,
                ]);
                frame[IP + 2..IP + 4].copy_from_slice(&tot_len.to_be_bytes());
                Some("tot_len")
            }
            _ => None,
        }
    }

    /// Version and IHL, options, fragment fields, protocol or destination.
    fn mutate_ip(&mut self, frame: &mut Vec<u8>) -> Option<&'static str> {
        if frame.len() >= L4_V6 && frame[12..14] == ETH_P_IPV6.to_be_bytes() {
            return Some(self.mutate_ipv6(frame));
        }
        if frame.len() < L4 {
            return None;
        }
        Some(match self.rng.below(5) {
            0 => {
                let version = if self.rng.chance(80) {
                    4
                } else {
                    self.rng.byte() >> 4
                };
                frame[IP] = (version << 4) | (self.rng.byte() & 0xf);
                "ihl"
            }
            1 => {
                self.ip_options(frame);
                "ip-options"
            }
            2 => {
                let offset = self.rng.range(1, 0x1fff) as u16;
                let any = self.rng.u16();
                let frag =
                    self.rng
                        .pick(&[IP_MF, offset, IP_MF | offset, IP_DF, IP_DF | IP_MF, 0, any]);
                frame[IP + 6..IP + 8].copy_from_slice(&frag.to_be_bytes());
                "frag"
            }
            3 => {
                let any = self.rng.byte();
                frame[IP + 9] = self.rng.pick(&[
                    IPPROTO_TCP,
                    IPPROTO_UDP,
                    IPPROTO_ICMP,
                    IPPROTO_IPIP,
                    IPPROTO_GRE,
                    any,
                ]);
                "proto"
            }
            _ => {
                let dst = self.dst(60);
                frame[IP + 16..L4].copy_from_slice(&dst.octets());
                "dst"
            }
        })
    }

    /// Version, payload length, next header, or destination of an IPv6 frame.
    fn mutate_ipv6(&mut self, frame: &mut [u8]) -> &'static str {
        match self.rng.below(4) {
            0 => {
                let version = self.rng.pick(&[4u8, 0, 7, 15]);
                frame[IP] = (version << 4) | (frame[IP] & 0xf);
                "v6-version"
            }
            1 => {
                let len = (frame.len() - L4_V6) as u16;
                let any = self.rng.u16();
                let near = len.wrapping_sub(self.rng.below(8) as u16);
                let value = self.rng.pick(&[
                    0,
                    1,
                    7,
                    8,
                    19,
                    20,
                    len.wrapping_add(1),
                    len.wrapping_sub(1),
                    near,
                    0xffff,
                    any,
                ]);
                frame[IP + 4..IP + 6].copy_from_slice(&value.to_be_bytes());
                "payload_len"
            }
            2 => {
                let any = self.rng.byte();
                frame[IP + 6] = self.rng.pick(&[
                    IPPROTO_TCP,
                    IPPROTO_UDP,
                    IPPROTO_ICMPV6,
                    IPPROTO_ICMP,
                    0,
                    43,
                    44,
                    60,
                    51,
                    any,
                ]);
                "next-header"
            }
            _ => {
                let dst = if self.rng.chance(60) {
                    self.rng.pick(&self.vip6_addrs)
                } else {
                    self.other6()
                };
                frame[IP + 24..L4_V6].copy_from_slice(&dst.octets());
                "dst6"
            }
        }
    }

    /// TCP data offset or flags, UDP length, at the L4 offset of the frame's family.
    fn mutate_l4(&mut self, frame: &mut [u8]) -> Option<&'static str> {
        let l4 = if frame.len() >= 14 && frame[12..14] == ETH_P_IPV6.to_be_bytes() {
            L4_V6
        } else {
            L4
        };
        if frame.len() <= l4 + 13 {
            return None;
        }
        Some(match self.rng.below(3) {
            0 => {
                let any = self.rng.byte() >> 4;
                let words = self.rng.pick(&[0u8, 1, 4, 5, 6, 15, any]);
                frame[l4 + 12] = (words << 4) | (frame[l4 + 12] & 0xf);
                "doff"
            }
            1 => {
                frame[l4 + 13] = self.rng.byte();
                "tcp-flags"
            }
            _ => {
                frame[l4 + 4..l4 + 6].copy_from_slice(&self.rng.u16().to_be_bytes());
                "udp-len"
            }
        })
    }

    /// Bit flips or random bytes in the headers, or another ethertype.
    fn mutate_bytes(&mut self, frame: &mut [u8]) -> &'static str {
        let span = frame.len().min(L4 + 40);
        match self.rng.below(5) {
            0 | 1 => {
                for _ in 0..self.rng.range(1, 4) {
                    let at = self.rng.below(span);
                    frame[at] ^= 1 << self.rng.below(8);
                }
                "bitflip"
            }
            2 | 3 => {
                for _ in 0..self.rng.range(1, 4) {
                    let at = self.rng.below(span);
                    frame[at] = self.rng.byte();
                }
                "bytes"
            }
            _ => {
                let any = self.rng.u16();
                let ethertype = self.rng.pick(&[
                    ETH_P_IPV6,
                    ETH_P_8021Q,
                    ETH_P_8021AD,
                    ETH_P_ARP,
                    ETH_P_IP,
                    any,
                ]);
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
                "ethertype"
            }
        }
    }

    /// IPv4 options: IHL 6 to 15, either really inserted (total length grows) or only claimed.
    fn ip_options(&mut self, frame: &mut Vec<u8>) {
        let words = self.rng.range(1, 10);
        frame[IP] = (frame[IP] & 0xf0) | (5 + words as u8);
        if self.rng.chance(30) {
            return;
        }
        let mut options = match self.rng.below(4) {
            // NOPs then end of list
            0 => vec![1; words * 4],
            // Router alert, padded
            1 => {
                let mut o = vec![148, 4, 0, 0];
                o.resize(words * 4, 0);
                o
            }
            // Record route with room for the rest
            2 => {
                let mut o = vec![7, (words * 4 - 1) as u8, 4];
                o.resize(words * 4, 0);
                o
            }
            _ => self.rng.bytes(words * 4),
        };
        let at = IP + IPV4_HLEN;
        let tail = frame.split_off(at);
        frame.append(&mut options);
        frame.extend_from_slice(&tail);
        let tot_len = u16::from_be_bytes([frame[IP + 2], frame[IP + 3]]);
        let tot_len = tot_len.wrapping_add((words * 4) as u16);
        frame[IP + 2..IP + 4].copy_from_slice(&tot_len.to_be_bytes());
    }

    /// Wraps the frame in an 802.1Q tag, or two (`QinQ`).
    fn vlan(&mut self, frame: &mut Vec<u8>) -> &'static str {
        let mut tags = Vec::new();
        let qinq = self.rng.chance(40);
        if qinq {
            tags.extend_from_slice(&ETH_P_8021AD.to_be_bytes());
            tags.extend_from_slice(&self.rng.u16().to_be_bytes());
        }
        tags.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        tags.extend_from_slice(&(self.rng.u16() & 0x0fff).to_be_bytes());
        let at = 12.min(frame.len());
        frame.splice(at..at, tags);
        if qinq { "+qinq" } else { "+vlan" }
    }
}

fn frame_of(ip: &[u8]) -> Vec<u8> {
    packet::ethernet(GATEWAY_MAC, CLIENT_MAC, ETH_P_IP, ip)
}

fn set_icmp_checksum(icmp: &mut [u8]) {
    icmp[2..4].copy_from_slice(&[0, 0]);
    let csum = internet_checksum(0, icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
}

/// Recomputes the IPv4 header checksum when the frame holds a plausible IPv4 header (the
/// balancer ignores it; real senders get it right, so most frames should).
fn fix_ipv4_checksum(frame: &mut [u8]) {
    if frame.len() < L4 || frame[12..14] != ETH_P_IP.to_be_bytes() {
        return;
    }
    let hlen = usize::from(frame[IP] & 0xf) * 4;
    if hlen < IPV4_HLEN || frame.len() < IP + hlen {
        return;
    }
    frame[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
    let csum = internet_checksum(0, &frame[IP..IP + hlen]);
    frame[IP + 10..IP + 12].copy_from_slice(&csum.to_be_bytes());
}

/// Sets the TCP checksum of a freshly built untagged IPv4/TCP frame (no padding).
fn fix_l4_checksum(frame: &mut [u8]) {
    let seg_len = frame.len() - L4;
    let mut pseudo = Vec::with_capacity(12 + seg_len);
    pseudo.extend_from_slice(&frame[IP + 12..L4]);
    pseudo.extend_from_slice(&[0, IPPROTO_TCP]);
    pseudo.extend_from_slice(&(seg_len as u16).to_be_bytes());
    frame[L4 + 16..L4 + 18].copy_from_slice(&[0, 0]);
    pseudo.extend_from_slice(&frame[L4..]);
    let csum = internet_checksum(0, &pseudo);
    frame[L4 + 16..L4 + 18].copy_from_slice(&csum.to_be_bytes());
}
