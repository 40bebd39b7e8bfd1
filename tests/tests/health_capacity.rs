//! Health-check capacity: how many backends one checker probes every second, and what that costs
//! the thread it runs on.
//!
//! The checker runs as in lbd: a current-thread Tokio runtime on its own thread. Its CPU time is
//! that thread's `getrusage(RUSAGE_THREAD)`, user plus system. The listeners (on 127.0.0.1 to
//! 127.0.0.50, kernel-chosen ports) are served by two other threads whose time is not counted.
//! On loopback the kernel handles the server's half of each handshake in the sender's context,
//! so the checker's figure includes some of the server side: it errs high.
//!
//! `cargo test --release -p lb-tests --test health_capacity -- --ignored --nocapture` runs the
//! full measurement; the quick test runs a small one on every `cargo test`.

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

use lb_userspace::{
    health::{Checker, DEFAULT_STATUS, Probe, ProbeKind, Target, TargetId},
    model::{Protocol, VipId},
};
use tokio::net::{TcpListener, TcpStream};

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(1);
const MAX_IN_FLIGHT: usize = 64;
/// Listeners spread over this many loopback addresses.
const ADDRESSES: usize = 50;
const FARM_THREADS: usize = 2;
const HTTP_OK: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tcp,
    Http,
}

/// Many listeners served on their own threads until dropped.
struct Farm {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Farm {
    fn start(n: usize, kind: Kind) -> Self {
        let listeners: Vec<std::net::TcpListener> = (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(127, 0, 0, 1 + (i % ADDRESSES) as u8);
                let listener = std::net::TcpListener::bind((ip, 0))
                    .unwrap_or_else(|e| panic!("binding listener {i} on {ip}: {e}"));
                listener.set_nonblocking(true).unwrap();
                listener
            })
            .collect();
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut shares: Vec<Vec<std::net::TcpListener>> =
            (0..FARM_THREADS).map(|_| Vec::new()).collect();
        for (i, listener) in listeners.into_iter().enumerate() {
            shares[i % FARM_THREADS].push(listener);
        }
        let threads = shares
            .into_iter()
            .map(|share| {
                let stop = stop.clone();
                thread::Builder::new()
                    .name("listeners".into())
                    .spawn(move || serve(share, kind, &stop))
                    .expect("spawning a listener thread")
            })
            .collect();
        Self {
            addrs,
            stop,
            threads,
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("a listener thread panicked");
            }
        }
    }
}

fn serve(listeners: Vec<std::net::TcpListener>, kind: Kind, stop: &AtomicBool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for listener in listeners {
            let listener = TcpListener::from_std(listener).unwrap();
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
    });
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

fn targets(addrs: &[SocketAddr], kind: Kind) -> Vec<Target> {
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
            Target {
                // One VIP per listener keeps the ids apart.
                id: TargetId {
                    vip: VipId {
                        addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                        port: i as u16,
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
            }
        })
        .collect()
}

/// CPU time of the calling thread: (user, system).
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: getrusage writes only into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage), 0);
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    (tv(usage.ru_utime), tv(usage.ru_stime))
}

struct Measurement {
    n: usize,
    kind: Kind,
    wall: Duration,
    /// User plus system time of the checker's thread.
    cpu: Duration,
    system: Duration,
    /// Probes per target within the measured window.
    per_target: Vec<u64>,
    down: usize,
    transitions: usize,
    /// CPU time of one blocking connect and reset on the same thread: the kernel's share of a
    /// TCP probe, which no scheduler can avoid.
    floor: Duration,
}

impl Measurement {
    fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu.as_secs_f64() / self.wall.as_secs_f64()
    }

    fn probes_per_second(&self) -> f64 {
        self.per_target.iter().sum::<u64>() as f64 / self.wall.as_secs_f64()
    }

    fn report(&self) -> String {
        let probes: u64 = self.per_target.iter().sum();
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
            self.cpu.as_secs_f64() * 1e6 / probes.max(1) as f64,
            self.floor.as_secs_f64() * 1e6,
            self.per_target.iter().min().unwrap_or(&0),
            self.per_target.iter().max().unwrap_or(&0),
            self.down,
            self.transitions,
        )
    }
}

