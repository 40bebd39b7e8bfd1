//! lbctl, lbd's command line: argument parsing and output only; the requests are
//! `lb_userspace::api::client`'s and every check of a value beyond its syntax is lbd's.

// A crate root looks for modules beside itself; lbctl's live in bin/lbctl/.
#[path = "lbctl/output.rs"]
mod output;
#[path = "lbctl/stats.rs"]
mod stats;
#[path = "lbctl/watch.rs"]
mod watch;

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    api::{
        client::Client,
        proto::{
            self, ApplyRequest, ChangeRequest, DEFAULT_IDLE_TIMEOUT_SECS, DEFAULT_SOCKET,
            FlowsQuery,
        },
    },
    change::Change,
    check::{CheckKind, CheckSpec, Span, StatusRange},
    config::{self, Config},
    model::{DesiredState, Encap, HashMode, VipId},
};
use serde::Serialize;

const SOCKET_ENV: &str = "LBCTL_SOCKET";
const VIP_HELP: &str =
    "The VIP: address:port/protocol, e.g. 10.0.0.1:80/tcp or '[2001:db8::1]:443/tcp'";
const ADDR_HELP: &str = "The backend's address";
/// How long past its own `--timeout` lbd may take to end a drain wait before lbctl gives up.
const WAIT_SLACK: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "lbctl",
    version,
    about = "Control the XDP load balancer agent (lbd) over its Unix socket"
)]
struct Args {
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        display_order = 100,
        help = format!("lbd's control socket [env: {SOCKET_ENV}] [default: {DEFAULT_SOCKET}]")
    )]
    socket: Option<PathBuf>,
    /// Print lbd's reply as JSON (drain --wait: one JSON object per line as it comes).
    #[arg(long, global = true, display_order = 101)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Add, remove or list VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, remove, reweight or drain a VIP's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Every VIP and backend: weight, state and live flows.
    Status {
        /// A flow not seen for this long is not counted [default: lbd's, 60]
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
    },
    /// Make lbd's VIPs those of a config file's [[vip]] list (its [settings] are ignored).
    Apply {
        /// The config file (lb.toml format).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Show the changes without applying them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the running settings and VIPs as a config file.
    Export,
    /// Traffic per VIP and per backend: packet, byte and new-flow rates, totals, live flows.
    Stats {
        /// A flow not seen for this long is not counted [default: lbd's, 60]
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Redraw every --interval until Ctrl-C (with --json: one JSON object per line).
        #[arg(long)]
        watch: bool,
        /// Seconds between --watch readings, e.g. 2 or 0.5 (lbd averages rates over at least 1 s)
        #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
        interval: Duration,
        /// With --watch: stop after N readings.
        #[arg(
            long,
            value_name = "N",
            requires = "watch",
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        count: Option<u64>,
    },
    /// Switch the data plane's per-packet debug logging on or off, or show whether it is on.
    Debug {
        #[arg(value_enum)]
        switch: DebugSwitch,
    },
}

/// `lbctl debug`'s argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DebugSwitch {
    /// Log each packet's decision (costs CPU on every packet).
    On,
    /// Stop logging (the default).
    Off,
    /// Show whether it is on.
    Status,
}

/// Shortest `stats --interval`: a shorter one would only load lbd.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// `stats --interval`: seconds, decimals allowed.
fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let interval = Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if interval < MIN_INTERVAL {
        return Err(format!(
            "{s:?} is too short: at least {} s",
            MIN_INTERVAL.as_secs_f64()
        ));
    }
    Ok(interval)
}

