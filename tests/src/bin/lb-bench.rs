//! `cargo xtask bench`: runs the benchmark sections (`--section NAME`, repeatable; default
//! all; `--quick` for short runs), prints every figure beside its baseline as a Markdown table
//! and writes them with the machine's description to `target/bench/bench-<unix time>.json` and
//! `target/bench/latest.json`.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Command, ExitCode},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::bench::{self, Figure};
use serde::Serialize;

type Section = fn(bool) -> Result<Vec<Figure>>;

/// Every section, in the order they run.
const SECTIONS: [(&str, Section); 6] = [
    ("test_run", bench::test_run::run),
    ("breakdown", bench::breakdown::run),
    ("maglev", bench::maglev::run),
    ("reconfig", bench::reconfig::run),
    ("health", bench::health::run),
    ("throughput", bench::throughput::run),
];

const USAGE: &str = "usage: lb-bench [--quick] [--section NAME]... [--out DIR]";

struct Args {
    quick: bool,
    sections: Vec<String>,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        sections: Vec::new(),
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--section" => {
                let name = it.next().context("--section needs a name")?;
                if !SECTIONS.iter().any(|(s, _)| *s == name) {
                    let known: Vec<_> = SECTIONS.iter().map(|(s, _)| *s).collect();
                    bail!("unknown section {name:?} (known: {})", known.join(", "));
                }
                args.sections.push(name);
            }
            "--out" => args.out = PathBuf::from(it.next().context("--out needs a folder")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unexpected argument {other:?}\n{USAGE}"),
        }
    }
    Ok(args)
}

/// What the figures were measured on.
#[derive(Serialize)]
struct Machine {
    kernel: String,
    cpu: String,
    nproc: usize,
    /// Seconds since the Unix epoch.
    date: u64,
    commit: String,
}

fn machine(date: u64) -> Machine {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_string());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        );
    Machine {
        kernel,
        cpu,
        nproc: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        date,
        commit,
    }
}

#[derive(Serialize)]
struct Report<'a> {
    machine: Machine,
    quick: bool,
    figures: &'a [Figure],
    /// Sections that failed, with their error.
    failed: Vec<(String, String)>,
}

fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(figures: &[Figure]) -> String {
    let mut out = String::from(
        "| figure | value | unit | stats | baseline | target | note |\n|---|---:|---|---|---|---|---|\n",
    );
    for f in figures {
        let stats: Vec<String> = f
            .stats
            .iter()
            .map(|(k, v)| format!("{k} {}", number(*v)))
            .collect();
        let baseline = f
            .baseline
            .as_ref()
            .map_or_else(String::new, |(name, v)| format!("{name}: {}", number(*v)));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            f.name,
            number(f.value),
            f.unit,
            stats.join(", "),
            baseline,
            f.target.as_deref().unwrap_or(""),
            f.note
        );
    }
    out
}

fn bench() -> Result<bool> {
    let args = parse_args()?;
    let date = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    // Before the sections: test_run pins the process to one CPU.
    let machine = machine(date);
    let mut figures = Vec::new();
    let mut failed = Vec::new();
    for (name, run) in SECTIONS {
        if !args.sections.is_empty() && !args.sections.iter().any(|s| s == name) {
            continue;
        }
        eprintln!("lb-bench: {name}...");
        match run(args.quick) {
            Ok(found) => figures.extend(found),
            Err(e) => {
                eprintln!("lb-bench: section {name} failed: {e:#}");
                failed.push((name.to_string(), format!("{e:#}")));
            }
        }
    }
    print!("{}", markdown(&figures));
    println!(
        "\n{} ({} CPUs), kernel {}, commit {}{}",
        machine.cpu,
        machine.nproc,
        machine.kernel,
        machine.commit,
        if args.quick { ", --quick" } else { "" }
    );
    let ok = failed.is_empty();
    let report = Report {
        machine,
        quick: args.quick,
        figures: &figures,
        failed,
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for file in [format!("bench-{date}.json"), "latest.json".to_string()] {
        let path = args.out.join(file);
        std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("lb-bench: wrote {}", args.out.join("latest.json").display());
    Ok(ok)
}

fn main() -> ExitCode {
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
