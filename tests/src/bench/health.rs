//! Health-check capacity: how many backends one checker probes every second, and what that costs
//! the thread it runs on; beside the bare kernel cost of a connect to the same listeners.
//!
//! The checker runs as in lbd: a current-thread Tokio runtime on its own thread. Its CPU time is
//! that thread's `getrusage(RUSAGE_THREAD)`, user plus system. The listeners (on 127.0.0.1 to
//! 127.0.0.50, kernel-chosen ports) are served by two other threads whose time is not counted.
//! On loopback the kernel handles the server's half of each handshake in the sender's context,
//! so the checker's figure includes some of the server side: it errs high (and so does the
//! baseline, measured the same way).
//!
//! The figure is the probes one checker thread does per second per 10% of a core, at a 1 s
//! interval: the number of backends that budget covers. It is measured at a size near that
//! budget (the per-probe cost barely changes with N there), not extrapolated from a small run.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_userspace::{
    health::{Checker, DEFAULT_STATUS, Probe, ProbeKind, Target, TargetId},
    model::{Protocol, VipId},
};
use tokio::net::{TcpListener, TcpStream};

use super::Figure;

const SECTION: &str = "health";
/// The interval the issue asks about.
pub const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(1);
const MAX_IN_FLIGHT: usize = 64;
/// Listeners spread over this many loopback addresses.
const ADDRESSES: usize = 50;
const FARM_THREADS: usize = 2;
const HTTP_OK: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
/// The CPU budget the figure is expressed in: 10% of one core.
const BUDGET: f64 = 0.1;

/// What each listener expects: a bare connect, or an HTTP GET answered 200.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Http,
}

/// Many listeners served on their own threads until dropped.
pub struct Farm {
    pub addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Result<()>>>,
}

impl Farm {
    /// `n` listeners answering `kind` probes.
    pub fn start(n: usize, kind: Kind) -> Result<Self> {
        let listeners: Vec<std::net::TcpListener> = (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(127, 0, 0, 1 + u8::try_from(i % ADDRESSES)?);
                let listener = std::net::TcpListener::bind((ip, 0))
                    .with_context(|| format!("binding listener {i} on {ip}"))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })
            .collect::<Result<_>>()?;
        let addrs = listeners
            .iter()
            .map(std::net::TcpListener::local_addr)
            .collect::<Result<_, _>>()?;
        let mut farm = Self {
            addrs,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        let mut shares: Vec<Vec<std::net::TcpListener>> =
            (0..FARM_THREADS).map(|_| Vec::new()).collect();
        for (i, listener) in listeners.into_iter().enumerate() {
            shares[i % FARM_THREADS].push(listener);
        }
        for share in shares {
            let stop = farm.stop.clone();
            // On failure `farm`'s drop stops the threads already started.
            let thread = thread::Builder::new()
                .name("listeners".into())
                .spawn(move || serve(share, kind, &stop))
                .context("spawning a listener thread")?;
            farm.threads.push(thread);
        }
        Ok(farm)
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("a listener thread failed: {e:#}"),
                Err(_) => eprintln!("a listener thread panicked"),
            }
        }
    }
}

fn serve(listeners: Vec<std::net::TcpListener>, kind: Kind, stop: &AtomicBool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for listener in listeners {
            let listener = TcpListener::from_std(listener)?;
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        // Out of descriptors, most likely: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    if kind == Kind::Http {
                        tokio::spawn(answer(stream));
                    }
                }
            });
        }
        while !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    })
}

/// Reads the request head and answers 200.
async fn answer(stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    loop {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.try_write(HTTP_OK) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // Sent (the reply fits one write) or the checker is gone.
            _ => return,
        }
    }
}

fn targets(addrs: &[SocketAddr], kind: Kind) -> Result<Vec<Target>> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let kind = match kind {
                Kind::Tcp => ProbeKind::Tcp,
                Kind::Http => ProbeKind::Http {
                    path: "/healthz".into(),
                    host: None,
                    status: DEFAULT_STATUS,
                },
            };
            Ok(Target {
                // One VIP per listener keeps the ids apart.
                id: TargetId {
                    vip: VipId {
                        addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                        port: u16::try_from(i).context("at most 65536 targets")?,
                        proto: Protocol::Tcp,
                    },
                    backend: addr.ip(),
                },
                probe: Probe {
                    addr,
                    kind,
                    timeout: TIMEOUT,
                    mark: None,
                },
                interval: INTERVAL,
                rise: 2,
                fall: 3,
            })
        })
        .collect()
}

/// CPU time of the calling thread, user plus system: (user, system).
pub fn thread_cpu() -> Result<(Duration, Duration)> {
    // SAFETY: getrusage writes only into the struct it is given.
    let (rc, usage) = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        let rc = libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage);
        (rc, usage)
    };
    ensure!(
        rc == 0,
        "getrusage(RUSAGE_THREAD): {}",
        std::io::Error::last_os_error()
    );
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    Ok((tv(usage.ru_utime), tv(usage.ru_stime)))
}

