//! The status page. (Placeholder: being written.)

use crate::api::proto::Stats;

pub fn render(stats: &Stats) -> String {
    format!(
        "<!doctype html><title>lbd</title><p>{} VIPs</p>",
        stats.vips.len()
    )
}
