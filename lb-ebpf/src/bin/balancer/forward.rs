//! Stage 5: the packet rewritten for its target and sent: port translation, then either a new
//! MAC (dsr) or an outer IPv4 header (ipip).

use aya_ebpf::{bindings::xdp_action::XDP_TX, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{DropReason, PROTO_TCP, Settings, Target};
use lb_ebpf::{
    ETH_LEN, ETH_P_IP_BE, IPPROTO_IPIP, IPV4_LEN, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
    checksum_replace, ptr_at, set_ipv4_checksum, write_mac,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{counters::drop, parse::Packet};

const IP_DF: u8 = 0x40;

/// Gives the packet the target's port as destination, and its TCP or UDP checksum the change
/// (a UDP checksum of 0, "none", stays 0). Ports are not in the pseudo-header: the one word is
/// all that changes.
#[inline(always)]
pub fn translate_port(ctx: &XdpContext, packet: &Packet, port: u16) -> Result<(), DropReason> {
    let check_off = packet.l4_off
        + if packet.proto == PROTO_TCP {
            TCP_CHECK_OFFSET
        } else {
            UDP_CHECK_OFFSET
        };
    let (Some(ports), Some(check)) = (
        ptr_at::<[u16; 2]>(ctx, packet.l4_off),
        ptr_at::<u16>(ctx, check_off),
    ) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: both pointers were bounds-checked just above.
    unsafe {
        (&raw mut (*ports)[1]).write_unaligned(port);
        let old = check.read_unaligned();
        if packet.proto == PROTO_TCP || old != 0 {
            let new = checksum_replace(old, packet.dport, port);
            // In UDP a computed 0 is sent as its other form, 0xffff: 0 means "no checksum".
            check.write_unaligned(if new == 0 && packet.proto != PROTO_TCP {
                0xffff
            } else {
                new
            });
        }
    }
    Ok(())
}

/// Direct server return on layer 2: the frame goes to the target's MAC, unchanged above it.
#[inline(always)]
pub fn dsr(packet: &Packet, target: &Target, settings: &Settings) -> u32 {
    // SAFETY: `eth` was bounds-checked by the parse and the frame has not been resized since.
    unsafe {
        write_mac(&raw mut (*packet.eth).dst_addr, &target.mac);
        write_mac(&raw mut (*packet.eth).src_addr, &settings.iface_mac);
    }
    XDP_TX
}

/// Prepends an outer IPv4 header (LB → target, protocol 4) and a fresh Ethernet header.
#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, packet: &Packet, target: &Target, settings: &Settings) -> u32 {
    // SAFETY: `ip` was bounds-checked by the parse and the frame has not been resized since.
    let inner = unsafe { *packet.ip };
    let inner_len = u16::from_be_bytes(inner.tot_len) as u32;
    if inner_len + IPV4_LEN as u32 > settings.mtu {
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
        write_mac(&raw mut (*eth).src_addr, &settings.iface_mac);
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
            src_addr: settings.iface_addr.to_ne_bytes(),
            dst_addr: target.addr.to_ne_bytes(),
        };
    }
    set_ipv4_checksum(outer);
    XDP_TX
}
