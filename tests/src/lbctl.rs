//! lbctl as a test drives it: the built binary run against one lbd's socket, bounded in time,
//! with its exit status, stdout and stderr, and `--json` replies parsed into the control API's
//! own types.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_userspace::api::proto::{Debug, StateReply, Stats, Status};
use serde::de::DeserializeOwned;

use crate::lb::workspace_bin;

/// Longest a single lbctl run may take before it is killed.
pub const RUN_TIMEOUT: Duration = Duration::from_mins(1);

/// What one lbctl run did.
#[derive(Clone, Debug)]
pub struct Run {
    /// The arguments after the binary and `--socket`.
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (`None` if killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// `lbctl <args>: exit <status>` with both streams, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "lbctl {}: {} after {} ms\nstdout: {}\nstderr: {}",
            self.args.join(" "),
            self.status,
            self.elapsed.as_millis(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// lbctl pointed at one socket.
#[derive(Clone, Debug)]
pub struct Lbctl {
    bin: PathBuf,
    socket: PathBuf,
}

impl Lbctl {
    /// The workspace's lbctl talking to `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Result<Self> {
        Ok(Self {
            bin: workspace_bin("lbctl")?,
            socket: socket.into(),
        })
    }

    /// The same, with another binary (e.g. a copy other users may run).
    #[must_use]
    pub fn with_bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = bin.into();
        self
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `lbctl --socket <socket> <args>` (a command to run however the caller likes).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.env_remove("LBCTL_SOCKET");
        cmd
    }

    /// Runs lbctl with `args` and waits (up to [`RUN_TIMEOUT`]); any exit status is returned.
    pub fn run<I, S>(&self, args: I) -> Result<Run>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let cmd = self.command(&args);
        run_bounded(cmd, args, RUN_TIMEOUT)
    }

    /// Runs lbctl and fails unless it exits 0; returns stdout.
    pub fn ok<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let run = self.run(args)?;
        if !run.success() {
            bail!("{}", run.describe());
        }
        Ok(run.stdout)
    }

    /// `lbctl --json <args>`, which must exit 0, parsed as one JSON value.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.ok(&full)?;
        serde_json::from_str(&out)
            .with_context(|| format!("lbctl {}: reply {out:?}", full.join(" ")))
    }

    /// `lbctl --json status`.
    pub fn status(&self) -> Result<Status> {
        self.json(&["status"])
    }

    /// `lbctl --json export`: the running state.
    pub fn state(&self) -> Result<StateReply> {
        self.json(&["export"])
    }

    /// `lbctl --json stats`: one reading, with rates unless lbd restarted during it.
    pub fn stats(&self) -> Result<Stats> {
        self.json(&["stats"])
    }

    /// `lbctl --json debug <switch>` (`on`, `off` or `status`): the switch afterwards.
    pub fn debug(&self, switch: &str) -> Result<Debug> {
        self.json(&["debug", switch])
    }

    /// `lbctl export`: the running state as TOML text.
    pub fn export(&self) -> Result<String> {
        self.ok(["export"])
    }

    /// Starts lbctl in the background with its stdout and stderr piped.
    pub fn spawn<I, S>(&self, args: I) -> Result<Background>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(Background(cmd.spawn().context("spawning lbctl")?))
    }
}

/// A process started in the background, killed and reaped on drop if still running.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // Already gone between the check and the kill is fine: wait reaps it either way.
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion with piped output, killing it after `timeout`.
pub fn run_bounded(mut cmd: Command, args: Vec<String>, timeout: Duration) -> Result<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", cmd.get_program().display()))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The receiver only goes away after a result or a kill; nothing to do if it has.
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(output) = rx.recv_timeout(timeout) else {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (its waiter
        // has not returned).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        let out = rx.recv().context("lbctl waiter")?;
        let out = out.context("waiting for lbctl")?;
        bail!(
            "{} {} did not finish within {timeout:?}; stderr: {}",
            cmd.get_program().display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let output: Output = output.context("waiting for lbctl")?;
    Ok(Run {
        args,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}
