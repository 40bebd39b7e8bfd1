//! A backend whose server stops is marked down in time and takes no new connections, without a
//! single reset on 100 chatting connections to the other backends; started again, it rejoins
//! after `rise` successful checks.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{chatter::Chatter, lb::Lbd};

use super::{
    Bed, PORT, Watch, backend_status, is_down, is_status_poll, is_up, last, secs, vip_toml,
    wait_first_checks,
};

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Chatting connections kept open on the other backends the whole time.
const CONNECTIONS: usize = 100;
/// The backend whose server is stopped.
const VICTIM: usize = 1;

#[test]
fn down_and_back() {
    let bed = Bed::new("hc-down", 3).expect("test bed");
    let check = format!(
        "kind = \"tcp\", interval = \"1s\", timeout = \"500ms\", rise = {RISE}, fall = {FALL}"
    );
    let config = vip_toml(&bed, PORT, &[0, 1, 2], Some(&check));
    let lbd = bed.start_lbd(&config).expect("lbd");
    lbd.finish(body(&bed, &lbd), is_status_poll);
}

fn body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let mut watch = Watch::new(lbd)?;
    let vip = bed.vip(PORT);
    let victim = bed.addr(VICTIM);
    let victim_name = bed.name(VICTIM).to_owned();
    let first = wait_first_checks(&mut watch, &vip, INTERVAL * 4)?;
    eprintln!(
        "down_and_back: every backend passed its first check after {:.2} s",
        secs(first)
    );

    // Connections only on the other backends: open them while the victim takes no new flows.
    lbctl.ok(["backend", "drain", &vip.to_string(), &victim.to_string()])?;
    let chatter = Chatter::open(
        bed.client(),
        bed.target(PORT),
        CONNECTIONS,
        lb_tests::chatter::DEFAULT_INTERVAL,
    )?;
    let opened = chatter.snapshot().per_backend();
    ensure!(
        !opened.contains_key(&victim_name) && opened.len() == 2,
        "connections opened while {victim_name} drained went to {opened:?}"
    );
    lbctl.ok(["backend", "undrain", &vip.to_string(), &victim.to_string()])?;
    let seen = bed.who_many(PORT, 60)?;
    ensure!(
        seen.len() == 3,
        "before the stop new connections reached only {seen:?}"
    );
    let resets_before = bed.client().estab_resets()?;

    stopped_goes_down(bed, lbd, &mut watch)?;
    ensure!(
        chatter.snapshot().failures().is_empty(),
        "connections failed while {victim_name} went down: {:?}",
        chatter.snapshot().failures()
    );
    started_comes_back(bed, lbd, &mut watch)?;

    let report = chatter.stop();
    eprintln!("down_and_back: {}", report.summary());
    report.check(Duration::from_secs(1))?;
    ensure!(
        report.conns.iter().all(|c| c.closed_cleanly),
        "not every connection closed cleanly"
    );
    let resets = bed.client().estab_resets()? - resets_before;
    ensure!(
        resets == 0,
        "{resets} established connections were reset on the client"
    );
    ensure!(
        lbd.log().contains("health: backend down"),
        "lbd did not log the transition down"
    );
    lbd.expect_no_errors(|_| false)
}

/// Stops the victim's server: down in time, with the reason, out of the table and of new
/// connections.
fn stopped_goes_down(bed: &Bed, lbd: &Lbd, watch: &mut Watch) -> Result<()> {
    let vip = bed.vip(PORT);
    let victim = bed.addr(VICTIM);
    let victim_name = bed.name(VICTIM);
    // Down within fall x interval + timeout, plus one interval of slack.
    let down_limit = INTERVAL * FALL + TIMEOUT + INTERVAL;
    let stopped = Instant::now();
    bed.stop(VICTIM, PORT)?;
    let (took_down, status) = watch.until(stopped, down_limit * 3, "victim down", |s| {
        Ok(is_down(backend_status(s, &vip, victim)?))
    })?;
    let maps = lbd.maps()?;
    let in_table = maps.table_has(&vip.key(), victim)?;
    let vb = backend_status(&status, &vip, victim)?;
    eprintln!(
        "down_and_back: {victim_name} marked down {:.2} s after its server stopped (limit {:.2} s): {vb:?}",
        secs(took_down),
        secs(down_limit)
    );
    ensure!(
        took_down <= down_limit,
        "{victim_name} went down {took_down:?} after the stop (limit {down_limit:?})"
    );
    ensure!(
        last(vb).contains("connection refused"),
        "reason {:?}, expected a connection refused",
        last(vb)
    );
    let health = vb.health.as_ref().context("no health")?;
    ensure!(
        health.since_secs <= 2,
        "just down, yet {} s in state",
        health.since_secs
    );
    ensure!(!in_table, "{victim_name} is down yet still in the table");
    let seen = bed.who_many(PORT, 60)?;
    ensure!(
        !seen.contains_key(victim_name) && seen.len() == 2,
        "while {victim_name} is down new connections reached {seen:?}"
    );
    Ok(())
}

/// Starts the victim's server again: up after `rise` passing checks, back in the table and
/// taking new connections.
fn started_comes_back(bed: &Bed, lbd: &Lbd, watch: &mut Watch) -> Result<()> {
    let vip = bed.vip(PORT);
    let victim = bed.addr(VICTIM);
    let victim_name = bed.name(VICTIM);
    let maps = lbd.maps()?;
    // Up after `rise` passing checks, plus one interval of slack.
    let up_limit = INTERVAL * RISE + INTERVAL;
    let started = Instant::now();
    bed.start(VICTIM, PORT)?;
    let (took_up, status) = watch.until(started, up_limit * 3, "victim up", |s| {
        Ok(is_up(backend_status(s, &vip, victim)?))
    })?;
    let vb = backend_status(&status, &vip, victim)?;
    eprintln!(
        "down_and_back: {victim_name} back up {:.2} s after its server started (limit {:.2} s): {vb:?}",
        secs(took_up),
        secs(up_limit)
    );
    ensure!(
        took_up <= up_limit,
        "{victim_name} came back {took_up:?} after the start (limit {up_limit:?})"
    );
    ensure!(last(vb) == "ok", "reason {:?} once up", last(vb));
    ensure!(
        maps.table_has(&vip.key(), victim)?,
        "{victim_name} is up but not in the table"
    );
    let seen = bed.who_many(PORT, 60)?;
    ensure!(
        seen.contains_key(victim_name),
        "after {victim_name} came back new connections reached only {seen:?}"
    );
    Ok(())
}
