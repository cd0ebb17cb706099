//! Stage 5: the packet rewritten for its target and sent: port translation, then either a new
//! MAC (dsr) or an outer header (ipip: IPv4 for a target named by IPv4 address, IPv6 for one
//! named by IPv6 address, whatever the inner packet's family), out of the interface that
//! reaches the target.

use aya_ebpf::{
    bindings::xdp_action::XDP_TX,
    helpers::{bpf_redirect, bpf_xdp_adjust_head},
    programs::XdpContext,
};
use lb_common::{DropReason, Egress, MAX_INTERFACES, PROTO_TCP, Settings, Target};
use lb_ebpf::{
    ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_LEN, IPV6_LEN,
    TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, checksum_replace, checksum_replace32, checksum_replace128,
    ptr_at, set_address6, set_ipv4_checksum, write_mac,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    counters::drop,
    family::{V4, V6},
    icmp,
    parse::{self, Packet},
};

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
    rewrite_l4(
        ctx,
        packet.l4_off,
        packet.proto,
        port,
        new_port,
        #[inline(always)]
        |l4| {
            let Some((at, new_addr)) = addr else {
                return l4;
            };
            let (old_addr, _) = set_address(packet.ip as *mut u8, at, new_addr);
            checksum_replace32(l4, old_addr, new_addr)
        },
    )
}

/// Replaces the address and the port of one side (0 source, 1 destination) of an IPv6 packet,
/// and its TCP or UDP checksum (IPv6 has no header checksum), incrementally; the TCP or UDP
/// header found again past the extension headers (`parse::l4_offset6`).
#[inline(always)]
pub fn rewrite6(
    ctx: &XdpContext,
    packet: &Packet<V6>,
    side: usize,
    addr: [u32; 4],
    port: u16,
) -> Result<(), DropReason> {
    let l4_off = parse::l4_offset6(packet, ctx)?;
    rewrite_l4(
        ctx,
        l4_off,
        packet.proto,
        side,
        port,
        #[inline(always)]
        |l4| {
            // SAFETY: the parse bounds-checked the IPv6 header, and nothing resized the frame
            // since.
            let field = unsafe {
                if side == 0 {
                    &raw mut (*packet.ip).src_addr
                } else {
                    &raw mut (*packet.ip).dst_addr
                }
            };
            let old = set_address6(field as *mut u8, addr);
            checksum_replace128(l4, old, addr)
        },
    )
}

