//! Network namespaces for tests: an RAII [`Netns`] (run closures, commands and processes inside
//! it; everything is killed and deleted on drop) and the veth/bridge/address helpers that
//! [`topology`] builds the load balancer's test networks from.
//!
//! Interface names are limited to 15 bytes, so namespaces are made unique (pid + sequence number
//! in the namespace name) and interfaces are not: veth pairs are created directly inside the
//! namespaces they live in, never in the root namespace.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub mod topology;

pub use topology::{Arms, Gateway, Host, Iface, Router, Topology, TopologyBuilder};

/// Every namespace this harness creates is called `lbt-<pid>-<seq>-<label>`.
const NAME_PREFIX: &str = "lbt-";
const NETNS_DIR: &str = "/run/netns";
/// How long a spawned process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

static SEQUENCE: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A network namespace that exists as long as this value does.
///
/// Drop stops the processes started with [`Netns::spawn`] (SIGTERM, then SIGKILL), kills any
/// other process still inside, deletes its interfaces (so sockets leaked by a panicking test
/// cannot keep veths alive) and runs `ip netns del`.
pub struct Netns {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Creates `lbt-<pid>-<seq>-<label>` with `lo` up. `label` should name the test and the
    /// role (`smoke-client`) so a leftover namespace says where it came from.
    pub fn new(label: &str) -> Result<Self> {
        STALE_CLEANUP.call_once(cleanup_stale);
        if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("namespace label {label:?}: use [a-zA-Z0-9-]");
        }
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}-{seq}-{label}", std::process::id());
        command_output(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `f` on a thread that entered this namespace first and returns its result; a panic
    /// in `f` is resumed on the caller. Sockets created in `f` stay in this namespace for their
    /// whole life, so they can be returned and used from any thread.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.path();
        thread::scope(|scope| {
            let handle = scope.spawn(move || {
                enter(&path).unwrap_or_else(|e| panic!("{e:#}"));
                f()
            });
            match handle.join() {
                Ok(value) => value,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A command that runs `program` inside this namespace via `nsenter --net=` (not
    /// `ip netns exec`, which remounts /sys and hides bpffs). Add arguments and stdio, then
    /// [`Netns::spawn`] it or run it yourself.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `argv` (program first) inside the namespace and returns its stdout; a non-zero exit
    /// is an error carrying stderr.
    pub fn exec<I, S>(&self, argv: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut argv = argv.into_iter();
        let program = argv.next().context("exec: empty argv")?;
        let mut cmd = self.command(program);
        cmd.args(argv);
        command_output(&mut cmd)
    }

    /// Starts `cmd` (made with [`Netns::command`]) and keeps it: it is stopped when the
    /// namespace is dropped. Returns its pid (nsenter execs the program, so this is the
    /// program's own pid) for [`Netns::stop`], [`Netns::kill`], [`Netns::try_wait`] and
    /// [`Netns::with_child`].
    pub fn spawn(&self, mut cmd: Command) -> Result<u32> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", describe(&cmd)))?;
        let pid = child.id();
        self.lock_children().push(child);
        Ok(pid)
    }

    /// SIGTERM, up to 3 s to exit, then SIGKILL; the process is forgotten afterwards.
    pub fn stop(&self, pid: u32) -> Result<ExitStatus> {
        let mut child = self.take_child(pid)?;
        terminate(&mut child)
    }

    /// SIGKILL (a crash, as far as the process can tell); the process is forgotten afterwards.
    pub fn kill(&self, pid: u32) -> Result<ExitStatus> {
        let mut child = self.take_child(pid)?;
        child.kill().with_context(|| format!("killing {pid}"))?;
        child.wait().with_context(|| format!("waiting for {pid}"))
    }

    /// `Some(status)` once the spawned process has exited (it stays registered).
    pub fn try_wait(&self, pid: u32) -> Result<Option<ExitStatus>> {
        self.with_child(pid, |child| {
            child
                .try_wait()
                .with_context(|| format!("waiting for {pid}"))
        })?
    }

    /// Gives `f` the spawned process, e.g. to take its piped stdout.
    pub fn with_child<R>(&self, pid: u32, f: impl FnOnce(&mut Child) -> R) -> Result<R> {
        let mut children = self.lock_children();
        let child = children
            .iter_mut()
            .find(|c| c.id() == pid)
            .with_context(|| format!("no process {pid} spawned in {}", self.name))?;
        Ok(f(child))
    }

    /// `ip -n <name> <args>`; returns stdout.
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        command_output(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs many `ip` commands (one per line, without the leading `ip`) in one process.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ip -batch")?;
        let mut script = String::new();
        for line in lines {
            writeln!(script, "{line}").expect("writing to a String");
        }
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .context("writing to ip -batch")?;
        let out = child.wait_with_output().context("waiting for ip -batch")?;
        if !out.status.success() {
            bail!(
                "ip -n {} -batch failed ({}): {}\nscript:\n{script}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(())
    }

    /// Sets `net.*` sysctls (dotted keys) inside the namespace.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> Result<()> {
        self.run(|| {
            for (key, value) in settings {
                let path = sysctl_path(key)?;
                fs::write(&path, value).with_context(|| format!("sysctl {key}={value}"))?;
            }
            Ok(())
        })
    }

    /// The `EstabResets` counter of the namespace's `/proc/net/snmp`: resets of established
    /// connections, sent or received.
    pub fn estab_resets(&self) -> Result<i64> {
        let text = self.exec(["cat", "/proc/net/snmp"])?;
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            bail!("no Tcp lines in /proc/net/snmp");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "EstabResets")
            .and_then(|(_, v)| v.parse().ok())
            .context("no EstabResets counter")
    }

    /// Reads a `net.*` sysctl inside the namespace.
    pub fn sysctl(&self, key: &str) -> Result<String> {
        self.run(|| {
            let path = sysctl_path(key)?;
            let value = fs::read_to_string(&path).with_context(|| format!("sysctl {key}"))?;
            Ok(value.trim().to_owned())
        })
    }

    /// Creates a veth pair: `dev` here and `peer_dev` in `peer_ns`, both with `mtu`, both up.
    pub fn add_veth(&self, dev: &str, peer_ns: &Netns, peer_dev: &str, mtu: u32) -> Result<()> {
        check_ifname(dev)?;
        check_ifname(peer_dev)?;
        self.ip_batch(&[
            format!(
                "link add {dev} mtu {mtu} type veth peer name {peer_dev} mtu {mtu} netns {}",
                peer_ns.name
            ),
            format!("link set {dev} up"),
        ])?;
        peer_ns.ip(["link", "set", peer_dev, "up"])?;
        Ok(())
    }

    /// Creates a bridge without STP or multicast snooping (ports forward at once, IPv6
    /// neighbour discovery is flooded) and brings it up.
    pub fn add_bridge(&self, name: &str) -> Result<()> {
        check_ifname(name)?;
        self.ip_batch(&[
            format!("link add {name} type bridge stp_state 0 mcast_snooping 0"),
            format!("link set {name} up"),
        ])
    }

    /// Makes `port` a port of `bridge` and brings it up.
    pub fn attach(&self, port: &str, bridge: &str) -> Result<()> {
        self.ip(["link", "set", port, "master", bridge, "up"])
            .map(drop)
    }

    /// Adds an address in CIDR form (`10.0.0.1/24`, `fd00::1/64`; IPv6 without DAD).
    pub fn add_addr(&self, dev: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", dev];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(args).map(drop)
    }

    /// `ip route replace <dst> via <via>`.
    pub fn add_route(&self, dst: &str, via: &str) -> Result<()> {
        self.ip(["route", "replace", dst, "via", via]).map(drop)
    }

    pub fn set_mtu(&self, dev: &str, mtu: u32) -> Result<()> {
        self.ip(["link", "set", dev, "mtu", &mtu.to_string()])
            .map(drop)
    }

    pub fn link_up(&self, dev: &str) -> Result<()> {
        self.ip(["link", "set", dev, "up"]).map(drop)
    }

    /// `ethtool -K <dev> tx off`: without it, TCP from this end carries partial checksums that
    /// an XDP program forwarding the frame never completes, and the receiver drops it.
    pub fn tx_checksum_off(&self, dev: &str) -> Result<()> {
        self.exec(["ethtool", "-K", dev, "tx", "off"]).map(drop)
    }

    /// The interface's index in this namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(["-o", "link", "show", "dev", dev])?;
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no ifindex in `{out}`"))
    }

    /// The interface's MAC address.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.ip(["-o", "link", "show", "dev", dev])?;
        let text = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .with_context(|| format!("no MAC in `{out}`"))?;
        parse_mac(text)
    }

    /// Waits until every interface in `devs` has carrier (`LOWER_UP`) and is up.
    pub fn wait_links_up(&self, devs: &[&str], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.ip(["-o", "link", "show", "up"])?;
            let down: Vec<&str> = devs
                .iter()
                .copied()
                .filter(|dev| {
                    !out.lines()
                        .any(|l| link_name(l) == Some(dev) && l.contains("LOWER_UP"))
                })
                .collect();
            if down.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{}: links not up after {timeout:?}: {down:?}", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Names of the interfaces in this namespace other than `lo`.
    pub fn links(&self) -> Result<Vec<String>> {
        let out = self.ip(["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(link_name)
            .filter(|n| *n != "lo")
            .map(str::to_owned)
            .collect())
    }

    /// Pids of every process whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<u32>> {
        ns_pids(&self.name)
    }

    fn lock_children(&self) -> std::sync::MutexGuard<'_, Vec<Child>> {
        // A panic while holding the lock leaves a usable list; teardown must still run.
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take_child(&self, pid: u32) -> Result<Child> {
        let mut children = self.lock_children();
        let at = children
            .iter()
            .position(|c| c.id() == pid)
            .with_context(|| format!("no process {pid} spawned in {}", self.name))?;
        Ok(children.swap_remove(at))
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let children = std::mem::take(&mut *self.lock_children());
        for mut child in children {
            if let Err(e) = terminate(&mut child) {
                problems.push(format!("{e:#}"));
            }
        }
        if let Err(e) = kill_all_in(&self.name) {
            problems.push(format!("{e:#}"));
        }
        match self.links() {
            Ok(links) if !links.is_empty() => {
                // Deleting one end of a veth removes the other, possibly listed later: -force
                // keeps going past those.
                let mut cmd = Command::new("ip");
                cmd.args(["-force", "-n", &self.name, "-batch", "-"]);
                let mut script = String::new();
                for link in &links {
                    writeln!(script, "link del dev {link}").expect("writing to a String");
                }
                if let Err(e) = run_with_stdin(&mut cmd, &script) {
                    // Only worth reporting if something is still there.
                    if self.links().is_ok_and(|left| !left.is_empty()) {
                        problems.push(format!("{e:#}"));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("{e:#}")),
        }
        if let Err(e) = command_output(Command::new("ip").args(["netns", "del", &self.name])) {
            problems.push(format!("{e:#}"));
        }
        problems
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for problem in self.teardown() {
            eprintln!("netns {}: teardown: {problem}", self.name);
        }
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &std::path::Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a valid open namespace fd; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns {}", path.display()));
    }
    Ok(())
}

fn sysctl_path(key: &str) -> Result<PathBuf> {
    if !key.starts_with("net.") || key.contains("..") || key.contains('/') {
        bail!("sysctl {key}: only net.* keys are per namespace");
    }
    Ok(PathBuf::from("/proc/sys").join(key.replace('.', "/")))
}

fn check_ifname(name: &str) -> Result<()> {
    // IFNAMSIZ is 16 including the terminating NUL.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) {
        bail!("interface name {name:?}: 1 to 15 bytes, no '/', ' ' or ':'");
    }
    Ok(())
}

/// The interface name of one `ip -o link` line (`3: eth0@if2: <...>`).
fn link_name(line: &str) -> Option<&str> {
    let name = line.split(": ").nth(1)?;
    Some(name.split('@').next().unwrap_or(name))
}

pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("MAC {text}: too short"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text}"))?;
    }
    if parts.next().is_some() {
        bail!("MAC {text}: too long");
    }
    Ok(mac)
}

fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{}: stdout not UTF-8", describe(cmd)))
}

