//! Configured limits (issue 7) against a real lbd.
//!
//! - `changes_past_a_limit_are_refused`: lbd runs with `max_vips = 2`, `max_backends = 3` and
//!   `max_backends_per_vip = 2` in `[settings]`. `lbctl backend add`, `vip add` and
//!   `apply -f` (also as a dry run) past each limit fail with the setting and the limit named,
//!   and leave the export, the state file's bytes and the pinned maps as they were; changes up
//!   to the limits are then accepted.
//! - `bad_limits_stop_lbd`: a limit above the data plane's maximum or 0, a `--flow-table-size`
//!   of 0 or above 2^27, and a saved state above the config's limits each stop lbd at start with
//!   the key or flag named, before it touches the data plane or the state file.

use std::{fs, net::IpAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    lb::{BareLbd, Lbd, Unchanged, VipConfig, render_config},
    lbctl::Run,
    netns::topology::Topology,
};
use lb_userspace::{dataplane::kernel::AttachMode, model::VipId};

const PORT: u16 = 80;
const RING: u32 = 251;
const LIMITS: &str = "[settings]\nmax_vips = 2\nmax_backends = 3\nmax_backends_per_vip = 2\n\n";

#[test]
fn changes_past_a_limit_are_refused() {
    let topo = Topology::one_arm("lim")
        .backends(4)
        .build()
        .expect("topology");
    let vip = VipConfig {
        address: format!("{}:{PORT}/tcp", topo.vip),
        ring_size: Some(RING),
        backends: topo.backends[..2]
            .iter()
            .map(|b| (IpAddr::V4(b.ip()), 100))
            .collect(),
    };
    let config = format!("{LIMITS}{}", render_config(&[vip]));
    let gw = topo.gw();
    let lbd = Lbd::start(&gw.ns, &gw.ifaces(), AttachMode::Generic, &config).expect("lbd");
    lbd.finish(refusals(&topo, &lbd), |_| false);
}

fn refusals(topo: &Topology, lbd: &Lbd) -> Result<()> {
    let lbctl = lbd.lbctl()?;
    let v0 = format!("{}:{PORT}/tcp", topo.vip);
    let v1 = format!("{}:{}/tcp", topo.vip, PORT + 1);
    let v2 = format!("{}:{}/tcp", topo.vip, PORT + 2);
    let b = |i: usize| topo.backends[i].ip().to_string();
    let key = v0.parse::<VipId>()?.key();
    // Both backends resolved and in the table: the maps are as full as they get.
    wait_for(|| Ok(lbd.maps()?.table_addrs(&key)?.len() == 2))?;
    let before = Unchanged::take(lbd)?;

    let file = |name: &str, vips: &[(&str, &[usize])]| -> Result<String> {
        let text = render_config(
            &vips
                .iter()
                .map(|(address, backends)| VipConfig {
                    address: (*address).to_owned(),
                    ring_size: Some(RING),
                    backends: backends
                        .iter()
                        .map(|&i| (IpAddr::V4(topo.backends[i].ip()), 100))
                        .collect(),
                })
                .collect::<Vec<_>>(),
        );
        let path = lbd.run_dir.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.display().to_string())
    };
    let three_vips = file("three-vips.toml", &[(&v0, &[0, 1]), (&v1, &[]), (&v2, &[])])?;
    let four_backends = file("four-backends.toml", &[(&v0, &[0, 1]), (&v1, &[2, 3])])?;
    let three_on_one = file("three-on-one.toml", &[(&v0, &[0, 1, 2])])?;
    let ring = RING.to_string();

    let per_vip = "backends exceed the limit of 2 per VIP (settings.max_backends_per_vip)";
    let b2 = b(2);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["backend", "add", &v0, &b2],
            vec![&v0, "3 backends exceed", per_vip],
        ),
        (
            vec!["apply", "-f", &three_on_one],
            vec!["3 backends exceed", per_vip],
        ),
        (
            vec!["apply", "-f", &three_vips],
            vec!["3 VIPs exceed the limit of 2 (settings.max_vips)"],
        ),
        (
            vec!["apply", "-f", &three_vips, "--dry-run"],
            vec!["(settings.max_vips)"],
        ),
        (
            vec!["apply", "-f", &four_backends],
            vec!["4 backends over all VIPs exceed the limit of 3 (settings.max_backends)"],
        ),
    ];
    let mut failures = Vec::new();
    for (args, wants) in &cases {
        if let Err(e) = expect_refusal(&lbctl.run(args)?, wants) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    let after = Unchanged::take(lbd)?;
    ensure!(
        after.export == before.export,
        "export changed:\n{}",
        after.export
    );
    ensure!(
        after.state_file == before.state_file,
        "the state file changed"
    );
    ensure!(after.maps == before.maps, "the data plane changed");

    // Up to the limits: a second VIP with the third backend is accepted; then a third VIP and
    // a fourth backend are refused again.
    lbctl.ok(["vip", "add", &v1, "--ring-size", &ring])?;
    lbctl.ok(["backend", "add", &v1, &b(2)])?;
    let key1 = v1.parse::<VipId>()?.key();
    wait_for(|| Ok(lbd.maps()?.table_addrs(&key1)?.len() == 1))?;
    let full = Unchanged::take(lbd)?;
    expect_refusal(
        &lbctl.run(["vip", "add", &v2, "--ring-size", &ring])?,
        &["3 VIPs exceed the limit of 2 (settings.max_vips)"],
    )?;
    expect_refusal(
        &lbctl.run(["backend", "add", &v1, &b(3)])?,
        &["4 backends over all VIPs exceed the limit of 3 (settings.max_backends)"],
    )?;
    ensure!(
        Unchanged::take(lbd)? == full,
        "a refusal at the limits changed something"
    );
    eprintln!("limits: {} refusals checked", cases.len() + 2);
    Ok(())
}

