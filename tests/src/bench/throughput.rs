//! Throughput through the namespace topology: packets per second `lb_xdp` (native, one-arm,
//! `XDP_TX`) delivers to a backend, beside a trivial `XDP_TX` program on the same links.
//!
//! Two gateways share the client's bridge: gw0 runs a real lbd with a UDP VIP, gw1 a 13-insn
//! program that rewrites the MACs toward the backend and returns `XDP_TX`. The client picks
//! the gateway by destination MAC, so the runs interleave without reattaching anything, and
//! both deliver the same datagram to the same backend stack (IPIP then `lb_decap` for lbd).
//!
//! The generator is an `AF_PACKET` sender thread in the client namespace (`sendmmsg`, qdisc
//! bypass): Debian's `xdp-trafficgen` cannot load on kernels without the
//! `xdp_redirect_map_err` tracepoint (removed in 6.x; it probes it as `tp_btf`).

use std::{
    net::{IpAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_userspace::dataplane::kernel::AttachMode;

use super::Figure;
use crate::{
    lb::{DataPath, Lbd, VipConfig, render_config},
    netns::{Netns, topology::Topology},
    packet::{ETH_P_IP, Ipv4, ethernet, udp_datagram},
    packet_socket::PacketSocket,
};

const SECTION: &str = "throughput";
const PORT: u16 = 9000;
const RUNS: usize = 3;
/// How long the first packets may take to reach the backend (lbd resolving the next hop).
const WARMUP_TIMEOUT: Duration = Duration::from_secs(10);
/// What counts as "the path delivers" during warm-up.
const MIN_DELIVERED_PPS: f64 = 1000.0;
const IPPROTO_UDP: u8 = 17;

/// One measurement window of one gateway program.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Packets per second that reached the backend's interface.
    delivered: f64,
    /// Packets per second the generator handed to the client's interface.
    sent: f64,
}

/// Runs the section: `RUNS` windows per program, interleaved (trivial, `lb_xdp`, ...).
pub fn run(quick: bool) -> Result<Vec<Figure>> {
    let window = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let topo = Topology::one_arm("bench-tput")
        .gateways(2)
        .backends(1)
        .build()?;
    let vip = topo.vip;
    let _datapath = DataPath::attach(&topo, AttachMode::Native, &[IpAddr::V4(vip)])?;
    let backend = &topo.backends[0];
    let (gw_lb, gw_tx) = (&topo.gateways[0], &topo.gateways[1]);

    let _trivial = gw_tx.ns.run(|| {
        let ifindex = ifindex(&gw_tx.front.name)?;
        TrivialTx::attach(ifindex, backend.eth0.mac, gw_tx.front.mac)
    })?;
    let config = render_config(&[VipConfig {
        address: format!("{vip}:{PORT}/udp"),
        ring_size: None,
        backends: vec![(IpAddr::V4(backend.ip()), 100)],
    }]);
    let _lbd = Lbd::start(
        &gw_lb.ns,
        &[gw_lb.front.name.as_str()],
        AttachMode::Native,
        &config,
    )?;

    for gw in [gw_lb, gw_tx] {
        threaded_napi(&gw.ns, &gw.front.name)?;
    }

    let client = &topo.client;
    let src = SocketAddrV4::new(client.ip(), 40_000);
    let dst = SocketAddrV4::new(vip, PORT);
    let frame_to = |gw_mac: [u8; 6]| {
        let dgram = udp_datagram(src, dst, &[0u8; 18]);
        let ip = Ipv4::new(*src.ip(), *dst.ip(), IPPROTO_UDP).packet(&dgram);
        ethernet(gw_mac, client.eth0.mac, ETH_P_IP, &ip)
    };
    let lb_frame = frame_to(gw_lb.front.mac);
    let tx_frame = frame_to(gw_tx.front.mac);
    let client_ifindex = client.ns.run(|| ifindex(&client.eth0.name))?;
    let measure = |frame: &[u8], window: Duration| {
        measure(&client.ns, client_ifindex, frame, &backend.ns, window)
    };

    // Both paths must deliver before anything is timed (lbd may still be resolving the MAC).
    for (what, frame) in [("trivial XDP_TX", &tx_frame), ("lb_xdp", &lb_frame)] {
        let deadline = Instant::now() + WARMUP_TIMEOUT;
        loop {
            let sample = measure(frame, Duration::from_millis(300))?;
            // Far above the backend's background (ARP, neighbour discovery).
            if sample.delivered > MIN_DELIVERED_PPS {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{what}: {:.0} of {:.0} pps reached the backend after {WARMUP_TIMEOUT:?}",
                    sample.delivered,
                    sample.sent
                );
            }
        }
    }

    let (mut trivial, mut lb) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        trivial.push(measure(&tx_frame, window)?);
        lb.push(measure(&lb_frame, window)?);
    }
    Ok(figures(&trivial, &lb, window))
}

