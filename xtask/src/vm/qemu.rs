//! One guest boot under qemu TCG: the host's `/` shared read-only over 9p, a writable run folder
//! for results, the serial console in a log file echoed as it grows, a hard deadline, and the
//! emulator killed whatever happens (the guard's Drop).

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::kernel::Kernel;
use crate::util::{describe, workspace_root};

/// The 9p tags vm/init mounts.
const ROOT_TAG: &str = "hostroot";
const RUN_TAG: &str = "lbvmrun";

pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initramfs: &'a Path,
    /// target/vm/run/<package>: the job files in, the results out.
    pub run_dir: &'a Path,
    pub console: &'a Path,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    /// Prefix for the echoed console lines; `None` keeps the console in the log only.
    pub echo: Option<&'a str>,
}

/// How a boot ended.
pub enum Ending {
    /// qemu exited (the guest powered off, or the kernel panicked with `panic=-1`).
    Exited,
    /// The deadline passed and qemu was killed.
    TimedOut,
}

/// Kills and reaps qemu when dropped, so no error path or panic leaves an emulator running.
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            // Already gone is fine: reaping below is what matters.
            let _ignored = self.0.kill();
        }
        let _ignored = self.0.wait();
    }
}

impl Boot<'_> {
    pub fn run(&self) -> Result<Ending> {
        for path in [
            self.run_dir,
            self.kernel.modules.as_path(),
            workspace_root(),
        ] {
            let text = path.to_string_lossy();
            if text.contains(char::is_whitespace) {
                bail!("{text}: the guest's kernel command line cannot carry paths with spaces");
            }
        }
        let append = format!(
            "console=ttyS0 panic=-1 loglevel=4 lbvm_repo={} lbvm_run={} lbvm_modules={}",
            workspace_root().display(),
            self.run_dir.display(),
            self.kernel.modules.display(),
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-M", "pc", "-cpu", "max"])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", &format!("file:{}", self.console.display())])
            .arg("-kernel")
            .arg(&self.kernel.image)
            .arg("-initrd")
            .arg(self.initramfs)
            .args(["-append", &append])
            .args([
                "-fsdev",
                "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device",
                &format!("virtio-9p-pci,fsdev=hostroot,mount_tag={ROOT_TAG}"),
            ])
            .args([
                "-fsdev",
                &format!(
                    "local,id=lbvmrun,path={},security_model=none,multidevs=remap",
                    self.run_dir.display()
                ),
                "-device",
                &format!("virtio-9p-pci,fsdev=lbvmrun,mount_tag={RUN_TAG}"),
            ])
            .stdin(Stdio::null());
        fs::write(self.console, "").context("creating the console log")?;
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        let mut qemu = QemuGuard(child);
        let mut echo = ConsoleEcho::new(self.console.to_owned());
        loop {
            if let Some(prefix) = self.echo {
                echo.flush_new(prefix)?;
            }
            if let Some(status) = qemu.0.try_wait().context("waiting for qemu")? {
                if let Some(prefix) = self.echo {
                    echo.flush_new(prefix)?;
                    echo.finish(prefix);
                }
                if !status.success() {
                    bail!("qemu failed: {status} (see {})", self.console.display());
                }
                return Ok(Ending::Exited);
            }
            if started.elapsed() > self.timeout {
                drop(qemu);
                if let Some(prefix) = self.echo {
                    echo.flush_new(prefix)?;
                    echo.finish(prefix);
                }
                return Ok(Ending::TimedOut);
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Prints the lines qemu appended to the console log since the last call.
struct ConsoleEcho {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl ConsoleEcho {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    fn flush_new(&mut self, prefix: &str) -> Result<()> {
        let mut file = match fs::File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err).context("opening the console log"),
        };
        file.seek(SeekFrom::Start(self.offset))
            .context("seeking the console log")?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .context("reading the console log")?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let mut out = std::io::stdout().lock();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            writeln!(out, "{prefix} {line}").context("writing to stdout")?;
        }
        Ok(())
    }

    fn finish(&mut self, prefix: &str) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            println!("{prefix} {}", line.trim_end_matches('\r'));
        }
    }
}
