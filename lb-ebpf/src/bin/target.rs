//! The target host's programs, which `lb target` installs:
//!
//! - `lb_decap` (XDP, ingress) strips the outer header of IP-in-IP packets addressed to this
//!   host (IPv4 or IPv6 outside, IPv4 or IPv6 inside: ipip, IPv4-in-IPv6, ip6ip6) and hands
//!   the inner packet to the stack, so a target needs no tunnel module (this is also faster
//!   than one).
//! - `lb_reply_ports` (TC, egress) undoes the balancer's port translation on what this host
//!   sends, IPv4 and IPv6: a reply from (VIP, target port, protocol) leaves with the listener's
//!   port as its source port, which is what the client talked to. Stateless, from
//!   `REPLY_PORTS`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, TC_ACT_OK, xdp_action::XDP_PASS},
    helpers::bpf_xdp_adjust_head,
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{ListenerKey6, PROTO_TCP, PROTO_UDP};
use lb_ebpf::{
    ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_LEN, IPV6_LEN,
    TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, ptr_at,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

/// This host's IPv4 and IPv6 addresses (network order); only tunnels addressed to them are
/// opened.
#[map]
static LOCAL_ADDRS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);
#[map]
static LOCAL_ADDRS6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(64, 0);

/// Index 0: packets decapsulated.
#[map]
static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    match ptr_at::<EthHdr>(&ctx, 0).map(|eth| unsafe { (*eth).ether_type }) {
        Some(ETH_P_IP_BE) => decap(&ctx),
        Some(ETH_P_IPV6_BE) => decap6(&ctx),
        _ => {}
    }
    XDP_PASS
}

/// An IPv4 packet in IPv4.
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
    if outer.vihl != 0x45
        || outer.proto != IPPROTO_IPIP
        || inner.vihl >> 4 != 4
        || unsafe { LOCAL_ADDRS.get(&u32::from_ne_bytes(outer.dst_addr)) }.is_none()
    {
        return;
    }
    strip(ctx, IPV4_LEN, eth_hdr);
}

/// An IPv4 or IPv6 packet in IPv6 (no extension header: what lb sends).
#[inline(always)]
fn decap6(ctx: &XdpContext) {
    let Some(headers) = ptr_at::<[u8; ETH_LEN + IPV6_LEN + 1]>(ctx, 0) else {
        return;
    };
    // SAFETY: the headers and the inner version byte lie within the bounds-checked range.
    let (mut eth_hdr, next, dst, inner_version) = unsafe {
        let outer = (headers as *const u8).add(ETH_LEN) as *const Ipv6Hdr;
        (
            *(headers as *const EthHdr),
            (*outer).next_hdr,
            (&raw const (*outer).dst_addr as *const [u32; 4]).read_unaligned(),
            *(headers as *const u8).add(ETH_LEN + IPV6_LEN) >> 4,
        )
    };
    eth_hdr.ether_type = match (next, inner_version) {
        (IPPROTO_IPIP, 4) => ETH_P_IP_BE,
        (IPPROTO_IPV6, 6) => ETH_P_IPV6_BE,
        _ => return,
    };
    if unsafe { LOCAL_ADDRS6.get(&dst) }.is_none() {
        return;
    }
    strip(ctx, IPV6_LEN, eth_hdr);
}

/// Removes the `outer` bytes of outer header after the Ethernet header, which becomes `eth`.
#[inline(always)]
fn strip(ctx: &XdpContext, outer: usize, eth: EthHdr) {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return;
    }
    let Some(at) = ptr_at::<EthHdr>(ctx, 0) else {
        return;
    };
    // SAFETY: bounds-checked just above, after the head moved.
    unsafe { *at = eth };
    if let Some(counter) = DECAP_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
}

/// (VIP, target port, protocol) → the listener's port, network byte order: what a reply from
/// that VIP and port says as its source port. Written by `lb target`. One map for both
/// families: an IPv4 VIP is keyed as its IPv4-mapped IPv6 address (::ffff:a.b.c.d).
#[map]
static REPLY_PORTS: HashMap<ListenerKey6, u16> = HashMap::with_max_entries(4096, 0);

/// Index 0: replies whose source port was translated.
#[map]
static REPLY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[classifier]
pub fn lb_reply_ports(ctx: TcContext) -> i32 {
    translate_reply(&ctx);
    TC_ACT_OK as i32
}

/// Offsets of the IPv4 header fields read, from the start of the frame.
const IP_VIHL: usize = ETH_LEN;
const IP_FRAGS: usize = ETH_LEN + 6;
const IP_PROTO: usize = ETH_LEN + 9;
const IP_SRC: usize = ETH_LEN + 12;
/// And of the IPv6 header's.
const IP6_NEXT: usize = ETH_LEN + 6;
const IP6_SRC: usize = ETH_LEN + 8;
/// The first three words of an IPv4-mapped IPv6 address, as the map's keys hold them.
const IPV4_MAPPED: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];
/// Fragment offset (a later fragment carries no ports), in the frags field read as big endian.
const IP_OFFSET_MASK: u16 = 0x1fff;
/// The size of the field `bpf_l4_csum_replace` updates the checksum for (BPF_F_HDR_FIELD_MASK).
const PORT_SIZE: u64 = 2;

/// Gives a reply from a translated (VIP, port, protocol) the listener's port. The skb helpers
/// read and write a packet whatever its layout, and `l4_csum_replace` knows the checksum
/// offloads: with a partial checksum (the NIC or GSO completes it) it leaves the field alone,
/// since ports are not in the pseudo-header that field holds.
/// The host's own IPv6 replies carry no extension headers: TCP or UDP follows the IPv6 header.
#[inline(always)]
fn translate_reply(ctx: &TcContext) -> Option<()> {
    let (proto, src, l4_off) = match ctx.load::<u16>(12).ok()? {
        ETH_P_IP_BE => {
            if u16::from_be(ctx.load::<u16>(IP_FRAGS).ok()?) & IP_OFFSET_MASK != 0 {
                return None;
            }
            let ihl = (ctx.load::<u8>(IP_VIHL).ok()? & 0x0f) as usize * 4;
            let [a, b, c] = IPV4_MAPPED;
            let src = [a, b, c, ctx.load::<u32>(IP_SRC).ok()?];
            (ctx.load::<u8>(IP_PROTO).ok()?, src, ETH_LEN + (ihl & 0x3c))
        }
        ETH_P_IPV6_BE => (
            ctx.load::<u8>(IP6_NEXT).ok()?,
            ctx.load::<[u32; 4]>(IP6_SRC).ok()?,
            ETH_LEN + IPV6_LEN,
        ),
        _ => return None,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let sport = ctx.load::<u16>(l4_off).ok()?;
    let key = ListenerKey6 {
        addr: src,
        port: sport,
        proto,
        pad: 0,
    };
    // SAFETY: a plain lookup; the value is copied out at once.
    let port = *unsafe { REPLY_PORTS.get(&key) }?;
    let (check_off, flags) = if proto == PROTO_TCP {
        (l4_off + TCP_CHECK_OFFSET, PORT_SIZE)
    } else {
        // A UDP checksum of 0 ("none") stays 0, a computed 0 becomes 0xffff.
        (
            l4_off + UDP_CHECK_OFFSET,
            PORT_SIZE | BPF_F_MARK_MANGLED_0 as u64,
        )
    };
    ctx.l4_csum_replace(check_off, sport as u64, port as u64, flags)
        .ok()?;
    ctx.store(l4_off, &port, 0).ok()?;
    if let Some(counter) = REPLY_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
    Some(())
}