/// Health-check flags of `vip add`, `backend add`, `vip check` and `backend check`.
#[derive(clap::Args, Debug, Default, PartialEq)]
struct CheckArgs {
    #[arg(
        long,
        value_name = "KIND",
        help = "Health check: none, tcp or http:/PATH (the other check flags need it)"
    )]
    check: Option<CheckKind>,
    /// Time between checks, e.g. 2s or 500ms [default: 2s]
    #[arg(long, value_name = "DURATION", requires = "check")]
    interval: Option<Span>,
    /// How long one check may take [default: 1s]
    #[arg(long, value_name = "DURATION", requires = "check")]
    check_timeout: Option<Span>,
    /// Consecutive successes to come back up [default: 2]
    #[arg(long, value_name = "N", requires = "check")]
    rise: Option<u32>,
    /// Consecutive failures to go down [default: 3]
    #[arg(long, value_name = "N", requires = "check")]
    fall: Option<u32>,
    /// Port to check [default: the VIP's]
    #[arg(long, value_name = "PORT", requires = "check")]
    check_port: Option<u16>,
    /// HTTP statuses that pass [default: 200-399]
    #[arg(long, value_name = "LOW-HIGH", requires = "check")]
    check_status: Option<StatusRange>,
    /// HTTP Host header
    #[arg(long, value_name = "HOST", requires = "check")]
    check_host: Option<String>,
    /// Check through the encapsulated path (to the VIP via the backend's tunnel)
    #[arg(long, requires = "check")]
    via_tunnel: bool,
}

impl CheckArgs {
    fn spec(self) -> Option<CheckSpec> {
        let d = CheckSpec::of(self.check?);
        Some(CheckSpec {
            interval: self.interval.unwrap_or(d.interval),
            timeout: self.check_timeout.unwrap_or(d.timeout),
            rise: self.rise.unwrap_or(d.rise),
            fall: self.fall.unwrap_or(d.fall),
            port: self.check_port,
            status: self.check_status.unwrap_or(d.status),
            host: self.check_host,
            via_tunnel: self.via_tunnel,
            ..d
        })
    }
}

#[derive(Subcommand, Debug)]
enum VipCommand {
    /// Add a VIP without backends.
    Add {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        /// Maglev table size, a prime [default: 65537]
        #[arg(long, value_name = "N")]
        ring_size: Option<u32>,
        /// 5tuple or src-ip [default: 5tuple]
        #[arg(long, value_name = "MODE")]
        hash: Option<HashMode>,
        /// Tunnel to the backends: ipip, or gue (UDP to the GUE port of lbd's settings) [default: ipip]
        #[arg(long, value_name = "KIND")]
        encap: Option<Encap>,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Change a VIP's encapsulation, table size or hash mode (unset options keep their value).
    /// A new encapsulation rewrites the VIP's backend slots in place: flows keep their backends.
    Set {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        /// Maglev table size, a prime
        #[arg(long, value_name = "N")]
        ring_size: Option<u32>,
        /// 5tuple or src-ip
        #[arg(long, value_name = "MODE")]
        hash: Option<HashMode>,
        /// ipip or gue
        #[arg(long, value_name = "KIND")]
        encap: Option<Encap>,
    },
    /// Set the default health check of the VIP's backends (or clear it).
    Check {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[command(flatten)]
        check: CheckArgs,
        /// Remove the check
        #[arg(long, conflicts_with = "check")]
        clear: bool,
    },
    /// Remove a VIP and its backends.
    Del {
        #[arg(help = VIP_HELP)]
        vip: VipId,
    },
    /// One line per VIP: table size, hash mode, backend count.
    List,
}

#[derive(Subcommand, Debug)]
enum BackendCommand {
    /// Add a backend to a VIP.
    Add {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[arg(help = ADDR_HELP)]
        addr: IpAddr,
        /// Relative weight, 0..=65535 (0 takes no new flows) [default: 100]
        #[arg(long, value_name = "W")]
        weight: Option<u32>,
        #[command(flatten)]
        check: CheckArgs,
    },
    /// Set the backend's own health check, or clear it so the VIP's applies.
    Check {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[arg(help = ADDR_HELP)]
        addr: IpAddr,
        #[command(flatten)]
        check: CheckArgs,
        /// Remove the backend's own check
        #[arg(long, conflicts_with = "check")]
        clear: bool,
    },
    /// Remove a backend: its flows move to other backends.
    Del {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[arg(help = ADDR_HELP)]
        addr: IpAddr,
    },
    /// Set a backend's weight.
    Weight {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[arg(help = ADDR_HELP)]
        addr: IpAddr,
        /// Relative weight, 0..=65535 (0 takes no new flows)
        #[arg(value_name = "W")]
        weight: u32,
    },
    /// Stop new flows to a backend; its flows stay.
    Drain {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[arg(help = ADDR_HELP)]
        addr: IpAddr,
        /// Wait until the backend has no live flows left.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long.
        #[arg(long, value_name = "SECS", default_value_t = 300, requires = "wait")]
        timeout: u64,
        /// With --wait: a flow not seen for this long is not counted.
        #[arg(long, value_name = "SECS", default_value_t = DEFAULT_IDLE_TIMEOUT_SECS, requires = "wait")]
        idle_timeout: u64,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        #[arg(help = VIP_HELP)]
        vip: VipId,
        #[arg(help = ADDR_HELP)]
        addr: IpAddr,
    },
}

/// A `check` command's new check: the flags', or none with `--clear`.
fn checked(check: CheckArgs, clear: bool) -> anyhow::Result<Option<CheckSpec>> {
    match (check.spec(), clear) {
        (None, false) => bail!("give --check KIND, or --clear to remove the check"),
        (spec, _) => Ok(spec),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`lbctl status | head -1`) is not lbctl's failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

/// `--socket`, else `$LBCTL_SOCKET`, else lbd's default.
fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os(SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| DEFAULT_SOCKET.into())
}

fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::new(socket_path(args.socket));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("starting the tokio runtime: {e}"))?;
    runtime.block_on(execute(&client, args.command, args.json))
}

