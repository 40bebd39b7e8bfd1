//! Developer entry points: `cargo xtask setup | build | run | test | demo | bench | fuzz |
//! fmt | clippy | install | vm`.

mod install;
mod setup;
mod tasks;
mod util;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    about = "Build, run and test the XDP load balancer"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Install what building and testing need (apt packages, nightly + rust-src, bpf-linker,
    /// bpffs). Safe to run again: it only does what is missing.
    Setup(setup::SetupArgs),
    /// Set up, then build lbd and lb-decap (which embed the eBPF objects).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run lbd with the arguments after `--`.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true, value_name = "LBD_ARGS")]
        args: Vec<String>,
    },
    /// Set up, build everything, then run every test (namespace tests need root).
    Test(tasks::TestArgs),
    /// Set up, build, then run the demo (lb-demo).
    Demo {
        #[arg(long)]
        release: bool,
        #[arg(last = true, value_name = "DEMO_ARGS")]
        args: Vec<String>,
    },
    /// Set up, build in release mode, then run the benchmarks (lb-bench, needs root): a
    /// Markdown table on stdout, JSON in target/bench/.
    Bench {
        /// Short runs (10x fewer repeats, the smaller Maglev size).
        #[arg(long)]
        quick: bool,
        #[arg(last = true, value_name = "BENCH_ARGS")]
        args: Vec<String>,
    },
    /// Set up, build in release mode, then fuzz `lb_xdp` through `BPF_PROG_TEST_RUN` (lb-fuzz,
    /// needs root): random and mutated frames checked against a reference of what the program
    /// must do. Exits non-zero on the first mismatch, printing the frame and the seed.
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 10_000_000)]
        packets: u64,
        /// Seed (decimal or 0x hex); default from `LB_FUZZ_SEED`, else the clock.
        #[arg(long)]
        seed: Option<String>,
    },
    /// Format the whole workspace (`--check` only reports).
    Fmt {
        #[arg(long)]
        check: bool,
    },
    /// Clippy on every crate and target, warnings as errors.
    Clippy,
    /// Build release binaries, then install them, the systemd unit and a first config (an
    /// existing /etc/lb/lb.toml or lbd.env is never overwritten). Safe to run again.
    Install(install::InstallArgs),
    /// Boot stock Debian kernels under qemu (TCG) and run the kernel-facing tests in each:
    /// the `prog_test_run*` tests (the verifier and the programs) and `kernel_tunnel` (backends
    /// that decapsulate with the kernel's ipip, ip6tnl and fou devices). Installs qemu and kmod; kernels and the guest
    /// are cached in target/vm/.
    Vm(vm::VmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup(args) => setup::setup(&args),
        Cmd::Build { release } => tasks::build(release),
        Cmd::Run { release, args } => tasks::run_lbd(release, &args),
        Cmd::Test(args) => tasks::test(&args),
        Cmd::Demo { release, args } => tasks::demo(release, &args),
        Cmd::Bench { quick, args } => tasks::bench(quick, &args),
        Cmd::Fuzz { packets, seed } => tasks::fuzz(packets, seed.as_deref()),
        Cmd::Fmt { check } => tasks::fmt(check),
        Cmd::Clippy => tasks::clippy(),
        Cmd::Install(args) => install::install(&args),
        Cmd::Vm(args) => vm::vm(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
