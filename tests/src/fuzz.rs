//! Packet fuzzing of `lb_xdp` through `BPF_PROG_TEST_RUN`: a seeded generator of random and
//! mutated frames (generate), the configuration the fixture installs (universe), a host-side
//! reference of what the balancer must do with each frame (oracle), and the campaign that runs
//! frames and checks action, output, counters and flow table against the reference (campaign).

pub mod campaign;
pub mod generate;
pub mod oracle;
pub mod parse;
pub mod reference;
pub mod universe;

pub use campaign::{Campaign, Mismatch, Tally};

/// Environment variable that fixes a campaign's seed (to replay a failure).
pub const SEED_ENV: &str = "LB_FUZZ_SEED";

/// The seed from `LB_FUZZ_SEED` (decimal or 0x-hex), else one from the clock.
pub fn seed_from_env() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(text) => {
            parse_seed(&text).unwrap_or_else(|| panic!("{SEED_ENV}={text:?} is not a number"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// A seed in decimal or `0x` hex.
pub fn parse_seed(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}
