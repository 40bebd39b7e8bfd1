//! `lbctl stats` and `lbctl debug` against a real lbd: chatting TCP connections through the VIP,
//! then the table (one reading, and `--watch` frames with non-zero packet rates), NDJSON with
//! `--watch --json`, screens redrawn on a terminal, a clean exit 0 on Ctrl-C, `--json` counters
//! that add up (per-backend packets and bytes sum to the VIP's, at least one packet per echo the
//! client counted), the debug switch going on and off, and the usual error without lbd.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    chatter::{Chatter, DEFAULT_INTERVAL},
    lb::{Lbd, ServedTopology},
    lbctl::{Lbctl, RUN_TIMEOUT, run_bounded},
    netns::topology::Topology,
};
use lb_userspace::{
    api::proto::{Debug, Stats, VipStats},
    dataplane::kernel::AttachMode,
    model::VipId,
};

const PORT: u16 = 80;
/// Chatting connections: each sends a message every 100 ms, so a few hundred packets a second.
const CONNECTIONS: usize = 20;
/// How long lbctl may take to end after Ctrl-C.
const INTERRUPT_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn stats_and_debug() {
    let bed = ServedTopology::build(
        Topology::one_arm("lst").backends(3),
        AttachMode::Native,
        PORT,
    )
    .expect("topology");
    let lbd = bed.start_lbd().expect("lbd");
    let topo = &bed.topo;
    lbd.finish(body(topo, &lbd), |_| false);
}

fn body(topo: &Topology, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let vip: VipId = format!("{}:{PORT}/tcp", topo.vip).parse()?;
    let target = SocketAddr::new(IpAddr::V4(topo.vip), PORT);

    let chatter = Chatter::open(&topo.client.ns, target, CONNECTIONS, DEFAULT_INTERVAL)?;
    // Traffic for a while before the first reading.
    std::thread::sleep(Duration::from_millis(500));
    let traffic = while_traffic_flows(&lbctl, &vip);
    let report = chatter.stop();
    traffic?;
    report.check(Duration::from_secs(2))?;
    eprintln!("chatter: {}", report.summary());

    counters_add_up(&lbctl, &vip, report.total_exchanges())?;
    debug_switch(&lbctl)?;

    let nobody = Lbctl::new(lbd.run_dir.join("nobody.sock"))?;
    let run = nobody.run(["stats"])?;
    ensure!(
        run.code() == Some(1) && run.stderr.contains("is lbd running?"),
        "without lbd: {}",
        run.describe()
    );
    Ok(())
}

/// The table, `--watch` frames and NDJSON, and Ctrl-C, while the chatter runs.
fn while_traffic_flows(lbctl: &Lbctl, vip: &VipId) -> Result<()> {
    // One reading: lbd has had no earlier read, so lbctl waits and reads again for rates.
    let run = lbctl.run(["stats"])?;
    ensure!(run.success(), "{}", run.describe());
    eprintln!("lbctl stats:\n{}", run.stdout);
    ensure!(
        run.stdout.starts_with("rates over "),
        "no rates: {}",
        run.describe()
    );
    ensure!(
        vip_packet_rate(&run.stdout, vip)? > 0.0,
        "zero packet rate: {}",
        run.describe()
    );
    ensure!(run.elapsed < Duration::from_secs(10), "{}", run.describe());

    let run = lbctl.run(["stats", "--watch", "--count", "2", "--interval", "1"])?;
    ensure!(run.success(), "{}", run.describe());
    eprintln!(
        "lbctl stats --watch --count 2 --interval 1:\n{}",
        run.stdout
    );
    let frames: Vec<&str> = run.stdout.split("--- frame ").skip(1).collect();
    ensure!(
        frames.len() == 2 && run.stdout.starts_with("--- frame 1 at +"),
        "want 2 frames: {}",
        run.describe()
    );
    for frame in &frames {
        ensure!(
            vip_packet_rate(frame, vip)? > 0.0,
            "zero packet rate in a frame: {}",
            run.describe()
        );
    }
    // Two frames one interval apart; lbd already has a recent read, so no extra wait.
    ensure!(
        (Duration::from_millis(900)..Duration::from_secs(10)).contains(&run.elapsed),
        "two frames 1 s apart took {:?}: {}",
        run.elapsed,
        run.describe()
    );

    let run = lbctl.run([
        "--json",
        "stats",
        "--watch",
        "--count",
        "2",
        "--interval",
        "0.5",
    ])?;
    ensure!(run.success(), "{}", run.describe());
    let lines: Vec<&str> = run.stdout.lines().collect();
    ensure!(lines.len() == 2, "want 2 NDJSON lines: {}", run.describe());
    for line in lines {
        let stats: Stats = serde_json::from_str(line).with_context(|| format!("line {line:?}"))?;
        let v = vip_stats(&stats, vip)?;
        ensure!(
            stats.rate_interval_secs >= 1.0 && v.traffic.packets_per_sec > 0.0,
            "no packet rate in {line}"
        );
    }

    terminal_watch(lbctl)?;
    interrupted_watch_exits_0(lbctl)
}

/// On a terminal (script(1)'s pseudo-terminal) every frame clears the screen first.
fn terminal_watch(lbctl: &Lbctl) -> Result<()> {
    let line = format!(
        "{} --socket {} stats --watch --count 2 --interval 0.5",
        lbctl.bin().display(),
        lbctl.socket().display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["--quiet", "--return", "--command", &line, "/dev/null"]);
    let run = run_bounded(cmd, vec![line], RUN_TIMEOUT)?;
    ensure!(run.success(), "{}", run.describe());
    ensure!(
        run.stdout
            .matches("\x1b[H\x1b[2Jlbctl stats every 0.5 s")
            .count()
            == 2
            && !run.stdout.contains("--- frame"),
        "want 2 screens: {}",
        run.describe()
    );
    Ok(())
}