/// `lbctl vip set`: a `vip_set` change naming the table size and hash mode, the running ones
/// where not given.
async fn vip_set(
    client: &Client,
    vip: VipId,
    options: (Option<u32>, Option<HashMode>, Option<Encap>),
    json: bool,
) -> anyhow::Result<()> {
    let (ring_size, hash, encap) = options;
    if options == (None, None, None) {
        bail!("nothing to set: give --encap, --ring-size or --hash");
    }
    let state = client.state().await?;
    let current = state
        .vip
        .iter()
        .find(|v| v.id == vip)
        .ok_or_else(|| anyhow!("vip[\"{vip}\"]: no such VIP"))?;
    let set = Change::VipSet {
        vip,
        ring_size: ring_size.unwrap_or(current.ring_size),
        hash: hash.unwrap_or(current.hash),
        encap,
    };
    change(client, set, json).await
}

async fn execute(client: &Client, command: Command, json: bool) -> anyhow::Result<()> {
    match command {
        Command::Vip(VipCommand::Add {
            vip,
            ring_size,
            hash,
            encap,
            check,
        }) => {
            change(
                client,
                Change::VipAdd {
                    vip,
                    ring_size,
                    hash,
                    encap,
                    check: check.spec(),
                },
                json,
            )
            .await
        }
        Command::Vip(VipCommand::Set {
            vip,
            ring_size,
            hash,
            encap,
        }) => vip_set(client, vip, (ring_size, hash, encap), json).await,
        Command::Vip(VipCommand::Check { vip, check, clear }) => {
            let check = checked(check, clear)?;
            change(client, Change::VipCheck { vip, check }, json).await
        }
        Command::Vip(VipCommand::Del { vip }) => change(client, Change::VipDel { vip }, json).await,
        Command::Vip(VipCommand::List) => {
            let state = client.state().await?;
            if json {
                print_json(&state)
            } else {
                print(&output::vip_list(&state.vip))
            }
        }
        Command::Backend(command) => backend(client, command, json).await,
        Command::Status { idle_timeout } => {
            let status = client.status(idle_timeout).await?;
            if json {
                print_json(&status)
            } else {
                print(&output::status_table(&status))
            }
        }
        Command::Apply { file, dry_run } => {
            // Read and checked here first: a broken file is named before lbd is asked anything.
            let config = config::load_config(&file)?;
            let request = ApplyRequest {
                vip: config.state.into_vips(),
                dry_run,
            };
            let reply = client.apply(&request).await?;
            if json {
                print_json(&reply)
            } else {
                print(&output::apply_report(&reply, dry_run))
            }
        }
        Command::Export => {
            let state = client.state().await?;
            if json {
                return print_json(&state);
            }
            let vips = DesiredState::from_vips(state.vip)
                .map_err(|e| anyhow!("lbd's state does not validate: {e}"))?;
            let config = Config {
                settings: state.settings,
                state: vips,
            };
            print(&config.to_toml())
        }
        Command::Stats {
            idle_timeout,
            watch,
            interval,
            count,
        } => {
            let request = watch::StatsRequest {
                idle_timeout,
                json,
                watch: watch.then_some(watch::Watch { count }),
                interval,
            };
            watch::run(client, request).await
        }
        Command::Debug { switch } => debug(client, switch, json).await,
    }
}

