//! Benchmark harness programs: `bench_reset` restores a template frame on every
//! `BPF_PROG_TEST_RUN` repeat (the kernel reruns a program on the buffer the previous repeat
//! left), optionally gives it a new source address (a new flow), then tail-calls the program
//! under test; `bench_pass` is the trivial `XDP_PASS` baseline. Only its own `BENCH_*` maps.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![allow(clippy::inline_always)]
// `#[xdp]` fixes the entry signature: the context comes by value.
#![allow(clippy::needless_pass_by_value)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
// The lib's panic handler.
use lb_ebpf as _;

/// Every bench frame is exactly this long (the userspace side pads to it): a constant length
/// keeps the copy a fixed, unrolled sequence of stores the verifier accepts.
const FRAME_LEN: usize = 64;
const ETH_HLEN: usize = 14;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_PROTO: usize = ETH_HLEN + 9;
const IP_SRC: usize = ETH_HLEN + 12;
/// L4 checksum offsets for an IHL-5 header.
const TCP_CSUM: usize = ETH_HLEN + 20 + 16;
const UDP_CSUM: usize = ETH_HLEN + 20 + 6;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// Index 0: the template frame.
#[map(name = "BENCH_TEMPLATE")]
static BENCH_TEMPLATE: Array<[u8; FRAME_LEN]> = Array::with_max_entries(1, 0);

/// Index 0: how many distinct source addresses to cycle through (0: keep the template's).
#[map(name = "BENCH_FLOWS")]
static BENCH_FLOWS: Array<u32> = Array::with_max_entries(1, 0);

/// Index 0: packets seen on this CPU, the sequence number of the next flow.
#[map(name = "BENCH_SEQ")]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: the program under test.
#[map(name = "BENCH_PROGS")]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn bench_reset(ctx: XdpContext) -> u32 {
    if reset(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: tail-calls the program userspace put at index 0; on failure control returns.
    unsafe { BENCH_PROGS.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn reset(ctx: &XdpContext) -> Option<()> {
    let template = BENCH_TEMPLATE.get(0)?;
    // Whatever the previous repeat did to the head (encapsulation grows it), move it back so
    // the frame is FRAME_LEN long again; the tail is never changed by the programs tested.
    let len = ctx.data_end() - ctx.data();
    let delta = len as i64 - FRAME_LEN as i64;
    if delta != 0 {
        // SAFETY: the helper only moves ctx->data; it takes the program's own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta as i32) } != 0 {
            return None;
        }
    }
    let start = ctx.data();
    if start + FRAME_LEN > ctx.data_end() {
        return None;
    }
    let dst = start as *mut u8;
    // SAFETY: FRAME_LEN bytes bounds-checked above; the template is a map value of that size.
    unsafe {
        for i in 0..FRAME_LEN / 8 {
            let word = template.as_ptr().add(i * 8).cast::<u64>().read_unaligned();
            dst.add(i * 8).cast::<u64>().write_unaligned(word);
        }
    }
    let flows = *BENCH_FLOWS.get(0)?;
    if flows == 0 {
        return Some(());
    }
    let seq = BENCH_SEQ.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value, only this CPU writes it.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    // SAFETY: every offset below is inside the FRAME_LEN bytes checked above.
    unsafe {
        let src_ptr = dst.add(IP_SRC).cast::<[u8; 4]>();
        let old = u32::from_be_bytes(src_ptr.read_unaligned());
        let new = old.wrapping_add(n % flows);
        src_ptr.write_unaligned(new.to_be_bytes());
        fix(dst.add(IP_CSUM), old, new, false);
        match *dst.add(IP_PROTO) {
            IPPROTO_TCP => fix(dst.add(TCP_CSUM), old, new, false),
            IPPROTO_UDP => fix(dst.add(UDP_CSUM), old, new, true),
            _ => {}
        }
    }
    Some(())
}

/// Updates the big-endian checksum at `at` for a 32-bit field changed from `old` to `new`
/// (RFC 1624: HC' = ~(~HC + ~m + m')); for UDP a zero result is sent as 0xffff.
///
/// # Safety
/// `at` must point at two writable bytes.
#[inline(always)]
unsafe fn fix(at: *mut u8, old: u32, new: u32, udp: bool) {
    let ptr = at.cast::<[u8; 2]>();
    // SAFETY: the caller's contract.
    let csum = u16::from_be_bytes(unsafe { ptr.read_unaligned() });
    let mut sum = u32::from(!csum)
        + u32::from(!(old >> 16) as u16)
        + u32::from(!old as u16)
        + (new >> 16)
        + (new & 0xffff);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let mut out = !(sum as u16);
    if udp && out == 0 {
        out = 0xffff;
    }
    // SAFETY: the caller's contract.
    unsafe { ptr.write_unaligned(out.to_be_bytes()) };
}

// On the host this bin only needs to type-check (clippy --workspace).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
