//! Stage 5: the packet rewritten for its target and sent: port translation, then either a new
//! MAC (dsr) or an outer IPv4 header (ipip), out of the interface that reaches the target.

use aya_ebpf::{
    bindings::xdp_action::XDP_TX,
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{DropReason, Egress, MAX_INTERFACES, PROTO_TCP, Settings, Target};
use lb_ebpf::{
    ETH_LEN, ETH_P_IP_BE, IPPROTO_IPIP, IPV4_LEN, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
    checksum_replace, checksum_replace32, ptr_at, set_ipv4_checksum, write_mac,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{counters::drop, family::V4, icmp, parse::Packet};

const IP_DF: u8 = 0x40;

/// Offsets in the IPv4 header of its checksum and its two addresses.
pub const IP_CHECK: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;

/// Replaces a port of the packet (`port`: 0 source, 1 destination) and, with `addr`, one of
/// its addresses (`IP_SRC` or `IP_DST`, and the new address), and updates the checksums they
/// are in: the TCP or UDP checksum (whose pseudo-header holds the addresses; a UDP checksum of
/// 0, "none", stays 0, and a computed 0 goes out as 0xffff) and the IPv4 header's.
/// Incrementally (RFC 1624): only the changed words are summed.
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    packet: &Packet<V4>,
    addr: Option<(usize, u32)>,
    port: usize,
    new_port: u16,
) -> Result<(), DropReason> {
    let check_off = packet.l4_off
        + if packet.proto == PROTO_TCP {
            TCP_CHECK_OFFSET
        } else {
            UDP_CHECK_OFFSET
        };
    let (Some(ports), Some(l4_check)) = (
        ptr_at::<[u16; 2]>(ctx, packet.l4_off),
        ptr_at::<u16>(ctx, check_off),
    ) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: the IPv4 header (20 bytes at `ip`) was bounds-checked by the parse, the ports and
    // the checksum just above.
    unsafe {
        let port_at = (ports as *mut u16).add(port & 1);
        let old_port = port_at.read_unaligned();
        port_at.write_unaligned(new_port);
        let mut l4 = checksum_replace(l4_check.read_unaligned(), old_port, new_port);
        if let Some((at, new_addr)) = addr {
            let (old_addr, _) = set_address(packet.ip as *mut u8, at, new_addr);
            l4 = checksum_replace32(l4, old_addr, new_addr);
        }
        if packet.proto == PROTO_TCP || l4_check.read_unaligned() != 0 {
            l4_check.write_unaligned(if l4 == 0 && packet.proto != PROTO_TCP {
                0xffff
            } else {
                l4
            });
        }
    }
    Ok(())
}

/// Port translation: the packet to the target's port, if it is not the listener's.
#[inline(always)]
pub fn translate_port(
    ctx: &XdpContext,
    packet: &Packet<V4>,
    target: &Target,
) -> Result<(), DropReason> {
    if target.port == packet.dport {
        return Ok(());
    }
    rewrite(ctx, packet, None, 1, target.port)
}

/// Replaces the address at `at` (`IP_SRC` or `IP_DST`) of the IPv4 header `ip` and updates its
/// checksum; returns the old address, and the header checksum before and after.
#[inline(always)]
pub fn set_address(ip: *mut u8, at: usize, addr: u32) -> (u32, [u16; 2]) {
    // SAFETY: the caller passes a header bounds-checked for its 20 bytes.
    unsafe {
        let field = ip.add(at) as *mut u32;
        let check = ip.add(IP_CHECK) as *mut u16;
        let (old, old_check) = (field.read_unaligned(), check.read_unaligned());
        let new_check = checksum_replace32(old_check, old, addr);
        field.write_unaligned(addr);
        check.write_unaligned(new_check);
        (old, [old_check, new_check])
    }
}

/// The interface that reaches `target`.
#[inline(always)]
fn egress<'a>(target: &Target, settings: &'a Settings) -> &'a Egress {
    &settings.interfaces[target.egress as usize & (MAX_INTERFACES - 1)]
}