/// Checks `n` listeners of `kind` every second on a thread of its own; counts that thread's CPU
/// over `window`, after `warmup`.
fn measure(n: usize, kind: Kind, warmup: Duration, window: Duration) -> Measurement {
    let farm = Farm::start(n, kind);
    let targets = targets(&farm.addrs, kind);
    let ids: Vec<TargetId> = targets.iter().map(|t| t.id).collect();
    let addrs = farm.addrs.clone();
    let checker = thread::Builder::new()
        .name("checker".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut measurement = runtime.block_on(async move {
                let (checker, mut transitions) = Checker::spawn(MAX_IN_FLIGHT).unwrap();
                checker.set_targets(targets);
                tokio::time::sleep(warmup).await;
                let before = checker.snapshot();
                let (cpu0, wall0) = (thread_cpu(), Instant::now());
                tokio::time::sleep(window).await;
                let cpu1 = thread_cpu();
                let wall = wall0.elapsed();
                let (user, system) = (cpu1.0.saturating_sub(cpu0.0), cpu1.1.saturating_sub(cpu0.1));
                let after = checker.snapshot();
                let per_target = ids
                    .iter()
                    .map(|id| after[id].checks - before[id].checks)
                    .collect();
                let down = after.values().filter(|s| !s.up).count();
                let mut count = 0;
                while transitions.try_recv().is_ok() {
                    count += 1;
                }
                if let Some((id, status)) = after.iter().find(|(_, s)| s.last_ok != Some(true)) {
                    eprintln!("e.g. {id}: {status:?}");
                }
                Measurement {
                    n,
                    kind,
                    wall,
                    cpu: user + system,
                    system,
                    per_target,
                    down,
                    transitions: count,
                    floor: Duration::ZERO,
                }
            });
            // The checker is gone; the same thread now measures the bare kernel cost.
            measurement.floor = connect_floor(&addrs);
            measurement
        });
    let measurement = checker
        .expect("spawning the checker thread")
        .join()
        .expect("the checker thread panicked");
    drop(farm);
    measurement
}

/// CPU time per blocking connect (and close with a reset, as probes do) to each of `addrs`, on
/// the calling thread.
fn connect_floor(addrs: &[SocketAddr]) -> Duration {
    let start = thread_cpu();
    for addr in addrs {
        let stream = std::net::TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
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
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    }
    let end = thread_cpu();
    (end.0 + end.1).saturating_sub(start.0 + start.1) / addrs.len().max(1) as u32
}

/// Lets this process hold `n` listeners plus their connections.
fn raise_nofile(n: usize) -> bool {
    // SAFETY: getrlimit/setrlimit read and write only the struct they are given.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit), 0);
        limit.rlim_cur as usize >= n + n / 4 + MAX_IN_FLIGHT + 256
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|e| format!("unreadable: {e}"), |s| s.trim().to_owned())
}

#[test]
fn quick_capacity_every_target_probed_each_second() {
    const N: usize = 500;
    assert!(raise_nofile(N), "RLIMIT_NOFILE too low for {N} listeners");
    for kind in [Kind::Tcp, Kind::Http] {
        println!("load {}", loadavg());
        let m = measure(N, kind, Duration::ZERO, Duration::from_secs(3));
        println!("{}", m.report());
        assert_eq!(m.down, 0, "{}", m.report());
        assert_eq!(m.transitions, 0, "{}", m.report());
        // First firing within the first second, then one a second (+-10%).
        let bad: Vec<u64> = m
            .per_target
            .iter()
            .copied()
            .filter(|c| !(2..=4).contains(c))
            .collect();
        assert!(
            bad.is_empty(),
            "{} targets probed other than 2-4 times in 3 s: {:?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
        let total: u64 = m.per_target.iter().sum();
        assert!(
            (N as u64 * 27 / 10..=N as u64 * 33 / 10).contains(&total),
            "{total} probes, about {} expected",
            N * 3
        );
    }
}

#[test]
#[ignore = "takes about 3 minutes; run in release with --ignored --nocapture"]
fn full_capacity_at_one_second_interval() {
    const SIZES: [usize; 7] = [500, 1000, 1500, 2000, 3000, 5000, 10_000];
    const WARMUP: Duration = Duration::from_secs(2);
    const WINDOW: Duration = Duration::from_secs(10);
    // HEALTH_CAPACITY_SIZES=1000,3000 measures other sizes.
    let sizes: Vec<usize> = std::env::var("HEALTH_CAPACITY_SIZES").map_or_else(
        |_| SIZES.to_vec(),
        |s| {
            s.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .expect("HEALTH_CAPACITY_SIZES: a list of numbers")
                })
                .collect()
        },
    );
    if cfg!(debug_assertions) {
        println!("note: a debug build; measure with --release");
    }
    for kind in [Kind::Tcp, Kind::Http] {
        let mut largest = None;
        for &n in &sizes {
            if !raise_nofile(n) {
                println!("{kind:?} N={n}: skipped, RLIMIT_NOFILE too low");
                continue;
            }
            let load = loadavg();
            let m = measure(n, kind, WARMUP, WINDOW);
            println!("{}  [load {load}]", m.report());
            let expected = n as f64 * WINDOW.as_secs_f64() / INTERVAL.as_secs_f64();
            let kept_up =
                m.down == 0 && m.probes_per_second() * WINDOW.as_secs_f64() > 0.95 * expected;
            if kept_up && m.cpu_percent() < 10.0 {
                largest = Some((n, m.cpu_percent()));
            }
        }
        match largest {
            Some((n, cpu)) => println!(
                "{kind:?}: largest N under 10% of a core at a 1 s interval: {n} ({cpu:.2}%)"
            ),
            None => println!("{kind:?}: no N under 10% of a core"),
        }
    }
}
