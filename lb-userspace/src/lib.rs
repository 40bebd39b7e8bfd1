//! lb-userspace: the agent (lbd), the CLI (lbctl) and the library they share.

pub mod agent;
pub mod api;
pub mod change;
pub mod check;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod nexthop;
pub mod reconcile;
pub mod ring_pool;
pub mod store;
pub mod units;

/// The gateway's eBPF object: programs `lb_xdp` and `lb_hc_encap` (tc egress, tunnel health
/// checks) and every `LB_*` map except `LB_DECAP_VIPS`.
pub fn lb_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-balancer.o"))
}

/// The backend's eBPF object: programs `lb_decap` and `xdp_pass`, map `LB_DECAP_VIPS`.
pub fn decap_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-decap.o"))
}

/// The benchmark's object: `bench_reset` (restores a template frame on every test-run repeat,
/// then tail-calls the program in `BENCH_PROGS`) and `bench_pass`, with its own `BENCH_*` maps.
pub fn bench_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf-bench.o"))
}
