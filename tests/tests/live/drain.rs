//! `backend drain --wait`: returns within 2 s of the last flow closing, fails cleanly at its
//! timeout leaving the backend draining, and undrain brings it back.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::IpAddr,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{lb::Lbd, lbctl::Lbctl, traffic::Session};
use lb_userspace::{
    api::proto::{BackendState, FlowProgress},
    model::VipId,
};

use super::{Bed, CHURN_RING, PORT, expect_no_errors, millis, vip_status, who_many};

#[test]
fn drain_wait() {
    let bed = Bed::new("lv-drain", 3).expect("test bed");
    let lbd = bed
        .start_lbd(&[bed.main_vip(3, Some(CHURN_RING))])
        .expect("lbd");
    lbd.finish(drain_body(&bed, &lbd), |_| false);
}

fn drain_body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let vip = bed.vip(PORT, "tcp");
    let mut sessions: BTreeMap<String, Vec<Session>> = BTreeMap::new();
    for _ in 0..30 {
        let s = Session::open(bed.client(), bed.target())?;
        sessions.entry(s.backend().to_owned()).or_default().push(s);
    }
    let counts: BTreeMap<&str, usize> = sessions
        .iter()
        .map(|(k, v)| (k.as_str(), v.len()))
        .collect();
    eprintln!("drain: sessions per backend {counts:?}");
    ensure!(sessions.len() >= 2, "30 sessions reached only {counts:?}");
    let mut by_size: Vec<(String, usize)> =
        counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    by_size.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let (x_name, x_count) = by_size[0].clone();
    let y_name = by_size[1].0.clone();
    let x = bed.addr_of(&x_name)?;
    let y = bed.addr_of(&y_name)?;

    // 1. Drain X and wait while its sessions are open; it must report them, then finish
    // promptly once they close.
    let args = [
        "backend".to_owned(),
        "drain".to_owned(),
        vip.to_string(),
        x.to_string(),
        "--wait".to_owned(),
        "--timeout".to_owned(),
        "10".to_owned(),
    ];
    let mut child = lbctl.spawn(&args)?;
    let stdout = child.0.stdout.take().context("piped stdout")?;
    let (tx, lines) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let result = drain_x(
        bed,
        &lbctl,
        &vip,
        x,
        x_count,
        &mut sessions,
        &x_name,
        &lines,
        &mut child.0,
    );
    // Whatever happened, the process goes (and with it the reader's pipe).
    drop(child);
    let joined = reader.join();
    result?;
    ensure!(joined.is_ok(), "the stdout reader thread panicked");

    // 2. Drain Y with a session kept open: fails at its timeout, Y stays draining.
    drain_timeout(&lbctl, &vip, y, &mut sessions, &y_name)?;

    // 3. Undrain both: new connections reach them again.
    lbctl.ok(["backend", "undrain", &vip.to_string(), &y.to_string()])?;
    lbctl.ok(["backend", "undrain", &vip.to_string(), &x.to_string()])?;
    let status = lbctl.status()?;
    ensure!(
        vip_status(&status, &vip)?
            .backends
            .iter()
            .all(|b| !b.drain && b.state == BackendState::Active),
        "after undrain: {status:?}"
    );
    let seen = who_many(bed, 60)?;
    ensure!(
        seen.contains_key(&x_name) && seen.contains_key(&y_name),
        "after undrain new connections reached {seen:?}"
    );
    for s in sessions.values_mut().flatten() {
        s.ping()?;
    }
    expect_no_errors(lbd, "drain")
}