/// `lbctl debug on|off|status`: sets or reads the switch, prints where it is.
async fn debug(client: &Client, switch: DebugSwitch, json: bool) -> anyhow::Result<()> {
    let debug = match switch {
        DebugSwitch::Status => client.debug().await?,
        DebugSwitch::On | DebugSwitch::Off => {
            client
                .set_debug(proto::Debug {
                    data_plane: switch == DebugSwitch::On,
                })
                .await?
        }
    };
    if json {
        print_json(&debug)
    } else {
        print(&stats::debug_line(debug))
    }
}

async fn backend(client: &Client, command: BackendCommand, json: bool) -> anyhow::Result<()> {
    let one = match command {
        BackendCommand::Check {
            vip,
            addr,
            check,
            clear,
        } => Change::BackendCheck {
            vip,
            address: addr,
            check: checked(check, clear)?,
        },
        BackendCommand::Add {
            vip,
            addr,
            weight,
            check,
        } => Change::BackendAdd {
            check: check.spec(),
            vip,
            address: addr,
            weight,
        },
        BackendCommand::Del { vip, addr } => Change::BackendDel { vip, address: addr },
        BackendCommand::Weight { vip, addr, weight } => Change::BackendWeight {
            vip,
            address: addr,
            weight,
        },
        BackendCommand::Drain {
            vip,
            addr,
            wait: true,
            timeout,
            idle_timeout,
        } => {
            let query = FlowsQuery {
                vip,
                backend: addr,
                idle_timeout: Some(idle_timeout),
                wait: true,
                timeout: Some(timeout),
            };
            return drain_and_wait(client, &query, json).await;
        }
        BackendCommand::Drain { vip, addr, .. } => Change::BackendDrain { vip, address: addr },
        BackendCommand::Undrain { vip, addr } => Change::BackendUndrain { vip, address: addr },
    };
    change(client, one, json).await
}

/// Sends one change; prints `ok: <change>` or the reply.
async fn change(client: &Client, change: Change, json: bool) -> anyhow::Result<()> {
    let reply = client
        .changes(&ChangeRequest {
            changes: vec![change],
            dry_run: false,
        })
        .await?;
    if json {
        return print_json(&reply);
    }
    let mut text = String::new();
    for c in &reply.changes {
        writeln!(text, "ok: {c}").expect("writing to a String");
    }
    print(&text)
}

/// Drains, then follows the backend's flow count until lbd says it is zero or gives up.
async fn drain_and_wait(client: &Client, query: &FlowsQuery, json: bool) -> anyhow::Result<()> {
    let addr = query.backend;
    client
        .changes(&ChangeRequest {
            changes: vec![Change::BackendDrain {
                vip: query.vip,
                address: addr,
            }],
            dry_run: false,
        })
        .await?;

    let mut progress = output::DrainProgress::new(addr);
    // The callback cannot return an error: keep the first failed write for after the wait.
    let mut write_error: Option<io::Error> = None;
    let on_line = |p: &lb_userspace::api::proto::FlowProgress| {
        if write_error.is_some() {
            return;
        }
        let line = if json {
            Some(serde_json::to_string(p).expect("API messages always serialize"))
        } else {
            progress.line(p)
        };
        if let Some(line) = line {
            write_error = writeln!(io::stdout(), "{line}").err();
        }
    };
    // lbd ends the stream at the timeout; this only guards against an lbd that hangs.
    let limit = Duration::from_secs(query.timeout.unwrap_or(0)) + WAIT_SLACK;
    let last = tokio::time::timeout(limit, client.wait_flows(query, on_line))
        .await
        .map_err(|_| {
            anyhow!(
                "{addr}: lbd did not end the wait within {} s",
                limit.as_secs()
            )
        })??;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if let Some(e) = last.error {
        bail!("{addr}: {e}");
    }
    Ok(())
}

fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("API messages always serialize");
    text.push('\n');
    print(&text)
}

#[cfg(test)]
#[path = "lbctl/tests.rs"]
mod tests;