fn run_with_stdin(cmd: &mut Command, input: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", describe(cmd)))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory preconditions; a vanished pid just yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGTERM, a grace period, then SIGKILL.
fn terminate(child: &mut Child) -> Result<ExitStatus> {
    let pid = child.id();
    if let Some(status) = child
        .try_wait()
        .with_context(|| format!("waiting for {pid}"))?
    {
        return Ok(status);
    }
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {pid}"))?
        {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.kill().with_context(|| format!("killing {pid}"))?;
    child.wait().with_context(|| format!("waiting for {pid}"))
}

fn ns_pids(name: &str) -> Result<Vec<u32>> {
    let out = command_output(Command::new("ip").args(["netns", "pids", name]))?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// SIGKILLs every process left in the namespace (ones not started through [`Netns::spawn`]).
fn kill_all_in(name: &str) -> Result<()> {
    let me = std::process::id();
    let pids: Vec<u32> = ns_pids(name)?.into_iter().filter(|&p| p != me).collect();
    for &pid in &pids {
        signal(pid, libc::SIGKILL);
    }
    // Dying processes hold the namespace until they are gone; they are not our children, so
    // poll /proc.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids
        .iter()
        .any(|p| PathBuf::from(format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Deletes namespaces left by earlier test processes that died without unwinding (SIGKILL,
/// abort): any `lbt-<pid>-...` whose pid no longer exists. Runs once per process, from the
/// first [`Netns::new`].
pub fn cleanup_stale() {
    let Ok(list) = command_output(Command::new("ip").args(["netns", "list"])) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(NAME_PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if PathBuf::from(format!("/proc/{pid}")).exists() {
            continue;
        }
        let stale = Netns {
            name: name.to_owned(),
            children: Mutex::new(Vec::new()),
        };
        drop(stale);
    }
}
