//! BPF plumbing for tests: the root check, per-test pin folders removed on drop, loading programs
//! with the verifier's log on failure, and one `BPF_PROG_TEST_RUN` call with its output.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, TestRun, TestRunOptions, TestRunResult,
    programs::{Program, ProgramError},
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Without a context ifindex, `BPF_PROG_TEST_RUN` runs a program as if on the loopback device of
/// the caller's namespace, which is always ifindex 1: a slot egressing there needs no redirect.
pub const TEST_RUN_IFINDEX: u32 = 1;

/// Pins this thread to the CPU it is on. `BPF_PROG_TEST_RUN` runs a program on the caller's
/// CPU, so a test of per-CPU state (the LRU lists, the rate guard) or a measurement must not
/// migrate between runs.
pub fn pin_to_current_cpu() -> anyhow::Result<()> {
    // SAFETY: plain syscalls on this thread with a zeroed, then filled, cpu set.
    unsafe {
        let cpu = libc::sched_getcpu();
        anyhow::ensure!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        anyhow::ensure!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Whether this process is root; if not, says the test is skipped because it `needs` root for
/// that (BPF maps, pins, namespaces...).
pub fn is_root(needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: needs root ({needs}); run the tests as root");
    }
    root
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A unique pin folder under /sys/fs/bpf, named like the harness's (`lbt-<pid>-...`, so a
/// crashed run's leftovers are swept), removed with every pin in it on drop: that also detaches
/// the links pinned there.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(label: &str) -> Self {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/lbt-{}-{seq}-{label}",
            std::process::id()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Where the data plane pins map `name`.
    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join("maps").join(name)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// A program load error, with the verifier's log when it rejected the program.
pub fn load_error(what: &str, e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!("verifier rejected {what}: {io_error}\n{verifier_log}"),
        other => format!("loading {what}: {other}"),
    }
}

/// Loads program `name` of `ebpf` (XDP or tc), panicking with the verifier's log.
pub fn load_program(ebpf: &mut Ebpf, name: &str) {
    let result = match ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("{name} in the object"))
    {
        Program::Xdp(prog) => prog.load(),
        Program::SchedClassifier(prog) => prog.load(),
        _ => panic!("{name} is neither XDP nor a tc classifier"),
    };
    result.unwrap_or_else(|e| panic!("{}", load_error(name, &e)));
}

/// What one run returned.
pub struct Run {
    pub action: u32,
    pub frame: Vec<u8>,
    pub nanos: u64,
}

/// Runs `prog` once on `frame` (no context).
pub fn test_run<P>(prog: &P, frame: &[u8]) -> Run
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    run_with(prog, frame, None)
}

/// Runs `prog` once on `frame` with context `ctx_in`; the context the kernel writes back lands
/// in `ctx_out`.
pub fn test_run_ctx<P>(prog: &P, frame: &[u8], ctx_in: &[u8], ctx_out: &mut [u8]) -> Run
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    run_with(prog, frame, Some((ctx_in, ctx_out)))
}

fn run_with<P>(prog: &P, frame: &[u8], ctx: Option<(&[u8], &mut [u8])>) -> Run
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let (ctx_in, ctx_out) = ctx.map_or((None, None), |(i, o)| (Some(i), Some(o)));
    // repeat = 1: with more, the kernel runs the program again on the already modified buffer.
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            ctx_out,
            repeat: 1,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    out.truncate(result.data_size_out as usize);
    Run {
        action: result.return_value,
        frame: out,
        nanos: result.duration.as_nanos() as u64,
    }
}
