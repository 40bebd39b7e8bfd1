//! Build, run, test, demo, bench and fuzz: thin sequences of cargo invocations after `setup`.

use std::{os::unix::process::CommandExt as _, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup::{SetupArgs, setup},
    util::{Tally, cargo, describe, run, run_tests, target_dir},
};

/// The crate holding the namespace tests, which are run on their own with few threads.
const NETNS_TEST_CRATE: &str = "lb-tests";
/// Built for bpfel-unknown-none by lb-userspace's build.rs; on the host it is only a stub for
/// clippy, and its bins would overwrite lb-userspace's bins of the same name in target/.
const EBPF_CRATE: &str = "lb-ebpf";

fn profile_dir(release: bool) -> PathBuf {
    target_dir().join(if release { "release" } else { "debug" })
}

fn release_flag(release: bool) -> &'static [&'static str] {
    if release { &["--release"] } else { &[] }
}

pub fn build(release: bool) -> Result<()> {
    setup(&SetupArgs::default())?;
    run(cargo()
        .args(["build", "-p", "lb-userspace", "--bins"])
        .args(release_flag(release)))
}

pub fn run_lbd(release: bool, args: &[String]) -> Result<()> {
    build(release)?;
    let lbd = profile_dir(release).join("lbd");
    let mut cmd = std::process::Command::new(&lbd);
    cmd.args(args);
    // exec only returns on failure.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", describe(&cmd)))
}

#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Test threads for the namespace/BPF tests (lb-tests); they are heavy on 2 cores.
    #[arg(long, default_value_t = 1)]
    netns_threads: usize,
    /// Arguments passed to every test binary (a name filter, `--nocapture`, ...).
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

pub fn test(args: &TestArgs) -> Result<()> {
    let started = Instant::now();
    let mut tally = Tally::default();
    let result = test_steps(args, &mut tally);
    let elapsed = started.elapsed().as_secs_f64();
    match &result {
        Ok(()) => println!("xtask test: all tests passed in {elapsed:.1} s"),
        Err(_) => println!("xtask test: FAILED after {elapsed:.1} s"),
    }
    // One closing line with the totals of every test binary, for people and CI alike.
    println!(
        "summary: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    result
}

fn test_steps(args: &TestArgs, tally: &mut Tally) -> Result<()> {
    setup(&SetupArgs::default())?;
    run(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        EBPF_CRATE,
        "--all-targets",
    ]))?;
    // Both runs happen even when the first fails, so one report shows every failure.
    let unit = run_tests(
        cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                NETNS_TEST_CRATE,
                "--exclude",
                EBPF_CRATE,
            ])
            .arg("--")
            .args(&args.args),
        tally,
    );
    let netns = run_tests(
        cargo()
            .args(["test", "-p", NETNS_TEST_CRATE, "--"])
            .arg(format!("--test-threads={}", args.netns_threads))
            .args(&args.args),
        tally,
    );
    match (unit, netns) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(unit), Ok(())) => Err(unit),
        (Ok(()), Err(netns)) => Err(netns),
        (Err(unit), Err(netns)) => bail!("{unit:#}; {netns:#}"),
    }
}

pub fn demo(release: bool, args: &[String]) -> Result<()> {
    // The demo finds lbd next to itself.
    exec_test_bin("lb-demo", release, args)
}

/// Release build of lbd and lb-bench, then lb-bench (which writes target/bench/ relative to the
/// workspace root, where cargo runs xtask).
pub fn bench(quick: bool, args: &[String]) -> Result<()> {
    let mut bench_args = Vec::new();
    if quick {
        bench_args.push("--quick".to_owned());
    }
    bench_args.push("--out".to_owned());
    bench_args.push(target_dir().join("bench").display().to_string());
    bench_args.extend_from_slice(args);
    exec_test_bin("lb-bench", true, &bench_args)
}

/// Release build of lb-fuzz, then a campaign of `packets` frames.
pub fn fuzz(packets: u64, seed: Option<&str>) -> Result<()> {
    let mut args = vec!["--packets".to_owned(), packets.to_string()];
    if let Some(seed) = seed {
        args.push("--seed".to_owned());
        args.push(seed.to_owned());
    }
    exec_test_bin("lb-fuzz", true, &args)
}

/// Sets up, builds lbd and lb-tests' binary `bin`, then becomes `bin args`.
fn exec_test_bin(bin: &str, release: bool, args: &[String]) -> Result<()> {
    setup(&SetupArgs::default())?;
    run(cargo()
        .args([
            "build",
            "-p",
            "lb-userspace",
            "--bins",
            "-p",
            NETNS_TEST_CRATE,
            "--bin",
            bin,
        ])
        .args(release_flag(release)))?;
    let mut cmd = std::process::Command::new(profile_dir(release).join(bin));
    cmd.args(args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec `{}`", describe(&cmd)))
}

pub fn fmt(check: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["fmt", "--all"]);
    if check {
        cmd.args(["--", "--check"]);
    }
    run(&mut cmd)
}

pub fn clippy() -> Result<()> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}