/// Sends a frame for a target out of `out`. A balancer on one interface sends everything back
/// out of it, without asking where the frame came in.
#[inline(always)]
fn send_out(ctx: &XdpContext, out: &Egress, settings: &Settings) -> u32 {
    if settings.interfaces[1].ifindex == 0 {
        XDP_TX
    } else {
        send(ctx, out.ifindex)
    }
}

/// Sends the frame out of interface `ifindex`: back where it came from (`XDP_TX`), or to
/// another of the balancer's interfaces.
#[inline(always)]
pub fn send(ctx: &XdpContext, ifindex: u32) -> u32 {
    // SAFETY: the XDP context as the kernel passed it.
    if ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        XDP_TX
    } else {
        // SAFETY: a plain helper call.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Direct server return on layer 2: the frame (Ethernet header `eth`) goes to the target's
/// MAC, unchanged above it.
#[inline(always)]
pub fn dsr(ctx: &XdpContext, eth: *mut EthHdr, target: &Target, settings: &Settings) -> u32 {
    let out = egress(target, settings);
    // SAFETY: the caller bounds-checked `eth` and has not resized the frame since.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &target.mac);
        write_mac(&raw mut (*eth).src_addr, &out.mac);
    }
    send_out(ctx, out, settings)
}

/// The action for a packet that would exceed the MTU towards `target` once encapsulated, if it
/// would: its sender is told the MTU it must fit if it forbids fragmenting (DF), as Katran does
/// (`icmp::too_big`); it is dropped either way. Before any port translation, so that the
/// message quotes the packet as its sender knows it.
#[inline(always)]
pub fn too_big_to_encapsulate(
    ctx: &XdpContext,
    packet: &Packet<V4>,
    target: &Target,
    settings: &Settings,
) -> Option<u32> {
    // SAFETY: `ip` was bounds-checked by the parse and the frame has not been resized since.
    let (tot_len, frags) = unsafe { ((*packet.ip).tot_len, (*packet.ip).frags) };
    let mtu = egress(target, settings).mtu;
    if fits(u16::from_be_bytes(tot_len), mtu) {
        return None;
    }
    Some(if frags[0] & IP_DF != 0 {
        icmp::too_big(ctx, (mtu - IPV4_LEN as u32) as u16)
    } else {
        drop(DropReason::TooBig)
    })
}

/// Whether an IPv4 packet of `len` bytes fits an interface of MTU `mtu` once encapsulated.
#[inline(always)]
fn fits(len: u16, mtu: u32) -> bool {
    len as u32 + IPV4_LEN as u32 <= mtu
}

/// Prepends an outer IPv4 header (LB → target, protocol 4) and a fresh Ethernet header to the
/// packet whose IPv4 header is `ip`; drops it if it would then exceed the MTU.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    target: &Target,
    settings: &Settings,
) -> u32 {
    // SAFETY: the caller bounds-checked `ip` and has not resized the frame since.
    let inner = unsafe { *ip };
    let inner_len = u16::from_be_bytes(inner.tot_len) as u32;
    let out = egress(target, settings);
    if !fits(inner_len as u16, out.mtu) {
        return drop(DropReason::TooBig);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_LEN as i32)) } != 0 {
        return drop(DropReason::EncapFailed);
    }
    let (Some(eth), Some(outer)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN))
    else {
        return drop(DropReason::EncapFailed);
    };
    // SAFETY: both pointers were bounds-checked just above, after the head moved.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &target.mac);
        write_mac(&raw mut (*eth).src_addr, &out.mac);
        (*eth).ether_type = ETH_P_IP_BE;
        *outer = Ipv4Hdr {
            vihl: 0x45,
            tos: inner.tos,
            tot_len: ((inner_len + IPV4_LEN as u32) as u16).to_be_bytes(),
            id: [0, 0],
            frags: [inner.frags[0] & IP_DF, 0],
            ttl: inner.ttl,
            proto: IPPROTO_IPIP,
            check: [0, 0],
            src_addr: out.addr.to_ne_bytes(),
            dst_addr: target.addr.to_ne_bytes(),
        };
    }
    set_ipv4_checksum(outer);
    send_out(ctx, out, settings)
}
