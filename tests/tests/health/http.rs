//! HTTP checks: a 500 takes the backend down with a reason naming it and a 200 brings it back;
//! a backend that accepts and never answers goes down too, each probe cut at its timeout, and
//! lbd answers `lbctl status` in under a second all along, even with every backend hanging.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use lb_tests::{lb::Lbd, lbctl::Lbctl};
use lb_userspace::api::proto::{BackendStatus, Status};

use super::{
    Bed, PORT, Watch, backend_status, is_down, is_status_poll, is_up, last, names, secs,
    vip_status, vip_toml, wait_first_checks,
};

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Down within fall x interval + timeout, plus one interval of slack.
const DOWN_LIMIT: Duration = INTERVAL
    .saturating_mul(FALL)
    .saturating_add(TIMEOUT)
    .saturating_add(INTERVAL);
/// Up after rise passing checks, plus one interval of slack.
const UP_LIMIT: Duration = INTERVAL.saturating_mul(RISE + 1);

#[test]
fn http_status_and_hang() {
    let bed = Bed::new("hc-http", 2).expect("test bed");
    // Started without checks: lbctl sets them.
    let config = vip_toml(&bed, PORT, &[0, 1], None);
    let lbd = bed.start_lbd(&config).expect("lbd");
    lbd.finish(body(&bed, &lbd), is_status_poll);
}

fn body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let mut watch = Watch::new(lbd)?;
    let vip = bed.vip(PORT);
    lbctl.ok([
        "vip",
        "check",
        &vip.to_string(),
        "--check",
        "http:/healthz",
        "--interval",
        "1s",
        "--check-timeout",
        "500ms",
        "--rise",
        &RISE.to_string(),
        "--fall",
        &FALL.to_string(),
    ])?;
    let export = lbctl.export()?;
    ensure!(
        export.contains("http:/healthz"),
        "the check is not in the exported state:\n{export}"
    );
    wait_first_checks(&mut watch, &vip, INTERVAL * 4)?;
    status_500(bed, &lbctl, &mut watch)?;
    hang(bed, &mut watch)?;
    all_hang(bed, lbd, &lbctl, &mut watch)?;
    eprintln!(
        "http: {} status requests, slowest {} ms",
        watch.samples,
        watch.slowest.as_millis()
    );
    lbd.expect_no_errors(|l| l.contains("every backend fails its health checks"))
}

/// Backend 0's status, tested with `f`.
fn first_is(bed: &Bed, f: fn(&BackendStatus) -> bool) -> impl Fn(&Status) -> Result<bool> {
    let (vip, a) = (bed.vip(PORT), bed.addr(0));
    move |s| Ok(f(backend_status(s, &vip, a)?))
}

/// 500: down, the reason names it, new connections go to the other backend; 200: back up.
fn status_500(bed: &Bed, lbctl: &Lbctl, watch: &mut Watch) -> Result<()> {
    let (vip, a, a_name) = (bed.vip(PORT), bed.addr(0), bed.name(0));
    bed.with_server(0, PORT, |s| s.set_http_status(500))?;
    let since = Instant::now();
    let (took, status) =
        watch.until(since, DOWN_LIMIT * 3, "down on 500", first_is(bed, is_down))?;
    let ab = backend_status(&status, &vip, a)?;
    eprintln!(
        "http: {a_name} down {:.2} s after answering 500 (limit {:.2} s): {:?}",
        secs(took),
        secs(DOWN_LIMIT),
        ab.health
    );
    ensure!(
        took <= DOWN_LIMIT,
        "down after {took:?} (limit {DOWN_LIMIT:?})"
    );
    ensure!(
        last(ab).contains("500"),
        "reason {:?} names no 500",
        last(ab)
    );
    let text = lbctl.ok(["status"])?;
    ensure!(
        text.contains("500"),
        "`lbctl status` does not show the reason:\n{text}"
    );
    let seen = bed.who_many(PORT, 20)?;
    ensure!(
        !seen.contains_key(a_name),
        "new connections reached {a_name} while down: {seen:?}"
    );

    bed.with_server(0, PORT, |s| s.set_http_status(200))?;
    let since = Instant::now();
    let (took, _) = watch.until(since, UP_LIMIT * 3, "up on 200", first_is(bed, is_up))?;
    eprintln!(
        "http: {a_name} up {:.2} s after answering 200 (limit {:.2} s)",
        secs(took),
        secs(UP_LIMIT)
    );
    ensure!(took <= UP_LIMIT, "up after {took:?} (limit {UP_LIMIT:?})");
    Ok(())
}

