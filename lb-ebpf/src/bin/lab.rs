//! Programs for labs and benchmarks, never loaded by `lb` itself.
//!
//! - `lb_pass` passes everything: veth only delivers `XDP_TX` frames promptly to a peer that
//!   runs an XDP program, so labs attach it to the peers of interfaces that transmit with XDP.
//! - `lb_reflect` swaps the MACs and sends the frame back: the least any XDP forwarder does, the
//!   baseline of `cargo xtask bench`.
//! - `lb_generate` turns BPF_PROG_TEST_RUN in live-frames mode into a packet generator: it gives
//!   every frame the next UDP source port, cycling through `GENERATOR_FLOWS` of them, and
//!   transmits it.
//! - `lb_sink` counts and drops what reaches it, so no receiving stack is in the measurement.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use lb_ebpf::{ETH_LEN, IPV4_LEN, ptr_at};
use network_types::eth::EthHdr;

/// Per CPU: the generator's frame count.
#[map]
static GENERATED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// How many flows (source ports from 1024 on) the generator cycles through, at most 64512: a
/// constant the loader sets (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static GENERATOR_FLOWS: Global<u32> = Global::new(60_000);

/// Per CPU: frames the sink dropped.
#[map]
static SUNK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn lb_reflect(ctx: XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(&ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        let dst = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = dst;
    }
    XDP_TX
}

/// For an option-less IPv4 UDP template frame: source ports 1024, 1025, ... one per frame, back
/// to 1024 after `GENERATOR_FLOWS` of them.
#[xdp]
pub fn lb_generate(ctx: XdpContext) -> u32 {
    let (Some(port), Some(count)) = (
        ptr_at::<[u8; 2]>(&ctx, ETH_LEN + IPV4_LEN),
        GENERATED.get_ptr_mut(0),
    ) else {
        return XDP_DROP;
    };
    let flows = GENERATOR_FLOWS.load();
    // SAFETY: bounds-checked by `ptr_at`; a per-CPU value has no other writer.
    unsafe {
        let next = (*count).wrapping_add(1);
        *count = if next >= flows || next >= 64512 {
            0
        } else {
            next
        };
        *port = ((1024 + *count) as u16).to_be_bytes();
    }
    XDP_TX
}

#[xdp]
pub fn lb_sink(_ctx: XdpContext) -> u32 {
    if let Some(count) = SUNK.get_ptr_mut(0) {
        // SAFETY: a per-CPU value has no other writer.
        unsafe { *count += 1 };
    }
    XDP_DROP
}