/// One checker run over a farm.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub n: usize,
    pub kind: Kind,
    pub wall: Duration,
    /// User plus system time of the checker's thread.
    pub cpu: Duration,
    pub system: Duration,
    /// Probes per target within the measured window.
    pub per_target: Vec<u64>,
    pub down: usize,
    pub transitions: usize,
    /// CPU time of one blocking connect and reset on the same thread: the kernel's share of a
    /// TCP probe, which no scheduler can avoid.
    pub floor: Duration,
}

#[allow(clippy::cast_precision_loss)] // counts and sizes far below 2^52
impl Measurement {
    /// The checker thread's CPU time over the window, in percent of one core.
    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    pub fn probes(&self) -> u64 {
        self.per_target.iter().sum()
    }

    pub fn probes_per_second(&self) -> f64 {
        self.probes() as f64 / self.wall.as_secs_f64()
    }

    /// CPU time per probe.
    pub fn per_probe(&self) -> Duration {
        self.cpu.div_f64(f64::max(self.probes() as f64, 1.0))
    }

    /// Backends checked every [`INTERVAL`] within 10% of one core, at this run's cost per probe.
    pub fn capacity(&self) -> f64 {
        BUDGET * INTERVAL.as_secs_f64() / self.per_probe().as_secs_f64().max(1e-12)
    }

    /// The same for a bare connect and reset per backend.
    pub fn floor_capacity(&self) -> f64 {
        BUDGET * INTERVAL.as_secs_f64() / self.floor.as_secs_f64().max(1e-12)
    }

    /// Whether every target stayed up and was probed about once per interval (5% slack).
    pub fn kept_up(&self) -> bool {
        let expected = self.n as f64 * self.wall.as_secs_f64() / INTERVAL.as_secs_f64();
        self.down == 0 && self.probes() as f64 > 0.95 * expected
    }

    pub fn report(&self) -> String {
        format!(
            "{:>4} N={:>6}: CPU {:>5.2}% of a core ({:.0} ms, {:.0}% system, over {:.1} s), \
             {:.0} probes/s, {:.1} µs per probe (bare connect {:.1} µs), per target {}..{}, \
             down {}, transitions {}",
            format!("{:?}", self.kind),
            self.n,
            self.cpu_percent(),
            self.cpu.as_secs_f64() * 1e3,
            100.0 * self.system.as_secs_f64() / self.cpu.as_secs_f64().max(1e-9),
            self.wall.as_secs_f64(),
            self.probes_per_second(),
            self.per_probe().as_secs_f64() * 1e6,
            self.floor.as_secs_f64() * 1e6,
            self.per_target.iter().min().unwrap_or(&0),
            self.per_target.iter().max().unwrap_or(&0),
            self.down,
            self.transitions,
        )
    }
}

/// Checks `n` listeners of `kind` every second on a thread of its own; counts that thread's CPU
/// over `window`, after `warmup`; then times bare connects to the same listeners on that thread.
pub fn measure(n: usize, kind: Kind, warmup: Duration, window: Duration) -> Result<Measurement> {
    let farm = Farm::start(n, kind)?;
    let targets = targets(&farm.addrs, kind)?;
    let ids: Vec<TargetId> = targets.iter().map(|t| t.id).collect();
    let addrs = farm.addrs.clone();
    let checker = thread::Builder::new()
        .name("checker".into())
        .spawn(move || -> Result<Measurement> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut measurement = runtime.block_on(async move {
                let (checker, mut transitions) = Checker::spawn(MAX_IN_FLIGHT)?;
                checker.set_targets(targets);
                tokio::time::sleep(warmup).await;
                let before = checker.snapshot();
                let (cpu0, wall0) = (thread_cpu()?, Instant::now());
                tokio::time::sleep(window).await;
                let cpu1 = thread_cpu()?;
                let wall = wall0.elapsed();
                let (user, system) = (cpu1.0.saturating_sub(cpu0.0), cpu1.1.saturating_sub(cpu0.1));
                let after = checker.snapshot();
                let per_target = ids
                    .iter()
                    .map(|id| {
                        let checks = |s: &std::collections::BTreeMap<_, _>| {
                            s.get(id)
                                .map(|s: &lb_userspace::health::CheckStatus| s.checks)
                                .with_context(|| format!("no status for {id}"))
                        };
                        Ok(checks(&after)? - checks(&before)?)
                    })
                    .collect::<Result<_>>()?;
                let down = after.values().filter(|s| !s.up).count();
                let mut count = 0;
                while transitions.try_recv().is_ok() {
                    count += 1;
                }
                if let Some((id, status)) = after.iter().find(|(_, s)| s.last_ok != Some(true)) {
                    eprintln!("e.g. {id}: {status:?}");
                }
                anyhow::Ok(Measurement {
                    n,
                    kind,
                    wall,
                    cpu: user + system,
                    system,
                    per_target,
                    down,
                    transitions: count,
                    floor: Duration::ZERO,
                })
            })?;
            // The checker is gone; the same thread now measures the bare kernel cost.
            measurement.floor = connect_floor(&addrs)?;
            Ok(measurement)
        })
        .context("spawning the checker thread")?;
    let measurement = checker
        .join()
        .map_err(|_| anyhow::anyhow!("the checker thread panicked"))?;
    drop(farm);
    measurement
}

