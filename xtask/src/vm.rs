//! `cargo xtask vm`: boots stock Debian kernels under qemu TCG with the host's filesystem shared
//! in read-only, runs lb-tests' kernel-facing test binaries in each guest, and prints a PASS/FAIL
//! table per kernel. The guest side lives in vm/ (see vm/README.md).

mod apt;
mod initramfs;
mod kernel;
mod qemu;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    setup::{SetupArgs, setup, vm_packages},
    util::{cargo, output, run, target_dir, workspace_root},
};
use apt::{Apt, DEFAULT_KERNELS};
use kernel::Kernel;
use qemu::{Boot, Ending};

/// The lb-tests test binaries run in every guest by default.
const DEFAULT_TESTS: &[&str] = &[
    "prog_test_run",
    "prog_test_run_v6",
    "prog_test_run_icmp",
    "kernel_tunnel",
];
/// Lines of the guest's console shown under a failed kernel.
const TAIL_LINES: usize = 40;

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// A kernel to boot: a package (`linux-image-6.1.0-50-amd64`) or a version series (`6.6`, the
    /// newest generic amd64 image of it in the configured suites). Repeatable. Default: the
    /// newest 6.1 (bookworm), 6.12 (bookworm-backports) and 7.x (trixie-backports).
    #[arg(long = "kernel", value_name = "PKG")]
    kernels: Vec<String>,
    /// An lb-tests test target to run in each guest. Repeatable. Default: `prog_test_run`,
    /// `prog_test_run_v6`, `prog_test_run_icmp` and `kernel_tunnel` (a default one not written
    /// yet is skipped with a note).
    #[arg(long = "test", value_name = "NAME")]
    tests: Vec<String>,
    /// Hard limit per kernel, boot included, in seconds; qemu is killed when it passes.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Run `apt-get update` on the private lists even when they exist.
    #[arg(long)]
    refresh: bool,
    /// Keep the guest's console in target/vm/<kernel>/console.log only (no live echo).
    #[arg(long)]
    quiet: bool,
    /// Arguments passed to every test binary in the guest (a name filter, `--nocapture`, ...).
    #[arg(last = true, value_name = "TEST_ARGS")]
    args: Vec<String>,
}

/// One kernel's outcome, for the table.
struct Outcome {
    package: String,
    release: String,
    verdict: Verdict,
    /// Kernel start to the guest's test script, from the guest's /proc/uptime.
    boot: Option<f64>,
    /// qemu start to qemu exit.
    total: Duration,
    /// (test binary, exit code, seconds) from the guest.
    tests: Vec<(String, i32, f64)>,
    console: PathBuf,
}

enum Verdict {
    Pass,
    TestsFailed,
    TimedOut,
    /// The guest stopped without writing a result (panic, failed mount, ...).
    NoResult,
    /// The host could not prepare or boot it.
    Error(String),
}

impl Verdict {
    fn label(&self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::TestsFailed => "FAIL (tests)",
            Self::TimedOut => "FAIL (timeout)",
            Self::NoResult => "FAIL (no result)",
            Self::Error(_) => "FAIL (host)",
        }
    }
}

pub fn vm(args: &VmArgs) -> Result<()> {
    setup(&SetupArgs::default())?;
    vm_packages()?;
    let tests = build_tests(args)?;
    let vm_dir = target_dir().join("vm");
    let _lock = lock(&vm_dir)?;
    let apt = Apt::open(&vm_dir, args.refresh)?;
    let busybox = busybox(&apt, &vm_dir)?;

    let specs: Vec<(String, Option<&str>)> = if args.kernels.is_empty() {
        DEFAULT_KERNELS
            .iter()
            .map(|(series, suite)| ((*series).to_owned(), Some(*suite)))
            .collect()
    } else {
        args.kernels.iter().map(|k| (k.clone(), None)).collect()
    };
    let mut outcomes = Vec::new();
    for (spec, suite) in specs {
        let package = if spec.starts_with("linux-") {
            spec
        } else {
            apt.resolve_series(&spec, suite)?
        };
        let started = Instant::now();
        let outcome = match boot_one(args, &apt, &vm_dir, &busybox, &package, &tests) {
            Ok(outcome) => outcome,
            Err(err) => Outcome {
                package: package.clone(),
                release: String::new(),
                verdict: Verdict::Error(format!("{err:#}")),
                boot: None,
                total: started.elapsed(),
                tests: Vec::new(),
                console: vm_dir.join(&package).join("console.log"),
            },
        };
        outcomes.push(outcome);
    }
    report(&outcomes)
}