/// lbctl failed (exit 1) and its error says every one of `wants`.
fn expect_refusal(run: &Run, wants: &[&str]) -> Result<()> {
    ensure!(run.code() == Some(1), "expected exit 1: {}", run.describe());
    let missing: Vec<&&str> = wants.iter().filter(|w| !run.stderr.contains(**w)).collect();
    ensure!(
        missing.is_empty(),
        "stderr does not say {missing:?}: {}",
        run.describe()
    );
    Ok(())
}

fn wait_for(mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done()? {
        ensure!(std::time::Instant::now() < deadline, "not done after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn bad_limits_stop_lbd() {
    let bare = BareLbd::new("limbad").expect("bare lbd");
    if let Err(e) = bad_limits(&bare) {
        panic!("{e:#}");
    }
}

/// Config, saved state, lbd arguments, and what stderr must say.
type StartCase<'a> = (&'a str, Option<&'a str>, Vec<&'a str>, Vec<&'a str>);

fn bad_limits(bare: &BareLbd) -> Result<()> {
    let socket = bare.run_dir.join("lbd.sock");
    let timeout = Duration::from_secs(20);
    // A saved state with two VIPs, for the case where the config's limit is lower.
    let two_vips = "vip = [\n  { address = \"10.0.0.1:80/tcp\", ring_size = 7 },\n  \
                    { address = \"10.0.0.2:80/tcp\", ring_size = 7 },\n]\n";
    let state = bare.state_path.display().to_string();
    let config = bare.config_path.display().to_string();
    let over_limit = format!(
        "state file {state}: vip: 2 VIPs exceed the limit of 1 (settings.max_vips); raise the \
         limit in {config}"
    );
    let cases: Vec<StartCase> = vec![
        (
            "[settings]\nmax_vips = 513\n",
            None,
            vec![],
            vec![
                &config,
                "settings.max_vips: 513 is out of range 1..=512 (the data plane's maximum)",
            ],
        ),
        (
            "[settings]\nmax_backends = 0\n",
            None,
            vec![],
            vec!["settings.max_backends: 0 is out of range 1..=8192"],
        ),
        (
            "[settings]\nmax_backends_per_vip = 9000\n",
            None,
            vec![],
            vec!["settings.max_backends_per_vip: 9000 is out of range 1..=8192"],
        ),
        (
            "",
            None,
            vec!["--flow-table-size", "0"],
            vec![
                "invalid value '0' for '--flow-table-size",
                "must be at least 1",
            ],
        ),
        (
            "",
            None,
            vec!["--flow-table-size", "134217729"],
            vec![
                "'--flow-table-size",
                "134217729 is above the maximum of 134217728",
            ],
        ),
        (
            "[settings]\nmax_vips = 1\n",
            Some(two_vips),
            vec![],
            vec![&over_limit],
        ),
    ];
    for (config_text, state_text, extra, wants) in &cases {
        fs::write(&bare.config_path, config_text)?;
        remove_if_there(&bare.state_path)?;
        if let Some(text) = state_text {
            fs::write(&bare.state_path, text)?;
        }
        let run = bare.run(&socket, extra, timeout)?;
        let what = format!("config {config_text:?}, args {extra:?}");
        ensure!(!run.success(), "{what}: lbd started: {}", run.describe());
        for want in wants {
            ensure!(
                run.stderr.contains(want),
                "{what}: stderr does not say {want:?}: {}",
                run.describe()
            );
        }
        // Refused before anything was touched: no pins, no program, no socket, and the state
        // file as it was (none written when there was none).
        if let Some(trace) = bare.data_plane_trace()? {
            anyhow::bail!("{what}: {trace}");
        }
        ensure!(!socket.exists(), "{what}: the socket was created");
        match state_text {
            Some(text) => ensure!(
                fs::read_to_string(&bare.state_path)? == *text,
                "{what}: the state file changed"
            ),
            None => ensure!(
                !bare.state_path.exists(),
                "{what}: a state file was written"
            ),
        }
    }
    eprintln!("bad limits: {} refusals at start checked", cases.len());
    Ok(())
}

fn remove_if_there(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}