/// CPU time per blocking connect (and close with a reset, as probes do) to each of `addrs`, on
/// the calling thread.
pub fn connect_floor(addrs: &[SocketAddr]) -> Result<Duration> {
    let start = thread_cpu()?;
    for addr in addrs {
        let stream =
            std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads `linger`, whose size it is given, on a socket we own.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        ensure!(rc == 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    let end = thread_cpu()?;
    let count = u32::try_from(addrs.len().max(1))?;
    Ok((end.0 + end.1).saturating_sub(start.0 + start.1) / count)
}

/// Lets this process hold `n` listeners plus their connections; whether the limit allows it.
pub fn raise_nofile(n: usize) -> Result<bool> {
    // SAFETY: getrlimit/setrlimit read and write only the struct they are given.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0,
            "getrlimit: {}",
            std::io::Error::last_os_error()
        );
        limit.rlim_cur = limit.rlim_max;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
        Ok(
            usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
                >= n + n / 4 + MAX_IN_FLIGHT + 256,
        )
    }
}

/// `/proc/loadavg`, for reports.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|e| format!("unreadable: {e}"), |s| s.trim().to_owned())
}

/// Runs the section: for TCP and HTTP checks, `runs` checker runs over `n` listeners (near the
/// 10% budget, so the per-probe cost is that of a loaded checker), interleaved by kind.
pub fn run(quick: bool) -> Result<Vec<Figure>> {
    // ~2,000 TCP / ~1,500 HTTP backends fit 10% of a core here: measure at about that size.
    let (n, runs, warmup, window) = if quick {
        (1000, 1, Duration::from_secs(1), Duration::from_secs(4))
    } else {
        (2000, 3, Duration::from_secs(2), Duration::from_secs(10))
    };
    if !raise_nofile(n)? {
        bail!("RLIMIT_NOFILE too low for {n} listeners");
    }
    let kinds = [Kind::Tcp, Kind::Http];
    let mut results: Vec<Vec<Measurement>> = kinds.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (kind, found) in kinds.iter().zip(&mut results) {
            let load = loadavg();
            let m = measure(n, *kind, warmup, window)?;
            eprintln!("health: {}  [load {load}]", m.report());
            ensure!(m.kept_up(), "the checker fell behind: {}", m.report());
            found.push(m);
        }
    }
    Ok(kinds
        .iter()
        .zip(&results)
        .flat_map(|(kind, runs)| figures(*kind, runs, window))
        .collect())
}

/// The capacity figure of one kind (median run), and its bare-connect baseline.
fn figures(kind: Kind, runs: &[Measurement], window: Duration) -> Vec<Figure> {
    let median = |f: &dyn Fn(&Measurement) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    let (cap_min, capacity) = median(&Measurement::capacity);
    let (_, floor_capacity) = median(&Measurement::floor_capacity);
    let (_, cpu) = median(&Measurement::cpu_percent);
    let (_, per_probe) = median(&|m| m.per_probe().as_secs_f64() * 1e6);
    let (_, floor_us) = median(&|m| m.floor.as_secs_f64() * 1e6);
    let n = runs[0].n;
    let (what, probe) = match kind {
        Kind::Tcp => ("TCP", "connect"),
        Kind::Http => ("HTTP", "GET /healthz, 200"),
    };
    let baseline_name = "bare blocking connect+reset loop, same listeners (median)";
    vec![
        Figure {
            section: SECTION,
            name: format!("{what} health checks: backends at a 1 s interval per 10% of one core"),
            value: capacity,
            unit: "backends",
            stats: vec![
                ("min".into(), cap_min),
                ("median".into(), capacity),
                (format!("CPU % at N={n}"), cpu),
                ("µs/probe".into(), per_probe),
            ],
            baseline: Some((baseline_name.into(), floor_capacity)),
            target: None,
            note: format!(
                "lb_userspace Checker ({probe}) on its own current-thread runtime, {} x {}s \
                 over {n} loopback listeners; 0.1 s / CPU per probe (getrusage of its thread)",
                runs.len(),
                window.as_secs()
            ),
        },
        Figure {
            section: SECTION,
            name: format!("{what} health checks: CPU per probe"),
            value: per_probe,
            unit: "µs",
            stats: Vec::new(),
            baseline: Some((baseline_name.into(), floor_us)),
            target: None,
            note: "checker thread user+system time / probes done in the window".into(),
        },
    ]
}