/// Holds target/vm/lock for the whole run: two runs at once would share the per-kernel console
/// logs, run folders and unpacked kernels. The lock goes when the file is closed.
fn lock(vm_dir: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd as _;
    fs::create_dir_all(vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    let path = vm_dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("vm: another `cargo xtask vm` is running; waiting for it to finish");
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(file)
}

/// Builds lbd (the tests start it from target/debug) and the test binaries; returns
/// (test name, executable).
fn build_tests(args: &VmArgs) -> Result<Vec<(String, PathBuf)>> {
    run(cargo().args(["build", "-p", "lb-userspace", "--bins"]))?;
    let requested: Vec<&str> = if args.tests.is_empty() {
        DEFAULT_TESTS.to_vec()
    } else {
        args.tests.iter().map(String::as_str).collect()
    };
    let mut names = Vec::new();
    for name in requested {
        let source = workspace_root().join(format!("tests/tests/{name}.rs"));
        if source.exists() {
            names.push(name);
        } else if args.tests.is_empty() {
            println!(
                "vm: skipping test {name}: {} does not exist yet",
                source.display()
            );
        } else {
            bail!("no test target {name} ({} is missing)", source.display());
        }
    }
    if names.is_empty() {
        bail!("no test binary to run");
    }
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "lb-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for name in &names {
        cmd.args(["--test", name]);
    }
    let json = output(&mut cmd)?;
    names
        .iter()
        .map(|name| {
            let exe = find_executable(&json, name)
                .with_context(|| format!("cargo printed no executable for test {name}"))?;
            Ok(((*name).to_owned(), exe))
        })
        .collect()
}

/// The `"executable"` of the compiler-artifact message for test target `name` (cargo's JSON
/// messages are one object per line; paths of this workspace need no unescaping).
fn find_executable(json: &str, name: &str) -> Option<PathBuf> {
    let target = format!("\"name\":\"{name}\"");
    json.lines()
        .filter(|line| line.contains("\"reason\":\"compiler-artifact\"") && line.contains(&target))
        .find_map(|line| {
            let start = line.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + line[start..].find('"')?;
            Some(PathBuf::from(&line[start..end]))
        })
}

/// busybox from Debian's busybox-static package (bookworm), unpacked once.
fn busybox(apt: &Apt, vm_dir: &Path) -> Result<PathBuf> {
    let dir = vm_dir.join("busybox");
    let bin = dir.join("bin/busybox");
    if bin.exists() {
        return Ok(bin);
    }
    let deb = apt.deb("busybox-static")?;
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    run(std::process::Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -x --no-same-owner -C \"$2\" ./bin/busybox")
        .arg("sh")
        .arg(&deb)
        .arg(&dir))?;
    Ok(bin)
}

