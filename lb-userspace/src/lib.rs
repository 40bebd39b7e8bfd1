//! lb-userspace: the agent (lbd), the CLI (lbctl) and the library they share.

/// The compiled eBPF object holding `lb_xdp`, `lb_decap` and `xdp_pass`.
pub fn bpf_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf.o"))
}
