//! The Prometheus text exposition of a [`Stats`] read plus lbd's own metrics.
//! (Placeholder: being written.)

use prometheus::{Encoder as _, Registry, TextEncoder};

use crate::api::proto::Stats;

pub fn render(_stats: &Stats, registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}
