//! `cargo xtask demo`: the load balancer on a throwaway namespace topology. A client, a gateway
//! running lbd with `lb_xdp` in native mode, and three backends that decapsulate with `lb_decap`
//! and run a small HTTP server; real HTTP requests (curl) go to the VIP and the demo prints
//! which backend answered each; then it drains a backend, and shows `lbctl stats` and the
//! per-VIP and per-backend packet counters of `/metrics`. Everything is torn down at the end,
//! also on failure.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use lb_tests::{
    lb::{ServedTopology, VipConfig, render_config},
    netns::topology::Topology,
};
use lb_userspace::dataplane::kernel::AttachMode;

const REQUESTS: usize = 12;
const PORT: u16 = 80;

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn demo() -> Result<()> {
    println!("== building the topology: client, gateway gw0, backend1..3 on one bridge");
    let bed = ServedTopology::build(
        Topology::one_arm("demo").backends(3),
        AttachMode::Native,
        PORT,
    )?;
    let topo = &bed.topo;
    let vip = IpAddr::V4(topo.vip);
    println!("   client   {}", topo.client.ip());
    println!(
        "   gateway  {} (lbd, lb_xdp native on eth0)",
        topo.gw().front.ip
    );
    for b in &topo.backends {
        println!("   {} {} (VIP on lo, lb_decap on eth0)", b.name, b.ip());
    }

    println!(
        "\n== lbd config (lb.toml):\n{}",
        render_config(&[VipConfig::for_topology(topo, PORT)])
    );
    let lbd = bed.start_lbd()?;
    println!("== lbd is running; its log so far:");
    for line in lbd
        .log()
        .lines()
        .filter(|l| l.contains("INFO") || l.contains("ERROR"))
    {
        println!("   {}", strip_ansi(line));
    }

    let url = format!("http://{}/", SocketAddr::new(vip, PORT));
    println!("\n== {REQUESTS} HTTP requests from the client to {url}");
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=REQUESTS {
        let body = topo
            .client
            .ns
            .exec(["curl", "-sS", "--max-time", "5", &url])
            .with_context(|| format!("request {i}"))?;
        let backend = body.trim().to_owned();
        println!("   request {i:2} -> answered by {backend}");
        *answered.entry(backend).or_default() += 1;
    }
    println!("\n== answers per backend: {answered:?}");

    // Live reconfiguration: drain one backend, and new requests stop reaching it.
    let lbctl = lbd.lbctl()?;
    let vip_id = format!("{}/tcp", SocketAddr::new(vip, PORT));
    let drained = topo.backends[0].ip().to_string();
    println!("\n== lbctl backend drain {vip_id} {drained}");
    print!(
        "{}",
        indent(&lbctl.ok(["backend", "drain", &vip_id, &drained])?)
    );
    println!("== lbctl status");
    print!("{}", indent(&lbctl.ok(["status"])?));
    let mut after: BTreeMap<String, usize> = BTreeMap::new();
    for i in 1..=REQUESTS {
        let body = topo
            .client
            .ns
            .exec(["curl", "-sS", "--max-time", "5", &url])
            .with_context(|| format!("request {i} after the drain"))?;
        *after.entry(body.trim().to_owned()).or_default() += 1;
    }
    println!("== {REQUESTS} more requests, answers per backend: {after:?}");

    // Observability: rates per VIP and backend, and the Prometheus exposition on the
    // gateway's 127.0.0.1:9100 (the status page is at / there).
    println!("\n== lbctl stats");
    print!("{}", indent(&lbctl.ok(["stats"])?));
    let (status, metrics) = lbd.http_get("/metrics")?;
    anyhow::ensure!(status == 200, "GET /metrics: {status}");
    println!(
        "== GET http://127.0.0.1:9100/metrics (in the gateway's namespace), per-VIP and per-backend packets:"
    );
    for line in metrics.lines().filter(|l| {
        l.starts_with("lb_vip_packets_total") || l.starts_with("lb_backend_packets_total")
    }) {
        println!("   {line}");
    }
    println!("== tearing down (lbd stopped, programs detached, namespaces deleted)");
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().flat_map(|l| ["   ", l, "\n"]).collect()
}

/// lbd's text log colours its fields; the demo prints plain text.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
