//! Checks through the tunnel (`via_tunnel`): backend 2 runs its server but no `lb_decap`, so
//! it cannot take encapsulated packets. Checked through the tunnel it is down while backend 1
//! is up; checked directly (another VIP, and then its own direct check) it is up.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use lb_tests::lb::Lbd;

use super::{
    Bed, PORT, Watch, backend_status, is_down, is_status_poll, is_up, last, names, secs,
    vip_status, vip_toml,
};

/// A second VIP on the same backends, checked directly on [`PORT`].
const PORT_DIRECT: u16 = 81;
/// The backend without `lb_decap`.
const BROKEN: usize = 1;

#[test]
fn via_tunnel() {
    let bed = Bed::build("hc-tun", 2, Some(BROKEN)).expect("test bed");
    // The gateway's own probes to the VIP need a route out of an interface running the tc
    // program, via a next hop that resolves (the client stands in for the upstream router; it
    // does not forward, so a probe that escapes the tunnel goes nowhere).
    bed.topo
        .gw()
        .ns
        .ip([
            "route",
            "add",
            &format!("{}/32", bed.topo.vip),
            "via",
            &bed.topo.client.ip().to_string(),
            "dev",
            "eth0",
        ])
        .expect("gateway route to the VIP");
    let direct = "kind = \"tcp\", interval = \"500ms\", timeout = \"500ms\", port = 80";
    let config =
        vip_toml(&bed, PORT, &[0, 1], None) + &vip_toml(&bed, PORT_DIRECT, &[0, 1], Some(direct));
    let lbd = bed.start_lbd(&config).expect("lbd");
    lbd.finish(body(&bed, &lbd), is_status_poll);
}

fn body(bed: &Bed, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let mut watch = Watch::new(lbd)?;
    let (tunnel, direct) = (bed.vip(PORT), bed.vip(PORT_DIRECT));
    let (good, broken) = (bed.addr(0), bed.addr(BROKEN));
    let broken_name = bed.name(BROKEN).to_owned();
    lbctl.ok([
        "vip",
        "check",
        &tunnel.to_string(),
        "--check",
        "tcp",
        "--interval",
        "500ms",
        "--check-timeout",
        "500ms",
        "--rise",
        "2",
        "--fall",
        "3",
        "--via-tunnel",
    ])?;
    let since = Instant::now();
    let (took, status) = watch.until(since, Duration::from_secs(10), "tunnel checks", |s| {
        let g = backend_status(s, &tunnel, good)?;
        let b = backend_status(s, &tunnel, broken)?;
        Ok(is_up(g) && last(g) == "ok" && is_down(b))
    })?;
    let b = backend_status(&status, &tunnel, broken)?;
    eprintln!(
        "via_tunnel: {broken_name} down through its tunnel after {:.2} s: {:?}",
        secs(took),
        b.health
    );
    ensure!(
        b.health
            .as_ref()
            .is_some_and(|h| h.check.contains("via tunnel")),
        "status does not say the check goes through the tunnel: {:?}",
        b.health
    );
    ensure!(
        last(b).starts_with("timed out"),
        "reason {:?}, expected a timeout",
        last(b)
    );
    for addr in [good, broken] {
        let d = backend_status(&status, &direct, addr)?;
        ensure!(
            is_up(d) && last(d) == "ok",
            "checked directly, {addr} is {d:?}"
        );
    }
    ensure!(!vip_status(&status, &tunnel)?.all_down, "{tunnel} all down");
    let table = lbd.maps()?.table_addrs(&tunnel.key())?;
    ensure!(
        table == [good].into(),
        "{tunnel}'s table holds {:?}",
        names(bed, &table)
    );

    let seen = bed.who_many(PORT, 20)?;
    ensure!(
        seen.keys().eq([bed.name(0)]),
        "new connections to {tunnel} reached {seen:?}"
    );

    // Its own direct check brings it back on the tunnelled VIP too (wrongly, here: that is
    // what tunnel checks are for).
    lbctl.ok([
        "backend",
        "check",
        &tunnel.to_string(),
        &broken.to_string(),
        "--check",
        "tcp",
        "--interval",
        "500ms",
        "--check-timeout",
        "500ms",
    ])?;
    let since = Instant::now();
    let (took, _) = watch.until(since, Duration::from_secs(5), "direct check up", |s| {
        Ok(is_up(backend_status(s, &tunnel, broken)?))
    })?;
    eprintln!(
        "via_tunnel: {broken_name} up {:.2} s after its check became direct",
        secs(took)
    );
    lbd.expect_no_errors(|_| false)
}