fn figures(trivial: &[Sample], lb: &[Sample], window: Duration) -> Vec<Figure> {
    let mpps = |samples: &[Sample], f: fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(|s| f(s) / 1e6).collect();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let (tx_min, tx_med) = mpps(trivial, |s| s.delivered);
    let (lb_min, lb_med) = mpps(lb, |s| s.delivered);
    let (_, tx_sent) = mpps(trivial, |s| s.sent);
    let (_, lb_sent) = mpps(lb, |s| s.sent);
    let how = format!(
        "{RUNS} x {}s, 60 B UDP, one flow, AF_PACKET sendmmsg sender; counted at the backend's eth0",
        window.as_secs()
    );
    let baseline = Some(("trivial XDP_TX".to_owned(), tx_med));
    let stats = |min: f64, med: f64, sent: f64| {
        vec![
            ("min".to_owned(), min),
            ("median".to_owned(), med),
            ("sent median".to_owned(), sent),
        ]
    };
    vec![
        Figure {
            section: SECTION,
            name: "lb_xdp forwarded (native, one-arm, established flow)".to_owned(),
            value: lb_med,
            unit: "Mpps",
            stats: stats(lb_min, lb_med, lb_sent),
            baseline: baseline.clone(),
            target: None,
            note: how.clone(),
        },
        Figure {
            section: SECTION,
            name: "trivial XDP_TX forwarded (MAC rewrite only)".to_owned(),
            value: tx_med,
            unit: "Mpps",
            stats: stats(tx_min, tx_med, tx_sent),
            baseline: None,
            target: None,
            note: how,
        },
        Figure {
            section: SECTION,
            name: "lb_xdp / trivial XDP_TX".to_owned(),
            value: lb_med / tx_med,
            unit: "ratio",
            stats: vec![("min ratio".to_owned(), lb_min / tx_min)],
            baseline,
            target: None,
            note: "median delivered pps of each, same links, same run".to_owned(),
        },
    ]
}

/// Sends `frame` from the client for `window` and counts what reached the backend meanwhile.
fn measure(
    client: &Netns,
    ifindex: u32,
    frame: &[u8],
    backend: &Netns,
    window: Duration,
) -> Result<Sample> {
    let sock = client.run(|| PacketSocket::open(ifindex))?;
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let sender = scope.spawn(|| sock.send_until(frame, &stop));
        let counted = (|| {
            // Let the pipeline fill before the window opens.
            thread::sleep(Duration::from_millis(100));
            let (rx0, t0, sent0) = (rx_packets(backend)?, Instant::now(), sock.sent());
            thread::sleep(window);
            let (rx1, t1, sent1) = (rx_packets(backend)?, Instant::now(), sock.sent());
            let secs = (t1 - t0).as_secs_f64();
            #[allow(clippy::cast_precision_loss)] // packet counts stay far below 2^52
            Ok::<_, anyhow::Error>(Sample {
                delivered: rx1.saturating_sub(rx0) as f64 / secs,
                sent: sent1.saturating_sub(sent0) as f64 / secs,
            })
        })();
        stop.store(true, Ordering::Relaxed);
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        sent.context("sending")?;
        counted
    })
}