fn boot_one(
    args: &VmArgs,
    apt: &Apt,
    vm_dir: &Path,
    busybox: &Path,
    package: &str,
    tests: &[(String, PathBuf)],
) -> Result<Outcome> {
    println!("vm: {package}: preparing");
    let debs = apt.kernel_debs(package)?;
    let kernel = Kernel::unpack(&vm_dir.join("kernels"), package, &debs)?;
    let initramfs = initramfs::build(&kernel, busybox, &workspace_root().join("vm/init"))?;

    let out_dir = vm_dir.join(package);
    let run_dir = vm_dir.join("run").join(package);
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir).with_context(|| format!("clearing {}", run_dir.display()))?;
    }
    for dir in [&out_dir, &run_dir] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut job = String::new();
    for (name, exe) in tests {
        writeln!(job, "{name}\t{}", exe.display()).expect("writing to a String");
    }
    fs::write(run_dir.join("tests"), job).context("writing the job's test list")?;
    let mut test_args = args.args.join("\n");
    if !test_args.is_empty() {
        test_args.push('\n');
    }
    fs::write(run_dir.join("args"), test_args).context("writing the job's test arguments")?;

    let console = out_dir.join("console.log");
    let prefix = format!("[{}]", kernel.release);
    println!(
        "vm: {package}: booting {} under qemu TCG (timeout {} s, console in {})",
        kernel.image.display(),
        args.timeout,
        console.display()
    );
    let boot = Boot {
        kernel: &kernel,
        initramfs: &initramfs,
        run_dir: &run_dir,
        console: &console,
        memory_mib: args.memory,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
        echo: (!args.quiet).then_some(prefix.as_str()),
    };
    let started = Instant::now();
    let ending = boot.run()?;
    let total = started.elapsed();

    let status = fs::read_to_string(run_dir.join("status")).ok();
    let results = fs::read_to_string(run_dir.join("results")).unwrap_or_default();
    let tests = results
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next()?.to_owned();
            let code = fields.next()?.parse().ok()?;
            let secs = fields.next()?.parse().ok()?;
            Some((name, code, secs))
        })
        .collect();
    let boot_secs = fs::read_to_string(run_dir.join("boot"))
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok());
    let verdict = match (ending, status.as_deref().map(str::trim)) {
        (Ending::TimedOut, _) => Verdict::TimedOut,
        (Ending::Exited, Some("0")) => Verdict::Pass,
        (Ending::Exited, Some(_)) => Verdict::TestsFailed,
        (Ending::Exited, None) => Verdict::NoResult,
    };
    Ok(Outcome {
        package: package.to_owned(),
        release: kernel.release,
        verdict,
        boot: boot_secs,
        total,
        tests,
        console,
    })
}

fn report(outcomes: &[Outcome]) -> Result<()> {
    println!();
    println!("| kernel | release | result | boot (s) | total (s) | tests |");
    println!("|---|---|---|---|---|---|");
    for o in outcomes {
        let tests: Vec<String> = o
            .tests
            .iter()
            .map(|(name, code, secs)| {
                let mark = if *code == 0 { "ok" } else { "FAILED" };
                format!("{name} {mark} {secs:.0}s")
            })
            .collect();
        println!(
            "| {} | {} | {} | {} | {:.0} | {} |",
            o.package,
            o.release,
            o.verdict.label(),
            o.boot.map_or_else(|| "-".to_owned(), |b| format!("{b:.1}")),
            o.total.as_secs_f64(),
            tests.join(", ")
        );
    }
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !matches!(o.verdict, Verdict::Pass))
        .collect();
    for o in &failed {
        println!();
        println!("--- {} ({}) ---", o.package, o.verdict.label());
        if let Verdict::Error(err) = &o.verdict {
            println!("error: {err}");
        }
        let console = fs::read_to_string(&o.console).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        println!(
            "last {} lines of {}:",
            lines.len() - from,
            o.console.display()
        );
        for line in &lines[from..] {
            println!("  {line}");
        }
    }
    if failed.is_empty() {
        println!("vm: all {} kernels passed", outcomes.len());
        Ok(())
    } else {
        bail!("{} of {} kernels failed", failed.len(), outcomes.len())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::find_executable;

    #[test]
    fn finds_the_test_executable_in_cargo_json() {
        let json = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"lb_tests"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"prog_test_run"},"executable":"/w/target/debug/deps/prog_test_run-0123"}"#,
            "\n",
        );
        assert_eq!(
            find_executable(json, "prog_test_run"),
            Some(PathBuf::from("/w/target/debug/deps/prog_test_run-0123"))
        );
        assert_eq!(find_executable(json, "kernel_tunnel"), None);
    }
}
