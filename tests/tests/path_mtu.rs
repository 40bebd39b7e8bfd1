//! Path MTU through the balancer (issue 9). client ── gateway ── router ── backends, where the
//! gateway-router link has MTU 1400 and every other link 1500 or more:
//! - downloads: a backend's full-size reply (DSR, through the router and the gateway's kernel
//!   forwarding) is too big for the narrow link, so the router sends fragmentation-needed
//!   (ICMPv6 packet-too-big) to the reply's source, the VIP; that error reaches the gateway,
//!   whose `lb_xdp` must forward it, encapsulated, to the backend owning the flow, so the
//!   backend's TCP lowers its path MTU;
//! - uploads: a full-size client packet no longer fits the narrow link once encapsulated, and
//!   `lb_xdp` answers the client with fragmentation-needed (packet-too-big) itself.
//!
//! Without either, the transfer stalls. A negative control turns the balancer's too-big replies
//! off: downloads still work, uploads stall and are counted as `too_big` drops.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_common::{Counter, DropReason};
use lb_tests::{
    lb::{Lbd, ServedTopology, VipConfig, render_config_with},
    netns::{Netns, topology::Topology},
    traffic::{connect, download, fill_pattern, pattern_fnv, upload},
};
use lb_userspace::dataplane::kernel::AttachMode;

const PORT: u16 = 80;
const MID_MTU: u32 = 1400;
const MIB: u64 = 1 << 20;
const BULK: u64 = 20 * MIB;
/// Each 20 MiB transfer; they take about a second when path MTU discovery works.
const TRANSFER_BOUND: Duration = Duration::from_secs(30);

fn bed(label: &str) -> ServedTopology {
    ServedTopology::build(
        Topology::two_arm(label).backends(2).router(MID_MTU),
        AttachMode::Native,
        PORT,
    )
    .expect("topology")
}

/// lbd with the IPv4 VIP over the backends' IPv4 addresses and the IPv6 VIP over their IPv6
/// addresses, and `settings`.
fn start_lbd<'a>(bed: &'a ServedTopology, settings: &[&str]) -> (Lbd<'a>, SocketAddr, SocketAddr) {
    let topo = &bed.topo;
    let v4 = SocketAddr::new(IpAddr::V4(topo.vip), PORT);
    let v6 = SocketAddr::new(IpAddr::V6(topo.vip6), PORT);
    let vips = [
        (
            VipConfig::with_backends(
                format!("{v4}/tcp"),
                topo.backends.iter().map(|b| IpAddr::V4(b.ip())),
            ),
            &[][..],
        ),
        (
            VipConfig::with_backends(
                format!("{v6}/tcp"),
                topo.backends.iter().map(|b| IpAddr::V6(b.eth0.ip6)),
            ),
            &[][..],
        ),
    ];
    let config = render_config_with(settings, &vips);
    let gw = topo.gw();
    let lbd = Lbd::start(&gw.ns, &gw.ifaces(), bed.mode, &config).expect("lbd");
    (lbd, v4, v6)
}

/// Runs `transfer` and fails if it fails or takes longer than [`TRANSFER_BOUND`].
fn bounded(what: &str, transfer: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    transfer().with_context(|| what.to_owned())?;
    let took = started.elapsed();
    ensure!(took < TRANSFER_BOUND, "{what} took {took:?}");
    Ok(took)
}

/// One counter of the namespace's `/proc/net/snmp` (`Icmp: ... OutDestUnreachs ...`) or
/// `/proc/net/snmp6` (`Icmp6OutPktTooBigs  12`).
fn snmp(ns: &Netns, file: &str, prefix: &str, name: &str) -> Result<u64> {
    let text = ns.exec(["cat", file])?;
    if file.ends_with("snmp6") {
        return text
            .lines()
            .filter_map(|l| l.split_once(char::is_whitespace))
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .with_context(|| format!("no {name} in {file}"));
    }
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {prefix} lines in {file}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no {name} in {file}"))
}

fn router_too_bigs(bed: &ServedTopology) -> Result<(u64, u64)> {
    let router = &bed.topo.router.as_ref().context("no router")?.ns;
    Ok((
        snmp(router, "/proc/net/snmp", "Icmp:", "OutDestUnreachs")?,
        snmp(router, "/proc/net/snmp6", "", "Icmp6OutPktTooBigs")?,
    ))
}

/// Counters that must grow, read before and after each family's transfers.
struct Seen {
    forwarded: u64,
    too_big_replies: u64,
    router_v4: u64,
    router_v6: u64,
}

impl Seen {
    fn read(bed: &ServedTopology, lbd: &Lbd) -> Result<Self> {
        let (router_v4, router_v6) = router_too_bigs(bed)?;
        Ok(Self {
            forwarded: lbd.counter(Counter::IcmpForwarded)?,
            too_big_replies: lbd.counter(Counter::TooBigReplies)?,
            router_v4,
            router_v6,
        })
    }
}

