//! lbd and signals (issue 7), on a one-arm topology with real TCP through the VIP.
//!
//! - SIGTERM: lbd exits 0 and leaves the data plane pinned and forwarding: the link and map
//!   pins stay, the interface keeps its XDP program, a connection opened before keeps talking
//!   and new connections reach the backends while no lbd runs.
//! - `--detach-on-exit`: lbd started again with it adopts the pins and forwards; on SIGTERM it
//!   exits 0 having detached everything: the pin folder is gone, the interface has no XDP
//!   program (`ip link`, `bpftool net`) and no tc program, and the XDP and tcx links, the
//!   programs and the maps it ran (ids noted before) no longer exist in the kernel.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::MapData,
    programs::links::{FdLink, LinkType, PinnedLink},
};
use lb_common::maps;
use lb_tests::{
    lb::{Lbd, ServedTopology},
    netns::{Netns, topology::Topology},
    traffic::{Session, who},
};
use lb_userspace::dataplane::kernel::AttachMode;

const PORT: u16 = 80;

#[test]
fn sigterm_keeps_forwarding_and_detach_on_exit_removes_everything() {
    let bed = ServedTopology::build(
        Topology::one_arm("det").backends(2),
        AttachMode::Native,
        PORT,
    )
    .expect("topology");
    let mut lbd = bed.start_lbd().expect("lbd");
    let result = body(&bed, &mut lbd);
    lbd.finish(result, |_| false);
}

fn body(bed: &ServedTopology, lbd: &mut Lbd) -> Result<()> {
    let client = &bed.topo.client.ns;
    let target = bed.target();
    let gw = bed.topo.gw();
    let ifaces = gw.ifaces();
    reaches_backends(client, target).context("before SIGTERM")?;
    let mut session = Session::open(client, target)?;
    session.ping()?;

    // Plain SIGTERM: lbd goes, the data plane stays.
    let status = lbd.terminate()?;
    ensure!(status.success(), "lbd exited {status} on SIGTERM");
    for iface in &ifaces {
        let pin = lbd.pin_dir.join("links").join(iface);
        ensure!(pin.exists(), "{} gone after SIGTERM", pin.display());
        ensure!(
            xdp_on(&gw.ns, iface)?.is_some(),
            "{iface} lost its XDP program"
        );
    }
    for name in maps::BALANCER_MAPS {
        let pin = lbd.pin_dir.join("maps").join(name);
        ensure!(pin.exists(), "{} gone after SIGTERM", pin.display());
    }
    session
        .ping()
        .context("a connection opened before SIGTERM, after it")?;
    reaches_backends(client, target).context("after SIGTERM, without lbd")?;

    // --detach-on-exit: adopts, forwards, and on SIGTERM takes everything out.
    lbd.spawn_with_args(&["--detach-on-exit"])?;
    session.ping().context("after the restart")?;
    reaches_backends(client, target).context("with --detach-on-exit")?;
    let ids = KernelIds::note(lbd, &ifaces)?;
    for iface in &ifaces {
        // What bpftool sees while lbd runs: its XDP program (bpftool 7.1 does not list tcx
        // links; `KernelIds` has them, by link id).
        let (xdp, _, net) = attached(&gw.ns, iface)?;
        ensure!(xdp == 1, "{iface} while lbd runs: {net}");
    }
    let status = lbd.terminate()?;
    ensure!(
        status.success(),
        "lbd --detach-on-exit exited {status} on SIGTERM"
    );
    ensure!(
        lbd.log().contains("data plane detached and unpinned"),
        "lbd did not report the detach"
    );
    ensure!(
        !lbd.pin_dir.exists(),
        "{} is still there: {:?}",
        lbd.pin_dir.display(),
        walk(&lbd.pin_dir)
    );
    for iface in &ifaces {
        if let Some(line) = xdp_on(&gw.ns, iface)? {
            bail!("{iface} still has an XDP program: {line}");
        }
        let (xdp, tc, net) = attached(&gw.ns, iface)?;
        ensure!(
            xdp + tc == 0,
            "{iface}: {xdp} XDP and {tc} tc program(s) left: {net}"
        );
    }
    ids.wait_gone()?;
    eprintln!(
        "detach: {} link(s), {} program(s) and {} map(s) gone from the kernel",
        ids.links.len(),
        ids.progs.len(),
        ids.maps.len()
    );
    Ok(())
}

