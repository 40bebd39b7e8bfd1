//! Where a packet's time goes: the test-run paths that have targets, on the full balancer and on
//! objects built with one stage knocked out (lb-ebpf's `knockout-*` features, see
//! lb-ebpf/src/knockout.rs). A stage's cost is the full object's net time minus the knocked-out
//! object's, all measured in the same run. Every object here is built from the same source with
//! the same command as lbd's (`lb-userspace/ebpf_build.rs`), into `target/ebpf-bench`, so lbd's
//! own objects are never replaced by a variant.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, ensure};

use super::{
    Figure,
    test_run::{
        Case, NEW_FLOW_TABLE, RUNS, Reset, balancer_from, establish, hit_case, lb_fd, new_syn_case,
        non_vip_case,
    },
};
use crate::{balancer::Lb, bpf::pin_to_current_cpu};

#[path = "../../../lb-userspace/ebpf_build.rs"]
mod ebpf_build;

/// The packet paths broken down.
#[derive(Clone, Copy)]
enum Kind {
    NonVip,
    Hit,
    NewSyn,
}

use Kind::{Hit, NewSyn, NonVip};

/// (knock-out feature suffix, what it removes, the paths where that stage runs).
const KNOCKOUTS: [(&str, &str, &[Kind]); 6] = [
    ("stats", "counters", &[NonVip, Hit, NewSyn]),
    ("entropy", "outer-source entropy", &[Hit, NewSyn]),
    ("encap", "encapsulation", &[Hit, NewSyn]),
    ("flow-lookup", "flow-table lookup", &[Hit]),
    ("flow-insert", "flow-table insert", &[NewSyn]),
    ("guard", "new-flow rate guard (no limit set)", &[NewSyn]),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-tests sits in the workspace")
        .to_path_buf()
}

/// Builds the balancer object with `features` and returns its bytes.
fn build(features: &str) -> Result<Vec<u8>> {
    let root = workspace_root();
    let object = ebpf_build::build(
        &root,
        &root.join("target/ebpf-bench"),
        "bpf-balancer",
        features,
    )
    .map_err(|e| anyhow!(e))?;
    std::fs::read(&object).with_context(|| format!("reading {}", object.display()))
}

fn case(path: Kind) -> Case {
    match path {
        NonVip => non_vip_case(),
        Hit => hit_case(),
        NewSyn => new_syn_case(),
    }
}

/// The balancer from `object`, with the client flow of the hit case established.
fn load(object: &[u8]) -> Result<Lb> {
    let lb = balancer_from(object, NEW_FLOW_TABLE)?;
    establish(&lb)?;
    Ok(lb)
}

/// One run of `case` through `lb`: mean ns/packet, gross.
fn once(reset: &mut Reset, lb: &Lb, case: &Case, repeat: u32) -> Result<f64> {
    reset.target(&lb_fd(lb)?)?;
    let (action, ns) = reset.run(&case.frame, repeat)?;
    ensure!(
        action == case.action,
        "{}: expected XDP action {}, got {action}",
        case.name,
        case.action
    );
    Ok(ns)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// One figure per (path, stage): the stage's cost on that path. Runs alternate between the
/// reset baseline, the full object and the knocked-out one, so drift (and the kernel freeing
/// the previous pair's tables) weighs on all three alike; the figure is the median of the
/// per-run differences.
pub fn run(quick: bool) -> Result<Vec<Figure>> {
    pin_to_current_cpu()?;
    let mut reset = Reset::load()?;
    let full_object = build("balancer")?;
    let mut figures = Vec::new();
    for (feature, stage, paths) in KNOCKOUTS {
        let object = build(&format!("balancer,knockout-{feature}"))?;
        let full = load(&full_object)?;
        let without = load(&object).with_context(|| format!("the object without {stage}"))?;
        for &path in paths {
            let case = case(path);
            let repeat = case.repeat(quick);
            reset.template(&case.frame, case.flows)?;
            let (mut full_net, mut without_net, mut saved) = (vec![], vec![], vec![]);
            for _ in 0..RUNS {
                reset.target_pass()?;
                let (_, base) = reset.run(&case.frame, repeat)?;
                let with_ns = once(&mut reset, &full, &case, repeat)?;
                let without_ns = once(&mut reset, &without, &case, repeat)?;
                full_net.push(with_ns - base);
                without_net.push(without_ns - base);
                saved.push(with_ns - without_ns);
            }
            figures.push(Figure {
                section: "breakdown",
                name: format!("{}: {stage}", case.name),
                value: median(saved),
                unit: "ns/packet",
                stats: vec![("net without it (median)".into(), median(without_net))],
                baseline: Some(("full program, net (median)".into(), median(full_net))),
                target: None,
                note: format!(
                    "median of {RUNS} paired runs x repeat {repeat}, full minus knockout-{feature}"
                ),
            });
        }
    }
    Ok(figures)
}