fn bulk_both_ways(bed: &ServedTopology, lbd: &Lbd, target: SocketAddr) -> Result<()> {
    let client = &bed.topo.client.ns;
    let before = Seen::read(bed, lbd)?;
    let down = bounded(&format!("20 MiB download from {target}"), || {
        download(client, target, BULK)
    })?;
    let up = bounded(&format!("20 MiB upload to {target}"), || {
        upload(client, target, BULK)
    })?;
    let after = Seen::read(bed, lbd)?;
    let router = if target.is_ipv4() {
        after.router_v4 - before.router_v4
    } else {
        after.router_v6 - before.router_v6
    };
    let forwarded = after.forwarded - before.forwarded;
    let replies = after.too_big_replies - before.too_big_replies;
    eprintln!(
        "{target}: download {down:?}, upload {up:?}; router sent {router} too-big errors, \
         lb_xdp forwarded {forwarded} ICMP errors and sent {replies} too-big replies"
    );
    ensure!(router > 0, "{target}: the router sent no too-big error");
    ensure!(
        forwarded > 0,
        "{target}: lb_xdp forwarded no ICMP error (the router sent {router})"
    );
    ensure!(replies > 0, "{target}: lb_xdp sent no too-big reply");
    ensure!(
        lbd.drops(DropReason::BadIcmp)? == 0,
        "{target}: lb_xdp dropped ICMP errors as bad_icmp"
    );
    Ok(())
}

#[test]
fn bulk_transfers_through_a_narrow_link() {
    let bed = bed("pmtu");
    let (lbd, v4, v6) = start_lbd(&bed, &[]);
    let result = bulk_both_ways(&bed, &lbd, v4).and_then(|()| bulk_both_ways(&bed, &lbd, v6));
    lbd.finish(result, |_| false);
}

/// Socket timeout of the upload expected to stall: every blocking write or read gives up after
/// it (a partial write may block twice).
const STALL_TIMEOUT: Duration = Duration::from_millis(1500);
const STALL_BOUND: Duration = Duration::from_secs(6);

/// `PUT <n>` as [`upload`] does, with [`STALL_TIMEOUT`] on every write and read.
fn quick_upload(ns: &Netns, target: SocketAddr, n: u64) -> Result<()> {
    let mut stream = connect(ns, target)?;
    stream.set_write_timeout(Some(STALL_TIMEOUT))?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    stream.write_all(format!("PUT {n}\n").as_bytes())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0;
    while sent < n {
        let len = (n - sent).min(buf.len() as u64) as usize;
        fill_pattern(sent, &mut buf[..len]);
        stream
            .write_all(&buf[..len])
            .with_context(|| format!("PUT {n}: after {sent} bytes"))?;
        sent += len as u64;
    }
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("PUT: reply")?;
    let expected = format!("{:016x}\n", pattern_fnv(n));
    ensure!(
        reply == expected,
        "PUT {n}: reply {reply:?}, expected {expected:?}"
    );
    Ok(())
}

fn stalls_without_replies(bed: &ServedTopology, lbd: &Lbd, target: SocketAddr) -> Result<()> {
    let client = &bed.topo.client.ns;
    // The scenario is otherwise healthy: the router's errors still reach the backend.
    bounded(&format!("2 MiB download from {target}"), || {
        download(client, target, 2 * MIB)
    })?;
    let drops_before = lbd.drops(DropReason::TooBig)?;
    let replies_before = lbd.counter(Counter::TooBigReplies)?;
    let started = Instant::now();
    let outcome = quick_upload(client, target, 2 * MIB);
    let took = started.elapsed();
    let drops = lbd.drops(DropReason::TooBig)? - drops_before;
    let replies = lbd.counter(Counter::TooBigReplies)? - replies_before;
    eprintln!(
        "{target}: upload without too-big replies: {:?} after {took:?}; {drops} too_big drops",
        outcome.as_ref().map_err(|e| format!("{e:#}"))
    );
    ensure!(
        outcome.is_err(),
        "{target}: a 2 MiB upload completed although too-big replies are off"
    );
    ensure!(
        took < STALL_BOUND,
        "{target}: the stalled upload took {took:?} to fail"
    );
    ensure!(drops > 0, "{target}: no too_big drops counted");
    ensure!(
        replies == 0,
        "{target}: {replies} too-big replies sent while off"
    );
    Ok(())
}

#[test]
fn uploads_stall_without_too_big_replies() {
    let bed = bed("pmtuoff");
    let (lbd, v4, _) = start_lbd(&bed, &["icmp_too_big_reply = false"]);
    let result = stalls_without_replies(&bed, &lbd, v4);
    lbd.finish(result, |_| false);
}