/// New connections get an answer from a backend (retried briefly: the first may wait on ARP).
fn reaches_backends(client: &Netns, target: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        loop {
            match who(client, target) {
                Ok(name) => {
                    seen.insert(name);
                    break;
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    ensure!(
        seen.iter().all(|n| n.starts_with("backend")),
        "answers from {seen:?}"
    );
    Ok(())
}

/// XDP and tc (tcx included) programs on `iface` as `bpftool net` lists them, and its output.
fn attached(ns: &Netns, iface: &str) -> Result<(usize, usize, String)> {
    let out = ns.exec(["bpftool", "-j", "net", "show", "dev", iface])?;
    let net: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bpftool net show: {out}"))?;
    let count = |hook: &str| {
        net[0][hook]
            .as_array()
            .map(Vec::len)
            .with_context(|| format!("no {hook} list in {out}"))
    };
    Ok((count("xdp")?, count("tc")?, out))
}

/// The `prog/xdp` part of `ip -d link show dev iface`, if it has one.
fn xdp_on(ns: &Netns, iface: &str) -> Result<Option<String>> {
    let link = ns.ip(["-d", "link", "show", "dev", iface])?;
    Ok(link
        .lines()
        .find(|l| l.contains("prog/xdp") || l.trim_start().starts_with("xdp"))
        .map(|l| l.trim().to_owned()))
}

/// The links, programs and maps a running lbd has in the kernel, by id.
struct KernelIds {
    links: BTreeSet<u32>,
    progs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
}

impl KernelIds {
    /// Reads the ids through the pins; every handle is closed again before returning, so
    /// the test holds nothing alive.
    fn note(lbd: &Lbd, ifaces: &[&str]) -> Result<Self> {
        let mut progs = BTreeSet::new();
        let mut links = BTreeSet::new();
        for (dir, kind) in [("links", LinkType::Xdp), ("hc-links", LinkType::Tcx)] {
            for iface in ifaces {
                let pin = lbd.pin_dir.join(dir).join(iface);
                let link = FdLink::from(
                    PinnedLink::from_pin(&pin)
                        .with_context(|| format!("opening {}", pin.display()))?,
                );
                let info = link.info().context("link info")?;
                let found = info.link_type().context("link type")?;
                ensure!(found == kind, "{}: a {found:?} link", pin.display());
                progs.insert(info.program_id());
                links.insert(info.id());
            }
        }
        let mut ids = BTreeSet::new();
        for name in maps::BALANCER_MAPS {
            let pin = lbd.pin_dir.join("maps").join(name);
            let map =
                MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
            ids.insert(map.info().context("map info")?.id());
        }
        Ok(Self {
            links,
            progs,
            maps: ids,
        })
    }

    /// Waits (the kernel frees them after the last descriptor closes, a moment later) until
    /// none of the ids exists.
    fn wait_gone(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let progs: BTreeSet<u32> = aya::programs::loaded_programs()
                .filter_map(|p| p.ok().map(|p| p.id()))
                .filter(|id| self.progs.contains(id))
                .collect();
            let maps: BTreeSet<u32> = aya::maps::loaded_maps()
                .filter_map(|m| m.ok().map(|m| m.id()))
                .filter(|id| self.maps.contains(id))
                .collect();
            let links: BTreeSet<u32> = aya::programs::loaded_links()
                .filter_map(|l| l.ok().map(|l| l.id()))
                .filter(|id| self.links.contains(id))
                .collect();
            if links.is_empty() && progs.is_empty() && maps.is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "still in the kernel 10 s after lbd exited: links {links:?}, programs \
                 {progs:?}, maps {maps:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every path under `dir`, for a failure message.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            out.push(entry.path().display().to_string());
            out.extend(walk(&entry.path()));
        }
    }
    out
}
