//! `cargo xtask fuzz`: a long packet-fuzzing campaign against `lb_xdp` (see `lb_tests::fuzz`).
//! Prints the seed, progress every few seconds and the frames per outcome class; exits 1 on
//! the first frame whose outcome differs from the oracle's, printing it in hex with the seed.
//! Needs root (`BPF_PROG_TEST_RUN`).

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::fuzz::{self, Campaign};

const USAGE: &str = "usage: lb-fuzz [--packets N] [--seed S]   (seed: decimal or 0x hex; \
                     default from LB_FUZZ_SEED, else the clock)";
const DEFAULT_PACKETS: u64 = 10_000_000;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

struct Args {
    packets: u64,
    seed: u64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        packets: DEFAULT_PACKETS,
        seed: fuzz::seed_from_env(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--packets" => {
                let text = value("--packets")?.replace('_', "");
                args.packets = text
                    .parse()
                    .with_context(|| format!("--packets {text:?} is not a count"))?;
            }
            "--seed" => {
                let text = value("--seed")?;
                args.seed = fuzz::parse_seed(&text)
                    .with_context(|| format!("--seed {text:?} is not a number"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// True when every frame matched the oracle.
fn run() -> Result<bool> {
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("lb-fuzz needs root (BPF_PROG_TEST_RUN)");
    }
    println!(
        "lb-fuzz: {} frames, seed {} (replay with --seed {} or {}={})",
        args.packets,
        args.seed,
        args.seed,
        fuzz::SEED_ENV,
        args.seed
    );
    let mut campaign = Campaign::new(args.seed);
    println!(
        "lb-fuzz: the program sees the first {} bytes of a frame (the rest of a test-run frame \
         is in frags)",
        campaign.linear()
    );
    let started = Instant::now();
    let mut last = started;
    for _ in 0..args.packets {
        if let Err(mismatch) = campaign.step() {
            eprintln!("{mismatch}");
            println!("{}", campaign.tally().report());
            return Ok(false);
        }
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let done = campaign.tally().frames;
            let rate = done as f64 / started.elapsed().as_secs_f64();
            let left = (args.packets - done) as f64 / rate;
            println!(
                "lb-fuzz: {done} frames ({:.1}%), {rate:.0} frames/s, about {left:.0} s left",
                done as f64 * 100.0 / args.packets as f64
            );
        }
    }
    if let Err(mismatch) = campaign.finish() {
        eprintln!("{mismatch}");
        return Ok(false);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tally = campaign.tally();
    println!(
        "lb-fuzz: all {} frames matched the oracle in {elapsed:.1} s ({:.0} frames/s)",
        tally.frames,
        tally.frames as f64 / elapsed
    );
    println!("{}", tally.report());
    let missing: Vec<String> = tally.missing().iter().map(|c| c.name()).collect();
    if !missing.is_empty() {
        eprintln!("lb-fuzz: no frame reached {}", missing.join(", "));
        return Ok(false);
    }
    Ok(true)
}