/// Moves `dev`'s receive work (its XDP program and everything the packet does afterwards)
/// from the softirq of whoever sent into it to a kernel thread, which the scheduler can run
/// on the other core than the sender: otherwise the whole path runs inside the sender's
/// syscalls and the generator, not the gateway, sets the rate.
fn threaded_napi(ns: &Netns, dev: &str) -> Result<()> {
    // `ip netns exec` (unlike nsenter) mounts the namespace's own /sys.
    let script = format!("echo 1 > /sys/class/net/{dev}/threaded");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-c", &script])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "threaded NAPI on {dev} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Received packets of the backend's eth0, from `ip -s -j link`.
fn rx_packets(ns: &Netns) -> Result<u64> {
    let out = ns.exec(["ip", "-s", "-j", "link", "show", "dev", "eth0"])?;
    let json: serde_json::Value = serde_json::from_str(&out).context("ip -j output")?;
    json[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packets in {out}"))
}

/// The calling thread's namespace's index of `name`.
fn ifindex(name: &str) -> Result<u32> {
    let cname = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}

/// A hand-assembled XDP program attached with a BPF link (closing the link detaches it):
/// rewrite the destination and source MACs, `XDP_TX`. The least a forwarding program can do.
struct TrivialTx {
    _prog: OwnedFd,
    _link: OwnedFd,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `union bpf_attr`, as bytes: only a few leading fields are used; the rest must be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn bpf(&mut self, cmd: libc::c_long, what: &str) -> Result<OwnedFd> {
        // SAFETY: the attr buffer is larger than every field the command reads, zero elsewhere.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, self.0.as_mut_ptr(), self.0.len()) };
        if fd < 0 {
            bail!("{what}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd)?) })
    }
}

/// One `struct bpf_insn`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | dst, o0, o1, i0, i1, i2, i3])
}

impl TrivialTx {
    /// Loads the program and attaches it natively to `ifindex` of the calling thread's
    /// namespace.
    fn attach(ifindex: u32, dst_mac: [u8; 6], src_mac: [u8; 6]) -> Result<Self> {
        let word = |m: &[u8]| i32::from_le_bytes([m[0], m[1], m[2], m[3]]);
        let half = |m: &[u8]| i32::from(u16::from_le_bytes([m[0], m[1]]));
        let insns = [
            insn(0x61, 2, 1, 0, 0),  // r2 = ctx->data
            insn(0x61, 3, 1, 4, 0),  // r3 = ctx->data_end
            insn(0xbf, 4, 2, 0, 0),  // r4 = r2
            insn(0x07, 4, 0, 0, 12), // r4 += 12
            insn(0x2d, 4, 3, 6, 0),  // if r4 > r3 goto pass
            insn(0x62, 2, 0, 0, word(&dst_mac[..4])),
            insn(0x6a, 2, 0, 4, half(&dst_mac[4..])),
            insn(0x62, 2, 0, 6, word(&src_mac[..4])),
            insn(0x6a, 2, 0, 10, half(&src_mac[4..])),
            insn(0xb7, 0, 0, 0, 3), // r0 = XDP_TX
            insn(0x95, 0, 0, 0, 0), // exit
            insn(0xb7, 0, 0, 0, 2), // pass: r0 = XDP_PASS
            insn(0x95, 0, 0, 0, 0), // exit
        ];
        let license = c"GPL";
        let mut log = vec![0u8; 16 * 1024];
        let mut load = Attr([0; 128]);
        load.put_u32(0, BPF_PROG_TYPE_XDP);
        load.put_u32(4, u32::try_from(insns.len())?);
        load.put_u64(8, insns.as_ptr() as u64);
        load.put_u64(16, license.as_ptr() as u64);
        load.put_u32(24, 1); // log_level
        load.put_u32(28, u32::try_from(log.len())?);
        load.put_u64(32, log.as_mut_ptr() as u64);
        load.0[48..56].copy_from_slice(b"bench_tx");
        load.put_u32(68, BPF_XDP); // expected_attach_type
        let prog = load
            .bpf(BPF_PROG_LOAD, "loading the trivial XDP_TX program")
            .map_err(|e| {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                e.context(String::from_utf8_lossy(&log[..end]).into_owned())
            })?;
        let mut link = Attr([0; 128]);
        link.put_u32(0, u32::try_from(prog.as_raw_fd())?);
        link.put_u32(4, ifindex);
        link.put_u32(8, BPF_XDP);
        link.put_u32(12, XDP_FLAGS_DRV_MODE);
        let link = link.bpf(BPF_LINK_CREATE, "attaching the trivial XDP_TX program")?;
        Ok(Self {
            _prog: prog,
            _link: link,
        })
    }
}
