//! Packet fuzzing of `lb_xdp`: 1,000,000 generated frames through `BPF_PROG_TEST_RUN`, each
//! checked against the host-side oracle (action, output frame, every global counter; the flow
//! table and traffic counters at checkpoints). The seed comes from the clock unless
//! `LB_FUZZ_SEED` fixes it; `LB_FUZZ_FRAMES` runs fewer (or more) frames. A failure prints the
//! seed and the frame in hex. Needs root.

use std::time::Instant;

use lb_tests::{
    bpf,
    fuzz::{self, Campaign, universe::Universe},
};

const FRAMES: u64 = 1_000_000;
/// Environment variable overriding `FRAMES` (a quicker run while developing).
const FRAMES_ENV: &str = "LB_FUZZ_FRAMES";

#[test]
fn a_million_fuzzed_frames_match_the_oracle() {
    if !bpf::is_root("BPF_PROG_TEST_RUN") {
        return;
    }
    let seed = fuzz::seed_from_env();
    eprintln!(
        "packet fuzz: seed {seed} (replay with {}={seed})",
        fuzz::SEED_ENV
    );
    let frames = match std::env::var(FRAMES_ENV) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{FRAMES_ENV}={text:?} is not a number")),
        Err(_) => FRAMES,
    };
    let mut campaign = Campaign::new(seed);
    let started = Instant::now();
    for _ in 0..frames {
        if let Err(mismatch) = campaign.step() {
            panic!("{mismatch}");
        }
    }
    if let Err(mismatch) = campaign.finish() {
        panic!("{mismatch}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = campaign.tally();
    eprintln!(
        "packet fuzz: {} frames in {elapsed:.1} s ({:.0} frames/s), program sees {} bytes of a \
         frame; by outcome:\n{}",
        tally.frames,
        tally.frames as f64 / elapsed,
        campaign.linear(),
        tally.report()
    );
    let missing: Vec<String> = tally.missing().iter().map(|c| c.name()).collect();
    assert!(
        missing.is_empty(),
        "seed {seed}: no frame reached {}",
        missing.join(", ")
    );
}

/// The checks are live: an oracle that believes slot 3 has another next-hop MAC than the one
/// installed must report the first frame forwarded there, pointing at the Ethernet header.
#[test]
fn a_wrong_prediction_is_reported_with_the_frame() {
    if !bpf::is_root("BPF_PROG_TEST_RUN") {
        return;
    }
    let installed = Universe::standard();
    let mut believed = installed.clone();
    for (index, slot) in &mut believed.slots {
        if *index == 3 {
            slot.dst_mac[5] ^= 0xff;
        }
    }
    let mut campaign = Campaign::with_universes(1, &installed, believed);
    let mismatch = (0..100_000)
        .find_map(|_| campaign.step().err())
        .expect("a frame forwarded to slot 3 within 100,000 frames");
    let report = mismatch.to_string();
    assert!(
        report.contains("at byte 5 (Ethernet header)") && report.contains("LB_FUZZ_SEED=1"),
        "{report}"
    );
    assert!(!mismatch.frame.is_empty(), "the report carries the frame");
}

/// The new encapsulations are checked too: an oracle that believes the IPv6 GUE slot (17)
/// listens on another UDP port must report the first frame forwarded there, in the outer
/// headers.
#[test]
fn a_wrong_gue_port_is_reported() {
    if !bpf::is_root("BPF_PROG_TEST_RUN") {
        return;
    }
    let installed = Universe::standard();
    let mut believed = installed.clone();
    for (index, slot) in &mut believed.slots {
        if *index == 17 {
            slot.encap_port = 6081u16.to_be();
        }
    }
    let mut campaign = Campaign::with_universes(2, &installed, believed);
    let mismatch = (0..100_000)
        .find_map(|_| campaign.step().err())
        .expect("a frame forwarded to slot 17 within 100,000 frames");
    let report = mismatch.to_string();
    assert!(report.contains("(outer headers)"), "{report}");
}
