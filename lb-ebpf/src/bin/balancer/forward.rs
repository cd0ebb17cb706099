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
    packet: &Packet,
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
            let ip = packet.ip as *mut u8;
            let field = ip.add(at) as *mut u32;
            let ip_check = ip.add(IP_CHECK) as *mut u16;
            let old_addr = field.read_unaligned();
            field.write_unaligned(new_addr);
            ip_check.write_unaligned(replace_word(ip_check.read_unaligned(), old_addr, new_addr));
            l4 = replace_word(l4, old_addr, new_addr);
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

/// `check` after a 32-bit word it covers changed: its two halves, as read from the packet.
#[inline(always)]
fn replace_word(check: u16, old: u32, new: u32) -> u16 {
    let check = checksum_replace(check, old as u16, new as u16);
    checksum_replace(check, (old >> 16) as u16, (new >> 16) as u16)
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
