//! `cargo xtask bench`: every figure measured beside a baseline from the same run, so the
//! numbers hold on a noisy shared machine. Each section is a module returning [`Figure`]s; the
//! `lb-bench` binary runs the sections, prints a Markdown table and writes JSON to
//! `target/bench/`.

use serde::Serialize;

/// One measured number and what it is compared with.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    /// The section: `test_run`, `maglev`, `reconfig`, `health`, `throughput`.
    pub section: &'static str,
    /// What was measured, e.g. `established flow (hit, IPIP, XDP_TX)`.
    pub name: String,
    /// The headline value (for test-run figures: net of the baseline).
    pub value: f64,
    /// `ns/packet`, `ms`, `Mpps`, `backends`, ...
    pub unit: &'static str,
    /// Other statistics of the same measurement, e.g. `("min", 92.0)`, `("median", 95.0)`.
    pub stats: Vec<(String, f64)>,
    /// The baseline measured in the same run, by name and value, when the figure has one.
    pub baseline: Option<(String, f64)>,
    /// A target the issue sets (`<= 100`), shown beside the value, never asserted.
    pub target: Option<String>,
    /// How it was measured, in a few words.
    pub note: String,
}

pub mod breakdown;
pub mod health;
pub mod maglev;
pub mod reconfig;
pub mod test_run;
pub mod throughput;
