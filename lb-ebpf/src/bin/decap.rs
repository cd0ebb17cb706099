//! The target-side program: `lb_decap` strips the outer IPv4 header of IP-in-IP packets
//! addressed to this host and hands the inner packet to the stack, so a target needs no ipip
//! module (this is also faster than one).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_ebpf::{ETH_LEN, ETH_P_IP_BE, IPPROTO_IPIP, IPV4_LEN, ptr_at};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// This host's IPv4 addresses (network order); only tunnels addressed to them are opened.
#[map]
static LOCAL_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);

/// Index 0: packets decapsulated.
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap(&ctx);
    XDP_PASS
}

#[inline(always)]
fn decap(ctx: &XdpContext) {
    // One bounds check for all three headers keeps the verifier's view of the pointers simple.
    let Some(headers) = ptr_at::<[u8; ETH_LEN + 2 * IPV4_LEN]>(ctx, 0) else {
        return;
    };
    let eth = headers as *const EthHdr;
    // SAFETY: the three headers lie within the bounds-checked range.
    let (eth_hdr, outer, inner) = unsafe {
        (
            *eth,
            *(headers as *const u8).add(ETH_LEN).cast::<Ipv4Hdr>(),
            *(headers as *const u8)
                .add(ETH_LEN + IPV4_LEN)
                .cast::<Ipv4Hdr>(),
        )
    };
    // Only option-less outer headers (what lb sends), carrying an IPv4 packet, to this host.
    if eth_hdr.ether_type != ETH_P_IP_BE
        || outer.vihl != 0x45
        || outer.proto != IPPROTO_IPIP
        || inner.vihl >> 4 != 4
        || unsafe { LOCAL_ADDRS.get(&u32::from_ne_bytes(outer.dst_addr)) }.is_none()
    {
        return;
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, IPV4_LEN as i32) } != 0 {
        return;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return;
    };
    // SAFETY: bounds-checked just above, after the head moved.
    unsafe { *eth = eth_hdr };
    if let Some(counter) = DECAP_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
}