/// Accepted, never answered: down, each probe ending at its timeout.
fn hang(bed: &Bed, watch: &mut Watch) -> Result<()> {
    let (vip, a, a_name) = (bed.vip(PORT), bed.addr(0), bed.name(0));
    bed.with_server(0, PORT, |s| s.set_hang(true))?;
    let since = Instant::now();
    let (took, status) = watch.until(
        since,
        DOWN_LIMIT * 3,
        "down on hang",
        first_is(bed, is_down),
    )?;
    let ab = backend_status(&status, &vip, a)?;
    let latency = ab
        .health
        .as_ref()
        .and_then(|h| h.last_latency_us)
        .map(Duration::from_micros);
    eprintln!(
        "http: {a_name} down {:.2} s after it began to hang (limit {:.2} s): last {:?} in {latency:?}",
        secs(took),
        secs(DOWN_LIMIT),
        last(ab)
    );
    ensure!(
        took <= DOWN_LIMIT,
        "down after {took:?} (limit {DOWN_LIMIT:?})"
    );
    ensure!(
        last(ab).starts_with("timed out"),
        "reason {:?}, expected a timeout",
        last(ab)
    );
    ensure!(
        latency.is_some_and(|l| (TIMEOUT..TIMEOUT + Duration::from_millis(300)).contains(&l)),
        "a hung probe took {latency:?}, expected about the {TIMEOUT:?} timeout"
    );
    Ok(())
}

/// Both hanging: every backend down, the VIP keeps its last table (the other backend) and says
/// so, status still answers at once; answering again, both come back.
fn all_hang(bed: &Bed, lbd: &Lbd, lbctl: &Lbctl, watch: &mut Watch) -> Result<()> {
    let vip = bed.vip(PORT);
    bed.with_server(1, PORT, |s| s.set_hang(true))?;
    let since = Instant::now();
    let (took, status) = watch.until(since, DOWN_LIMIT * 3, "all down", |s| {
        Ok(vip_status(s, &vip)?.all_down)
    })?;
    let table = lbd.maps()?.table_addrs(&vip.key())?;
    eprintln!(
        "http: every backend down {:.2} s after the second began to hang; table {:?}",
        secs(took),
        names(bed, &table)
    );
    ensure!(
        vip_status(&status, &vip)?.backends.iter().all(fails_checks),
        "all_down with a backend passing: {status:?}"
    );
    ensure!(
        table == [bed.addr(1)].into(),
        "with every backend down the table holds {:?}, not the last one up",
        names(bed, &table)
    );
    ensure!(
        lbctl.ok(["status"])?.contains("warning: every backend"),
        "`lbctl status` does not warn that every backend is down"
    );

    bed.with_server(0, PORT, |s| s.set_hang(false))?;
    bed.with_server(1, PORT, |s| s.set_hang(false))?;
    let since = Instant::now();
    let (took, _) = watch.until(since, UP_LIMIT * 3, "both up", |s| {
        let v = vip_status(s, &vip)?;
        Ok(!v.all_down && v.backends.iter().all(is_up))
    })?;
    eprintln!("http: both up {:.2} s after answering again", secs(took));
    ensure!(took <= UP_LIMIT, "up after {took:?} (limit {UP_LIMIT:?})");
    let seen = bed.who_many(PORT, 40)?;
    ensure!(seen.len() == 2, "new connections reached only {seen:?}");
    Ok(())
}

/// Failing its checks (a backend kept in the table while all are down stays `active`).
fn fails_checks(b: &BackendStatus) -> bool {
    b.health.as_ref().is_some_and(|h| !h.up)
}