/// Replaces a port (`port`: 0 source, 1 destination) of the TCP or UDP header at `l4_off` and
/// updates its checksum, incrementally, for the port and for whatever else `more` changes that
/// the checksum covers (it takes the checksum and returns it updated). A UDP checksum of 0,
/// "none", stays 0, and a computed 0 goes out as 0xffff.
#[inline(always)]
fn rewrite_l4(
    ctx: &XdpContext,
    l4_off: usize,
    proto: u8,
    port: usize,
    new_port: u16,
    more: impl FnOnce(u16) -> u16,
) -> Result<(), DropReason> {
    let check_off = l4_off
        + if proto == PROTO_TCP {
            TCP_CHECK_OFFSET
        } else {
            UDP_CHECK_OFFSET
        };
    let (Some(ports), Some(l4_check)) = (
        ptr_at::<[u16; 2]>(ctx, l4_off),
        ptr_at::<u16>(ctx, check_off),
    ) else {
        return Err(DropReason::Malformed);
    };
    // SAFETY: the ports and the checksum were bounds-checked just above.
    unsafe {
        let port_at = (ports as *mut u16).add(port & 1);
        let old_port = port_at.read_unaligned();
        port_at.write_unaligned(new_port);
        let l4 = more(checksum_replace(
            l4_check.read_unaligned(),
            old_port,
            new_port,
        ));
        if proto == PROTO_TCP || l4_check.read_unaligned() != 0 {
            l4_check.write_unaligned(if l4 == 0 && proto != PROTO_TCP {
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

/// Port translation of an IPv6 packet: its TCP or UDP header found again past its extension
/// headers (`parse::l4_offset6`).
#[inline(always)]
pub fn translate_port6(
    ctx: &XdpContext,
    packet: &Packet<V6>,
    target: &Target,
) -> Result<(), DropReason> {
    if target.port == packet.dport {
        return Ok(());
    }
    let l4_off = parse::l4_offset6(packet, ctx)?;
    rewrite_l4(ctx, l4_off, packet.proto, 1, target.port, |l4| l4)
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
    let overhead = overhead(target);
    if u16::from_be_bytes(tot_len) as u32 + overhead <= mtu {
        return None;
    }
    Some(if frags[0] & IP_DF != 0 {
        icmp::too_big(ctx, (mtu - overhead) as u16)
    } else {
        drop(DropReason::TooBig)
    })
}

/// `too_big_to_encapsulate` for an IPv6 packet: it has no DF, and is never fragmented on the
/// way, so its sender is always told ("packet too big", `icmp::too_big6`).
#[inline(always)]
pub fn too_big_to_encapsulate6(
    ctx: &XdpContext,
    packet: &Packet<V6>,
    target: &Target,
    settings: &Settings,
) -> Option<u32> {
    // SAFETY: as above.
    let payload_len = u16::from_be_bytes(unsafe { (*packet.ip).payload_len }) as u32;
    let mtu = egress(target, settings).mtu;
    if IPV6_LEN as u32 + payload_len + IPV6_LEN as u32 <= mtu {
        return None;
    }
    Some(icmp::too_big6(ctx, mtu - IPV6_LEN as u32))
}

/// What encapsulation for `target` adds: an outer IPv4 or IPv6 header.
#[inline(always)]
fn overhead(target: &Target) -> u32 {
    if target.ipv6 != 0 {
        IPV6_LEN as u32
    } else {
        IPV4_LEN as u32
    }
}

/// Prepends an outer header (LB → target: IPv4 with protocol 4, or IPv6 with next header 4
/// for a target named by IPv6 address) and a fresh Ethernet header to the packet whose IPv4
/// header is `ip`; drops it if it would then exceed the MTU.
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
    if target.ipv6 != 0 {
        // Traffic class from the TOS byte, no flow label.
        let class = [0x60 | inner.tos >> 4, inner.tos << 4, 0, 0];
        return encapsulate_in_ipv6(
            ctx,
            inner_len,
            IPPROTO_IPIP,
            class,
            inner.ttl,
            target,
            settings,
        );
    }
    let out = egress(target, settings);
    if inner_len + IPV4_LEN as u32 > out.mtu {
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

/// What an IPv6 packet's outer header takes from it when it is encapsulated: its traffic
/// class and flow label (with the version), its length and its hop limit. Read with the
/// packet's other fields, while its header pointer is fresh.
#[derive(Clone, Copy)]
pub struct Outer6 {
    class: [u8; 4],
    len: u32,
    hop_limit: u8,
}

impl Outer6 {
    /// # Safety
    /// `ip` must be bounds-checked for the whole IPv6 header.
    #[inline(always)]
    pub unsafe fn of(ip: *const Ipv6Hdr) -> Self {
        // SAFETY: as the caller promises.
        unsafe {
            Outer6 {
                class: (*ip).vcf,
                len: IPV6_LEN as u32 + u16::from_be_bytes((*ip).payload_len) as u32,
                hop_limit: (*ip).hop_limit,
            }
        }
    }
}

/// Prepends an outer IPv6 header (LB → target, next header 41) and a fresh Ethernet header to
/// an IPv6 packet (ip6ip6); drops it if it would then exceed the MTU, or if the target has no
/// IPv6 address (the config gives an IPv6 listener's ipip group none).
#[inline(always)]
pub fn encapsulate6(ctx: &XdpContext, inner: Outer6, target: &Target, settings: &Settings) -> u32 {
    if target.ipv6 == 0 {
        return drop(DropReason::EncapFailed);
    }
    encapsulate_in_ipv6(
        ctx,
        inner.len,
        IPPROTO_IPV6,
        inner.class,
        inner.hop_limit,
        target,
        settings,
    )
}

/// Prepends an outer IPv6 header and a fresh Ethernet header to an inner packet of
/// `inner_len` bytes (`next`: its protocol), with version, traffic class and flow label
/// `class` and hop limit `hop_limit`, from the egress interface's IPv6 address to the
/// target's, and sends it; drops it if it would then exceed the MTU.
#[inline(always)]
fn encapsulate_in_ipv6(
    ctx: &XdpContext,
    inner_len: u32,
    next: u8,
    class: [u8; 4],
    hop_limit: u8,
    target: &Target,
    settings: &Settings,
) -> u32 {
    let out = egress(target, settings);
    if inner_len + IPV6_LEN as u32 > out.mtu {
        return drop(DropReason::TooBig);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV6_LEN as i32)) } != 0 {
        return drop(DropReason::EncapFailed);
    }
    let (Some(eth), Some(outer)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv6Hdr>(ctx, ETH_LEN))
    else {
        return drop(DropReason::EncapFailed);
    };
    // SAFETY: both pointers were bounds-checked just above, after the head moved. Addresses
    // are written as words: a `[u8; 16]` copy would call a byte-wise memcpy.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &target.mac);
        write_mac(&raw mut (*eth).src_addr, &out.mac);
        (*eth).ether_type = ETH_P_IPV6_BE;
        (*outer).vcf = class;
        (*outer).payload_len = (inner_len as u16).to_be_bytes();
        (*outer).next_hdr = next;
        (*outer).hop_limit = hop_limit;
        (&raw mut (*outer).src_addr as *mut [u32; 4]).write_unaligned(out.addr6);
        (&raw mut (*outer).dst_addr as *mut [u32; 4]).write_unaligned(target.addr6);
    }
    send_out(ctx, out, settings)
}
