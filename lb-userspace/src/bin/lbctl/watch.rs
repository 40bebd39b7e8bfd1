//! `lbctl stats [--watch]`: reading lbd's stats until they carry rates, and redrawing them
//! every interval until Ctrl-C or `--count` frames.

use std::{
    io::{self, IsTerminal as _},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use lb_userspace::api::{client::Client, proto::Stats};
use tokio::{
    signal::unix::{SignalKind, signal},
    time::MissedTickBehavior,
};

use crate::stats::stats_table;

/// lbd computes rates between two reads at least this far apart (its `RateTracker::MIN_SPAN`).
const RATE_SPAN: Duration = Duration::from_secs(1);
/// Home the cursor and clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// What `lbctl stats` was asked for.
#[derive(Clone, Copy, Debug)]
pub struct StatsRequest {
    pub idle_timeout: Option<u64>,
    pub json: bool,
    /// `None`: one reading.
    pub watch: Option<Watch>,
    pub interval: Duration,
}

#[derive(Clone, Copy, Debug)]
pub struct Watch {
    /// Frames to print before stopping; `None`: until Ctrl-C.
    pub count: Option<u64>,
}

/// Prints one reading, or with `watch` a frame per interval; Ctrl-C during a watch ends it
/// cleanly.
pub async fn run(client: &Client, request: StatsRequest) -> anyhow::Result<()> {
    let Some(watch) = request.watch else {
        let stats = with_rates(client, &request).await?;
        return if request.json {
            crate::print_json(&stats)
        } else {
            crate::print(&stats_table(&stats))
        };
    };
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| anyhow!("watching for Ctrl-C: {e}"))?;
    tokio::select! {
        result = frames(client, &request, watch) => result,
        _ = interrupt.recv() => Ok(()),
    }
}

/// A reading with rates: lbd's first has none, so then read again once a span has passed.
async fn with_rates(client: &Client, request: &StatsRequest) -> anyhow::Result<Stats> {
    let stats = client.stats(request.idle_timeout).await?;
    if stats.rate_interval_secs > 0.0 {
        return Ok(stats);
    }
    tokio::time::sleep(request.interval.max(RATE_SPAN)).await;
    Ok(client.stats(request.idle_timeout).await?)
}

async fn frames(client: &Client, request: &StatsRequest, watch: Watch) -> anyhow::Result<()> {
    let style = if request.json {
        Style::Json
    } else if io::stdout().is_terminal() {
        Style::Terminal
    } else {
        Style::Log
    };
    let mut stats = with_rates(client, request).await?;
    let started = Instant::now();
    let mut ticks = tokio::time::interval(request.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate: the interval counts from this first frame.
    ticks.tick().await;
    for n in 1.. {
        let text = frame(&stats, style, n, started.elapsed(), request.interval);
        crate::print(&text)?;
        if watch.count.is_some_and(|count| n >= count) {
            break;
        }
        ticks.tick().await;
        stats = client.stats(request.idle_timeout).await?;
    }
    Ok(())
}

/// How frames are told apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Style {
    /// One JSON object per line.
    Json,
    /// Each frame replaces the last on the screen (stdout is a terminal).
    Terminal,
    /// Frames one after another, each after a separator line, for a pipe or a file.
    Log,
}

/// Frame `n`, read `elapsed` after the first.
fn frame(stats: &Stats, style: Style, n: u64, elapsed: Duration, interval: Duration) -> String {
    match style {
        Style::Json => {
            let mut line = serde_json::to_string(stats).expect("API messages always serialize");
            line.push('\n');
            line
        }
        Style::Terminal => format!(
            "{CLEAR}lbctl stats every {:.1} s (Ctrl-C to stop)\n\n{}",
            interval.as_secs_f64(),
            stats_table(stats)
        ),
        Style::Log => format!(
            "--- frame {n} at +{:.1} s ---\n{}",
            elapsed.as_secs_f64(),
            stats_table(stats)
        ),
    }
}

#[cfg(test)]
mod tests {
    use lb_userspace::api::proto::{FlowTableStats, GlobalStats};

    use super::*;

    #[test]
    fn frames_by_style() {
        let stats = Stats {
            rate_interval_secs: 1.5,
            idle_timeout_secs: 60,
            vips: vec![],
            global: GlobalStats::default(),
            flow_table: FlowTableStats::default(),
        };
        let table = stats_table(&stats);
        let second = Duration::from_secs(1);
        assert_eq!(
            frame(&stats, Style::Log, 3, Duration::from_millis(2_049), second),
            format!("--- frame 3 at +2.0 s ---\n{table}")
        );
        assert_eq!(
            frame(&stats, Style::Terminal, 3, Duration::ZERO, second / 2),
            format!("\x1b[H\x1b[2Jlbctl stats every 0.5 s (Ctrl-C to stop)\n\n{table}")
        );
        let json = frame(&stats, Style::Json, 1, Duration::ZERO, second);
        assert!(
            json.ends_with('\n') && json.lines().count() == 1,
            "{json:?}"
        );
        assert_eq!(serde_json::from_str::<Stats>(&json).unwrap(), stats);
    }
}