/// `drain --wait` on a backend whose flows stay open must fail at its timeout with a clear
/// message and leave the backend draining, its flows intact.
fn drain_timeout(
    lbctl: &Lbctl,
    vip: &VipId,
    y: IpAddr,
    sessions: &mut BTreeMap<String, Vec<Session>>,
    y_name: &str,
) -> Result<()> {
    let y_count = sessions.get(y_name).map_or(0, Vec::len);
    let started = Instant::now();
    let run = lbctl.run([
        "backend",
        "drain",
        &vip.to_string(),
        &y.to_string(),
        "--wait",
        "--timeout",
        "2",
    ])?;
    let took = started.elapsed();
    eprintln!(
        "drain: timeout case exited {} after {took:?}: {}",
        run.status,
        run.stderr.trim()
    );
    ensure!(
        !run.success(),
        "drain --wait --timeout 2 with an open flow succeeded: {}",
        run.describe()
    );
    ensure!(run.code() == Some(1), "expected exit 1: {}", run.describe());
    let err = run.stderr.to_lowercase();
    ensure!(
        err.contains("lbctl:") && (err.contains("timed out") || err.contains("timeout")),
        "no clear timeout message: {}",
        run.describe()
    );
    ensure!(
        (Duration::from_millis(1800)..Duration::from_secs(6)).contains(&took),
        "the 2 s timeout took {took:?}"
    );
    let status = lbctl.status()?;
    let yb = vip_status(&status, vip)?
        .backends
        .iter()
        .find(|b| b.address == y)
        .context("Y missing from status")?;
    ensure!(
        yb.drain && yb.state == BackendState::Draining,
        "Y after the timeout: {yb:?}"
    );
    ensure!(
        yb.flows == y_count as u64,
        "Y has {} live flows per status, {y_count} sessions are open",
        yb.flows
    );
    for s in sessions.get_mut(y_name).into_iter().flatten() {
        s.ping().context("a session on the draining backend")?;
    }

    // The NDJSON form of the same: every line a FlowProgress, the last one carrying the error.
    let run = lbctl.run([
        "--json",
        "backend",
        "drain",
        &vip.to_string(),
        &y.to_string(),
        "--wait",
        "--timeout",
        "1",
    ])?;
    ensure!(run.code() == Some(1), "expected exit 1: {}", run.describe());
    let progress: Vec<FlowProgress> = run
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("NDJSON lines: {}", run.describe()))?;
    let last = progress.last().context("no NDJSON line")?;
    ensure!(
        last.error.is_some() && !last.done && last.flows == y_count as u64,
        "last line {last:?}"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one step of one test, spelled out
fn drain_x(
    bed: &Bed,
    lbctl: &Lbctl,
    vip: &VipId,
    x: IpAddr,
    x_count: usize,
    sessions: &mut BTreeMap<String, Vec<Session>>,
    x_name: &str,
    lines: &mpsc::Receiver<(Instant, String)>,
    child: &mut std::process::Child,
) -> Result<()> {
    let first = lines
        .recv_timeout(Duration::from_secs(5))
        .context("drain --wait printed nothing within 5 s")?
        .1;
    eprintln!("drain: first line {first:?}");
    ensure!(
        first == format!("{x}: {x_count} flows"),
        "first line {first:?}, expected \"{x}: {x_count} flows\""
    );
    let status = lbctl.status()?;
    let xb = vip_status(&status, vip)?
        .backends
        .iter()
        .find(|b| b.address == x)
        .context("X missing from status")?;
    ensure!(
        xb.drain && xb.state == BackendState::Draining,
        "X while draining: {xb:?}"
    );
    let seen = who_many(bed, 30)?;
    ensure!(
        !seen.contains_key(x_name),
        "a new connection reached draining {x_name}: {seen:?}"
    );
    for s in sessions.values_mut().flatten() {
        s.ping().context("a session while X drains")?;
    }
    ensure!(
        child.try_wait()?.is_none(),
        "drain --wait ended with flows open"
    );

    let closed = Instant::now();
    drop(sessions.remove(x_name));
    let deadline = closed + Duration::from_secs(10);
    let mut printed = vec![first];
    let status = loop {
        while let Ok((_, line)) = lines.try_recv() {
            printed.push(line);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        ensure!(
            Instant::now() < deadline,
            "drain --wait still running 10 s after the last flow closed: {printed:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let took = closed.elapsed();
    while let Ok((_, line)) = lines.recv_timeout(Duration::from_millis(200)) {
        printed.push(line);
    }
    eprintln!(
        "drain: returned {status} {:.0} ms after the last flow closed; printed {printed:?}",
        millis(took)
    );
    ensure!(
        status.success(),
        "drain --wait failed ({status}): {printed:?}"
    );
    ensure!(
        took < Duration::from_secs(2),
        "drain --wait returned {took:?} after the last flow closed (limit 2 s)"
    );
    ensure!(
        printed
            .last()
            .is_some_and(|l| *l == format!("{x}: drained")),
        "last line is not \"{x}: drained\": {printed:?}"
    );
    Ok(())
}