/// `stats --watch` until Ctrl-C: at least a frame, then exit 0 promptly.
fn interrupted_watch_exits_0(lbctl: &Lbctl) -> Result<()> {
    let mut child = lbctl.spawn(["stats", "--watch", "--interval", "0.2"])?;
    let stdout = child.0.stdout.take().context("piped stdout")?;
    let (tx, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The last line of a frame.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut frames = 0;
    while frames < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .context("stats --watch printed no two frames within 10 s")?;
        if line.starts_with("XDP actions: ") {
            frames += 1;
        }
    }
    // SAFETY: kill(2) on our own child, which has not been reaped (it is waited for below).
    let rc = unsafe { libc::kill(child.0.id() as libc::pid_t, libc::SIGINT) };
    ensure!(rc == 0, "kill(SIGINT): {}", std::io::Error::last_os_error());
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if sent.elapsed() > INTERRUPT_TIMEOUT {
            bail!("stats --watch still running {INTERRUPT_TIMEOUT:?} after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if reader.join().is_err() {
        bail!("the stdout reader panicked");
    }
    ensure!(status.success(), "stats --watch after Ctrl-C: {status}");
    Ok(())
}

/// Once the traffic has stopped: the VIP counted at least a packet per echo, and its backends'
/// packets and bytes sum to its own.
fn counters_add_up(lbctl: &Lbctl, vip: &VipId, exchanges: u64) -> Result<()> {
    // Stray packets (the last ACKs) may still be on their way: wait for two equal readings.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    let stats = loop {
        let stats = lbctl.stats()?;
        let packets = vip_stats(&stats, vip)?.traffic.packets;
        if last == Some(packets) {
            break stats;
        }
        ensure!(
            Instant::now() < deadline,
            "the VIP's packets still move 10 s after the traffic stopped"
        );
        last = Some(packets);
        std::thread::sleep(Duration::from_millis(300));
    };
    let v = vip_stats(&stats, vip)?;
    let packets: u64 = v.backends.iter().map(|b| b.traffic.packets).sum();
    let bytes: u64 = v.backends.iter().map(|b| b.traffic.bytes).sum();
    eprintln!(
        "VIP {vip}: {} packets, {} bytes; backends {:?}",
        v.traffic.packets,
        v.traffic.bytes,
        v.backends
            .iter()
            .map(|b| (b.address, b.traffic.packets))
            .collect::<Vec<_>>()
    );
    ensure!(
        v.traffic.packets >= exchanges && exchanges > 0,
        "VIP counted {} packets for {exchanges} echoes",
        v.traffic.packets
    );
    ensure!(
        packets == v.traffic.packets && bytes == v.traffic.bytes,
        "backends sum to {packets} packets / {bytes} bytes, the VIP has {} / {}: {v:?}",
        v.traffic.packets,
        v.traffic.bytes
    );
    ensure!(
        v.backends.iter().filter(|b| b.traffic.packets > 0).count() >= 2,
        "{CONNECTIONS} connections reached fewer than 2 backends: {v:?}"
    );
    Ok(())
}

fn debug_switch(lbctl: &Lbctl) -> Result<()> {
    ensure!(
        lbctl.debug("status")? == Debug { data_plane: false },
        "debug logging is on by default"
    );
    let on = lbctl.ok(["debug", "on"])?;
    ensure!(
        on == "data-plane debug logging: on (lbd logs each packet decision; this costs CPU: \
               turn it off when done)\n",
        "debug on: {on:?}"
    );
    let status = lbctl.ok(["debug", "status"])?;
    ensure!(
        status.starts_with("data-plane debug logging: on "),
        "debug status after on: {status:?}"
    );
    ensure!(lbctl.debug("status")? == Debug { data_plane: true });
    let off = lbctl.ok(["debug", "off"])?;
    ensure!(
        off == "data-plane debug logging: off\n",
        "debug off: {off:?}"
    );
    let status = lbctl.ok(["debug", "status"])?;
    ensure!(
        status == "data-plane debug logging: off\n",
        "debug status after off: {status:?}"
    );
    Ok(())
}

fn vip_stats<'s>(stats: &'s Stats, vip: &VipId) -> Result<&'s VipStats> {
    stats
        .vips
        .iter()
        .find(|v| v.vip == *vip)
        .with_context(|| format!("no VIP {vip} in {stats:?}"))
}

/// The PKT/S cell of the VIP's `all` row in a stats table (`15.3k` -> 15300).
fn vip_packet_rate(table: &str, vip: &VipId) -> Result<f64> {
    let vip = vip.to_string();
    let row = table
        .lines()
        .find(|l| {
            let mut cells = l.split_whitespace();
            cells.next() == Some(vip.as_str()) && cells.next() == Some("all")
        })
        .with_context(|| format!("no row for {vip} in\n{table}"))?;
    // VIP, BACKEND, STATE, WEIGHT, FLOWS, PKT/S.
    let cell = row
        .split_whitespace()
        .nth(5)
        .with_context(|| format!("short row {row:?}"))?;
    let (number, scale) = match cell.strip_suffix(['k', 'M', 'G']) {
        Some(n) if cell.ends_with('k') => (n, 1e3),
        Some(n) if cell.ends_with('M') => (n, 1e6),
        Some(n) => (n, 1e9),
        None => (cell, 1.0),
    };
    let rate: f64 = number
        .parse()
        .with_context(|| format!("PKT/S cell {cell:?} in {row:?}"))?;
    Ok(rate * scale)
}
