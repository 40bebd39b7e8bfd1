//! lbd, the load balancer agent: argument parsing and logging setup only; the work is in
//! `lb_userspace::agent`.

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_common::maps;
use lb_userspace::{
    agent::{self, AgentOptions},
    api::proto::DEFAULT_SOCKET,
    dataplane::kernel::{self, AttachMode, LoadOptions},
    metrics::server::DEFAULT_METRICS_ADDR,
};

#[derive(Parser, Debug)]
#[command(name = "lbd", version, about = "XDP L4 load balancer agent")]
#[command(subcommand_negates_reqs = true, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Interface to attach `lb_xdp` to (repeatable).
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// native, generic or auto (the kernel picks native where the driver supports it).
    #[arg(long, default_value = "auto")]
    xdp_mode: AttachMode,
    /// TOML config of VIPs and backends.
    #[arg(long, short = 'c', default_value = "/etc/lb/lb.toml")]
    config: PathBuf,
    /// bpffs folder for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/lb")]
    bpffs: PathBuf,
    /// Flow table capacity (used when the table is first created): 1..=134217728 (2^27), and
    /// its memory (about 120 bytes an entry) must fit in the host's available memory.
    #[arg(long, default_value_t = maps::DEFAULT_FLOWS, value_parser = parse_flow_table_size)]
    flow_table_size: u32,
    /// Maglev table pool in entries (used when the pool is first created).
    #[arg(long, default_value_t = maps::DEFAULT_RING_POOL)]
    ring_pool: u32,
    /// Seconds between periodic next-hop re-resolutions.
    #[arg(long, default_value_t = 30)]
    resolve_interval: u64,
    /// Control socket (lbctl talks to it).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group allowed to use the control socket (mode 0660); without it only root can.
    #[arg(long)]
    socket_group: Option<String>,
    /// Saved VIPs and backends: written on every accepted change, read at start (it wins over
    /// the config file's [[vip]] list, which only seeds a fresh state).
    #[arg(long, default_value = "/var/lib/lb/state.toml")]
    state: PathBuf,
    /// Log format: `text` for people, `json` (one object per line) for log pipelines.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Address of `/metrics` (Prometheus) and the status page at `/`; `off` serves neither.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = parse_metrics_addr)]
    metrics_addr: MetricsAddr,
    /// On SIGTERM or SIGINT, detach the XDP and tc programs and remove every pin (the --bpffs
    /// folder) before exiting, so nothing of lbd stays in the kernel. Without it lbd leaves the
    /// data plane pinned and forwarding for the next lbd to adopt.
    #[arg(long)]
    detach_on_exit: bool,
}

/// `--flow-table-size`: a count within the kernel's bounds.
fn parse_flow_table_size(text: &str) -> Result<u32, String> {
    let entries: u32 = text
        .parse()
        .map_err(|e| format!("{e}: give a number of entries"))?;
    kernel::check_flow_table_size(entries).map_err(|e| e.to_string())?;
    Ok(entries)
}

/// `--metrics-addr`: an address, or off.
#[derive(Clone, Copy, Debug)]
struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    text.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{e}: give IP:PORT (e.g. {DEFAULT_METRICS_ADDR}) or off"))
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Replace the running XDP program, in every pinned link, with the one in this binary,
    /// keeping the pinned maps (flow table included). A running lbd can stay up.
    Upgrade {
        /// bpffs folder lbd pins under.
        #[arg(long, default_value = "/sys/fs/bpf/lb")]
        bpffs: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, leaving out a cause whose text the error before it already
/// quotes (most of lbd's errors say their cause, so the whole chain repeats itself: a TOML
/// error would show three times).
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.contains(&text) {
            if !out.is_empty() {
                out.push_str("\n  caused by: ");
            }
            out.push_str(&text);
        }
        last = text;
    }
    out
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // lb_xdp's records (DEBUG) exist only while the data-plane debug switch is on, so they are
    // shown unless RUST_LOG says something about `lb_xdp`: turning the switch on is enough.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lb_xdp")) {
        filter = filter.add_directive("lb_xdp=debug".parse().context("lb_xdp log directive")?);
    }
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }

    if let Some(Cmd::Upgrade { bpffs }) = args.command {
        let ifaces = kernel::upgrade(&bpffs)
            .with_context(|| format!("upgrading the program pinned under {}", bpffs.display()))?;
        for iface in &ifaces {
            tracing::info!(iface, "program replaced in the pinned link");
        }
        println!("upgraded {} link(s): {}", ifaces.len(), ifaces.join(" "));
        return Ok(());
    }

    // Only a table lbd creates takes memory; one already pinned is adopted as it is.
    kernel::check_flow_table_memory(args.flow_table_size, &args.bpffs)
        .with_context(|| format!("--flow-table-size {}", args.flow_table_size))?;
    let opts = AgentOptions {
        ifaces: args.ifaces,
        mode: args.xdp_mode,
        config_path: args.config,
        state_path: args.state,
        socket: args.socket,
        socket_group: args.socket_group,
        load: LoadOptions {
            pin_dir: args.bpffs,
            flow_table_size: args.flow_table_size,
            ring_pool_size: args.ring_pool,
        },
        resolve_interval: Duration::from_secs(args.resolve_interval.max(1)),
        metrics_addr: args.metrics_addr.0,
        detach_on_exit: args.detach_on_exit,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(agent::run(opts)).context("lbd")?;
    Ok(())
}
