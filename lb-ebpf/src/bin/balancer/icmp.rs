//! ICMP, as an NLB's addresses answer it though no host holds the VIP:
//!
//! - Echo requests to a VIP are answered here, IPv4's and IPv6's: `ping VIP` works.
//! - Errors (destination unreachable, "fragmentation needed" among them; time exceeded;
//!   parameter problem) go to the host that sent the packet they quote, found through the
//!   connection table:
//!   - about a reply (quoting VIP:listener-port → client, so sent to the VIP): to the flow's
//!     target. Under DSR the reply bypassed the balancer, and only this way does a router's
//!     "fragmentation needed" reach the target, so that large replies over a smaller-MTU path
//!     do not hang. Under NAT, translated in both headers like the flow itself (the outer
//!     destination and the quoted source).
//!   - from the target's side, about a NAT request (quoting client → target:port): to the
//!     client, as if from VIP:listener-port (the outer source and the quoted destination).
//!
//!   ICMPv6's errors go the same way (`error6`; about nat flows `translate6`, in `lb_nat6`),
//!   as long as the packet they quote has no extension headers (a target's own replies have
//!   none). An error to a VIP that names no flow lb can place is dropped and counted
//!   (`icmp_unmatched`); others are left to the kernel.
//! - A packet too big to encapsulate is answered with "fragmentation needed" if it is IPv4
//!   with DF set (`too_big`), with "packet too big" if it is IPv6 (`too_big6`).

use aya_ebpf::{
    bindings::xdp_action::{XDP_PASS, XDP_TX},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    DropReason, FORWARDING_IPIP, FORWARDING_NAT, FlowKey, FlowKey6, FlowTable, Group, IcmpCounter,
    Listener, ListenerKey, ListenerKey6, ListenerKeyOf, NAT_IPV4, NAT_IPV6, PROTO_TCP, PROTO_UDP,
    Settings,
};
use lb_ebpf::{
    ETH_LEN, ETH_P_IP_BE, ETH_P_IPV6_BE, IPV4_LEN, IPV6_LEN, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET,
    checksum, checksum_from, checksum_replace, checksum_replace32, checksum_replace128, ptr_at,
    set_address6, set_ipv4_checksum, write_mac,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    GROUPS, TARGETS,
    counters::{self, drop},
    family::{Family, V4, V6},
    flows, forward,
    forward::{IP_DST, IP_SRC, set_address},
    listener, nat,
    parse::IP_MF_OFFSET_MASK,
    pick,
};

const PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
/// The TTL of what lb sends of its own (echo replies, errors), as Linux sends its own.
const ECHO_TTL: u8 = 64;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// The code of destination unreachable that says "fragmentation needed and DF set".
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_HDR_LEN: usize = 8;
const ICMP_CHECK_OFFSET: usize = 2;

/// The echo reply, sent back, if the frame is a well-formed echo request to a VIP; `None` if
/// not. The request becomes the reply in place: type 0, addresses and MACs swapped, a fresh
/// TTL, both checksums updated incrementally.
#[inline(always)]
pub fn echo(ctx: &XdpContext) -> Option<u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
    // SAFETY: every pointer here comes from `ptr_at`, which checked it against data_end.
    let (ether_type, vihl, proto, frags, tot_len, dst) = unsafe {
        (
            (*eth).ether_type,
            (*ip).vihl,
            (*ip).proto,
            (*ip).frags,
            u16::from_be_bytes((*ip).tot_len) as usize,
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    let ihl = (vihl & 0x0f) as usize * 4;
    if ether_type != ETH_P_IP_BE
        || proto != PROTO_ICMP
        || vihl >> 4 != 4
        || ihl < IPV4_LEN
        || u16::from_be_bytes(frags) & IP_MF_OFFSET_MASK != 0
    {
        return None;
    }
    // The header checked against the frame's end first: a length test before it would let the
    // compiler drop this check, which the verifier needs.
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, ETH_LEN + (ihl & 0x3c))?;
    if tot_len < ihl + ICMP_HDR_LEN || ETH_LEN + tot_len > ctx.data_end() - ctx.data() {
        return None;
    }
    // SAFETY: as above.
    if unsafe { (*icmp)[0] != ICMP_ECHO_REQUEST || (*icmp)[1] != 0 } || !listener::is_vip::<V4>(dst)
    {
        return None;
    }
    reply_in_place(eth, icmp, ICMP_ECHO_REPLY);
    // SAFETY: as above; the frame keeps its size.
    unsafe {
        // Swapped addresses leave the header's sum as it was; the TTL changes it.
        let (src, ttl_proto) = (
            (*ip).src_addr,
            (&raw const (*ip).ttl as *const u16).read_unaligned(),
        );
        (*ip).src_addr = (*ip).dst_addr;
        (*ip).dst_addr = src;
        (*ip).ttl = ECHO_TTL;
        let new_ttl_proto = (&raw const (*ip).ttl as *const u16).read_unaligned();
        let ip_check = &raw mut (*ip).check as *mut u16;
        ip_check.write_unaligned(checksum_replace(
            ip_check.read_unaligned(),
            ttl_proto,
            new_ttl_proto,
        ));
    }
    Some(XDP_TX)
}

/// Turns the echo request whose ICMP or ICMPv6 header is `icmp` into a reply of type `reply`
/// (its checksum updated incrementally), addressed back to the MAC it came from, and counts
/// it; the IP header is the caller's to turn around. Both pointers bounds-checked.
#[inline(always)]
fn reply_in_place(eth: *mut EthHdr, icmp: *mut [u8; ICMP_HDR_LEN], reply: u8) {
    // SAFETY: the caller checked both headers against data_end; the frame keeps its size.
    unsafe {
        let kind = icmp as *mut u16;
        let check = (icmp as *mut u16).add(ICMP_CHECK_OFFSET / 2);
        let old_kind = kind.read_unaligned();
        let new_kind = u16::from_ne_bytes([reply, 0]);
        kind.write_unaligned(new_kind);
        check.write_unaligned(checksum_replace(check.read_unaligned(), old_kind, new_kind));
        let client = (*eth).src_addr;
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = client;
    }
    counters::icmp(IcmpCounter::EchoReply);
}

/// ICMPv6's echo request and reply (RFC 4443).
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const PROTO_ICMPV6: u8 = 58;

/// The echo reply, sent back, if the frame is an ICMPv6 echo request to an IPv6 VIP (right
/// after the IPv6 header); `None` if not. As `echo` does for IPv4: type 129, addresses and
/// MACs swapped (which leaves the checksum's pseudo-header sum as it was), a fresh hop limit.
#[inline(always)]
pub fn echo6(ctx: &XdpContext) -> Option<u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)?;
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, ETH_LEN + IPV6_LEN)?;
    // SAFETY: every pointer here comes from `ptr_at`, which checked it against data_end.
    let (next, payload_len, dst) = unsafe {
        (
            (*ip).next_hdr,
            u16::from_be_bytes((*ip).payload_len) as usize,
            (&raw const (*ip).dst_addr as *const [u32; 4]).read_unaligned(),
        )
    };
    if next != PROTO_ICMPV6
        || payload_len < ICMP_HDR_LEN
        || ETH_LEN + IPV6_LEN + payload_len > ctx.data_end() - ctx.data()
        || unsafe { (*icmp)[0] != ICMPV6_ECHO_REQUEST || (*icmp)[1] != 0 }
        || !listener::is_vip::<V6>(dst)
    {
        return None;
    }
    reply_in_place(eth, icmp, ICMPV6_ECHO_REPLY);
    // SAFETY: as above; the frame keeps its size. No header checksum in IPv6.
    unsafe {
        let src = (*ip).src_addr;
        (*ip).src_addr = (*ip).dst_addr;
        (*ip).dst_addr = src;
        (*ip).hop_limit = ECHO_TTL;
    }
    Some(XDP_TX)
}

/// ICMPv6's errors (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem.
const ICMPV6_ERRORS: [u8; 4] = [1, 2, 3, 4];
/// Where the source and destination address sit in an IPv6 header.
const IP6_SRC: usize = 8;
const IP6_DST: usize = 24;

/// An ICMPv6 error and the TCP or UDP packet it quotes (an IPv6 header, then, without
/// extension headers, its TCP or UDP header).
struct Error6 {
    eth: *mut EthHdr,
    ip: *mut Ipv6Hdr,
    outer: forward::Outer6,
    outer_dst: [u32; 4],
    quoted: Quoted,
    /// The quoted packet's addresses, ports and protocol.
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
}

/// What `then` makes of the frame as an ICMPv6 error: `None` if it is none, `Err(destination)`
/// if it is one that quotes no TCP or UDP packet lb could know. (A continuation: an `Error6`
/// inside an `Option` would have the compiler read part of a packet pointer as the
/// discriminant, which the verifier refuses.)
#[inline(always)]
fn on_error6<R>(ctx: &XdpContext, then: impl FnOnce(Error6) -> R) -> Option<Result<R, [u32; 4]>> {
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv6Hdr>(ctx, ETH_LEN),
        ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, ETH_LEN + IPV6_LEN),
    ) else {
        return None;
    };
    // SAFETY: every pointer here comes from `ptr_at`, which checked it against data_end.
    let (next, kind, outer_dst, outer) = unsafe {
        (
            (*ip).next_hdr,
            (*icmp)[0],
            (&raw const (*ip).dst_addr as *const [u32; 4]).read_unaligned(),
            forward::Outer6::of(ip),
        )
    };
    if next != PROTO_ICMPV6 || !ICMPV6_ERRORS.contains(&kind) {
        return None;
    }
    let quote = ETH_LEN + IPV6_LEN + ICMP_HDR_LEN;
    let Some(inner) = ptr_at::<Ipv6Hdr>(ctx, quote) else {
        return Some(Err(outer_dst));
    };
    // SAFETY: as above.
    let (proto, src, dst) = unsafe {
        (
            (*inner).next_hdr,
            (&raw const (*inner).src_addr as *const [u32; 4]).read_unaligned(),
            (&raw const (*inner).dst_addr as *const [u32; 4]).read_unaligned(),
        )
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Some(Err(outer_dst));
    }
    let Some(quoted) = Quoted::at(ctx, icmp, inner as *mut u8, quote + IPV6_LEN, proto) else {
        return Some(Err(outer_dst));
    };
    let [sport, dport] = quoted.ports();
    Some(Ok(then(Error6 {
        eth,
        ip,
        outer,
        outer_dst,
        quoted,
        src,
        dst,
        sport,
        dport,
        proto,
    })))
}

/// The frame sent on to the flow's target if it is an ICMPv6 error about a reply of an IPv6
/// dsr or ipip flow (quoting VIP:listener-port → client, sent to the VIP): IPv6's `error`, by
/// the same rules. One about a NAT flow goes on to `lb_nat6` (`nat_error6`).
/// `Ok(None)` if it is no ICMPv6 error; the destination and `IcmpUnmatched` if it is one that
/// names no flow lb can place.
#[inline(always)]
pub fn error6(
    ctx: &XdpContext,
    settings: &Settings,
) -> Result<Option<u32>, ([u32; 4], DropReason)> {
    // The clock read once the headers are: read before, it has the compiler load the frame's
    // start in a form the verifier refuses.
    let sent = on_error6(
        ctx,
        #[inline(always)]
        |error| to_target6(ctx, error, settings, crate::clock()),
    );
    match sent {
        None => Ok(None),
        Some(Ok(sent)) => sent.map(Some),
        Some(Err(dst)) => Err((dst, DropReason::IcmpUnmatched)),
    }
}

/// `error6`'s error, sent on to its flow's target.
#[inline(always)]
fn to_target6(
    ctx: &XdpContext,
    error: Error6,
    settings: &Settings,
    now: u64,
) -> Result<u32, ([u32; 4], DropReason)> {
    let unmatched = (error.outer_dst, DropReason::IcmpUnmatched);
    let key = ListenerKey6::new(error.src, error.sport, error.proto);
    let slot = if error.src == error.outer_dst {
        listener::find_key::<V6>(&key)
    } else {
        None
    };
    let group = slot.and_then(|slot| GROUPS.get(slot.listener.group));
    let (Some(slot), Some(group)) = (slot, group.filter(|g| g.forwarding != FORWARDING_NAT)) else {
        // About a NAT flow, either way: NAT's own stage (`nat_error6`).
        if settings.nat & NAT_IPV6 != 0 {
            nat::hand_on6(ctx, lb_common::Handoff::icmp());
        }
        return Err(unmatched);
    };
    let listener = &slot.listener;
    let table = flows::FLOW_TABLE.get(V6::INDEX).ok_or(unmatched)?;
    let key = FlowKey6::new(error.dst, error.src, error.dport, error.sport, error.proto);
    let id = flow_target::<V6>(table, &key, listener, group, settings, now).ok_or(unmatched)?;
    let target = TARGETS.get(id).ok_or(unmatched)?;
    // Under port translation the target's socket has its own port, which the quote must name
    // (the ICMPv6 checksum's pseudo-header, over the outer addresses, stays as it was).
    if target.port != error.sport {
        error.quoted.change_port(0, target.port);
    }
    counters::icmp(IcmpCounter::ErrorToTarget);
    Ok(if group.forwarding == FORWARDING_IPIP {
        forward::encapsulate6(ctx, error.outer, target, settings)
    } else {
        forward::dsr(ctx, error.eth, target, settings)
    })
}

/// `lb_nat6`'s part of ICMPv6: the frame as an ICMPv6 error about an IPv6 NAT flow, sent where
/// it belongs (`translate6`); passed if it is no ICMPv6 error.
#[inline(always)]
pub fn nat_error6(ctx: &XdpContext, now: u64) -> u32 {
    let sent = on_error6(
        ctx,
        #[inline(always)]
        |error| translate6(ctx, error, now),
    );
    match sent {
        None => XDP_PASS,
        Some(Ok(action)) => action,
        Some(Err(dst)) => crate::refuse::<V6>(dst, DropReason::IcmpUnmatched),
    }
}

/// An ICMPv6 error about an IPv6 NAT flow, translated like the flow and sent on. About a
/// reply (quoting VIP:listener-port → client, sent to the VIP): to the target, naming it and
/// its port in the quote and as the outer destination. About a request (quoting client →
/// target:port, from the target's side): to the client, as if from VIP:listener-port. Dropped
/// and counted if it names no NAT flow and went to a VIP.
#[inline(always)]
fn translate6(ctx: &XdpContext, error: Error6, now: u64) -> u32 {
    let unmatched = || crate::refuse::<V6>(error.outer_dst, DropReason::IcmpUnmatched);
    let Some(table) = flows::FLOW_TABLE.get(V6::INDEX) else {
        return unmatched();
    };
    let reversed = FlowKey6::new(error.dst, error.src, error.dport, error.sport, error.proto);
    // About a reply, which left from VIP:listener-port, so the error went to the VIP.
    let key = ListenerKey6::new(error.src, error.sport, error.proto);
    if error.src == error.outer_dst
        && let Some(slot) = listener::find_key::<V6>(&key)
    {
        let target = remembered_target::<V6>(table, &reversed, &slot.listener, now)
            .and_then(|id| TARGETS.get(id));
        let Some(target) = target else {
            return unmatched();
        };
        error.quoted.rewrite6(IP6_SRC, target.addr6, 0, target.port);
        set_outer6(&error, IP6_DST, target.addr6);
        counters::icmp(IcmpCounter::ErrorToTarget);
        return nat::towards::<V6>(ctx, error.eth, error.ip);
    }
    // About a request, which went to target:port.
    let Some((_, slot)) = nat::reverse_flow::<V6>(table, &reversed, now) else {
        return unmatched();
    };
    let (vip, port) = (slot.key.address(), slot.key.port());
    error.quoted.rewrite6(IP6_DST, vip, 1, port);
    set_outer6(&error, IP6_SRC, vip);
    counters::icmp(IcmpCounter::ErrorToClient);
    nat::towards::<V6>(ctx, error.eth, error.ip)
}

/// Replaces the ICMPv6 error's outer address at `at` (`IP6_SRC` or `IP6_DST`), which its
/// checksum's pseudo-header covers.
#[inline(always)]
fn set_outer6(error: &Error6, at: usize, addr: [u32; 4]) {
    // SAFETY: the header was bounds-checked by `on_error6`, and the frame has not been
    // resized since.
    unsafe {
        let old = set_address6((error.ip as *mut u8).add(at), addr);
        let check = error.quoted.icmp_check.read_unaligned();
        let check = checksum_replace128(check, old, addr);
        error.quoted.icmp_check.write_unaligned(check);
    }
}

/// The frame sent where it belongs if it is an ICMP error (destination unreachable, which
/// includes "fragmentation needed"; time exceeded; parameter problem) about a flow through lb;
/// `Ok(None)` if it is none. An error that names no flow lb can place gives its destination and
/// `IcmpUnmatched`: dropped and counted if that is a VIP.
#[inline(always)]
pub fn error(
    ctx: &XdpContext,
    settings: &Settings,
    now: u64,
) -> Result<Option<u32>, (u32, DropReason)> {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)) else {
        return Ok(None);
    };
    // SAFETY: every pointer here comes from `ptr_at`, which checked it against data_end.
    let (ether_type, vihl, proto, frags, outer_dst) = unsafe {
        (
            (*eth).ether_type,
            (*ip).vihl,
            (*ip).proto,
            (*ip).frags,
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    if ether_type != ETH_P_IP_BE
        || proto != PROTO_ICMP
        || vihl >> 4 != 4
        || (vihl & 0x0f) < 5
        || u16::from_be_bytes(frags) & IP_MF_OFFSET_MASK != 0
    {
        return Ok(None);
    }
    let icmp_off = ETH_LEN + ((vihl & 0x0f) as usize * 4 & 0x3c);
    let Some(icmp) = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off) else {
        return Ok(None);
    };
    let kind = unsafe { (*icmp)[0] };
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETER_PROBLEM
    {
        return Ok(None);
    }
    let unmatched = (outer_dst, DropReason::IcmpUnmatched);
    let (quoted, key) = quote(ctx, icmp, icmp_off + ICMP_HDR_LEN).ok_or(unmatched)?;
    let table = flows::FLOW_TABLE.get(V4::INDEX).ok_or(unmatched)?;

    // About a reply, which left from VIP:listener-port, so the error went to the VIP.
    let listener_key = ListenerKey::new(key.dst, key.dport, key.proto);
    if outer_dst == key.dst
        && let Some(slot) = listener::find_key::<V4>(&listener_key)
    {
        let action = to_target(
            ctx,
            eth,
            ip,
            &quoted,
            table,
            &key,
            &slot.listener,
            settings,
            now,
        );
        return action.map(Some).ok_or(unmatched);
    }

    // About a NAT request, which went to target:port: to the client, from VIP:listener-port.
    if settings.nat & NAT_IPV4 == 0 {
        return Err(unmatched);
    }
    let (_, slot) = nat::reverse_flow::<V4>(table, &key, now).ok_or(unmatched)?;
    quoted.rewrite(IP_DST, slot.key.addr, 1, slot.key.port);
    // The outer source too: no pseudo-header covers it in ICMP.
    set_address(ip as *mut u8, IP_SRC, slot.key.addr);
    counters::icmp(IcmpCounter::ErrorToClient);
    Ok(Some(nat::towards::<V4>(ctx, eth, ip)))
}

/// The packet an ICMP error quotes from `off` on (`icmp` its header), and the quote reversed as
/// a connection-table key: a flow's forward entry if the quote is a reply, its reverse entry if
/// it is a NAT request. `None` if it quotes no whole TCP or UDP header start.
#[inline(always)]
fn quote(ctx: &XdpContext, icmp: *mut [u8; ICMP_HDR_LEN], off: usize) -> Option<(Quoted, FlowKey)> {
    let inner = ptr_at::<Ipv4Hdr>(ctx, off)?;
    // SAFETY: every pointer here comes from `ptr_at`, which checked it against data_end.
    let (inner_vihl, inner_proto, inner_frags) =
        unsafe { ((*inner).vihl, (*inner).proto, (*inner).frags) };
    let inner_ihl = (inner_vihl & 0x0f) as usize * 4;
    if inner_vihl >> 4 != 4
        || inner_ihl < IPV4_LEN
        || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP)
        || u16::from_be_bytes(inner_frags) & IP_MF_OFFSET_MASK != 0
    {
        return None;
    }
    let l4_off = off + (inner_ihl & 0x3c);
    let quoted = Quoted::at(ctx, icmp, inner as *mut u8, l4_off, inner_proto)?;
    let [sport, dport] = quoted.ports();
    let (src, dst) = unsafe {
        (
            u32::from_ne_bytes((*inner).src_addr),
            u32::from_ne_bytes((*inner).dst_addr),
        )
    };
    Some((quoted, FlowKey::new(dst, src, dport, sport, inner_proto)))
}

/// Sends an error about a reply of `listener`'s flow `key` (reversed from the quote) to the
/// flow's target: the one the connection table remembers, or else where the group's hash
/// places the flow (not under NAT, whose flows exist only in the table). The target's stack
/// then acts on it as on any error: a "fragmentation needed" lowers its path MTU to the client,
/// which is what makes path MTU discovery work for replies that bypass the balancer (DSR).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn to_target(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    quoted: &Quoted,
    table: &FlowTable,
    key: &FlowKey,
    listener: &Listener,
    settings: &Settings,
    now: u64,
) -> Option<u32> {
    let group = GROUPS.get(listener.group)?;
    let target = TARGETS.get(flow_target::<V4>(
        table, key, listener, group, settings, now,
    )?)?;
    counters::icmp(IcmpCounter::ErrorToTarget);
    if group.forwarding == FORWARDING_NAT {
        quoted.rewrite(IP_SRC, target.addr, 0, target.port);
        set_address(ip as *mut u8, IP_DST, target.addr);
        return Some(nat::towards::<V4>(ctx, eth, ip));
    }
    // Under port translation the target's socket has its own port, which the quote must name.
    if target.port != key.dport {
        quoted.change_port(0, target.port);
    }
    Some(if group.forwarding == FORWARDING_IPIP {
        forward::encapsulate(ctx, ip, target, settings)
    } else {
        forward::dsr(ctx, eth, target, settings)
    })
}

/// The target of `listener`'s flow `key` that an error is about: the one the connection table
/// remembers, or else (a flow it does not hold: another node's, or one it had no room for)
/// where the group's hash places it; none under NAT, whose flows exist only in the table.
#[inline(always)]
fn flow_target<F: Family>(
    table: &FlowTable,
    key: &F::Key,
    listener: &Listener,
    group: &Group,
    settings: &Settings,
    now: u64,
) -> Option<u32> {
    remembered_target::<F>(table, key, listener, now).or_else(|| {
        (group.forwarding != FORWARDING_NAT)
            .then(|| pick::placed_by_hash(key, listener, group, settings))
            .flatten()
    })
}

/// The target the connection table remembers for `listener`'s flow `key`, if it still holds
/// the flow and its target is still there.
#[inline(always)]
fn remembered_target<F: Family>(
    table: &FlowTable,
    key: &F::Key,
    listener: &Listener,
    now: u64,
) -> Option<u32> {
    flows::lookup::<F>(table, key).and_then(|(entry, found, hash)| {
        found
            .then(|| flows::existing_target(entry, hash, listener, false, now))
            .flatten()
    })
}

/// How much of a packet too big to encapsulate its "fragmentation needed" quotes: the IPv4
/// header and what follows it, enough for the ports (RFC 792 asks for 8 bytes past the header).
const TOO_BIG_QUOTE: usize = 64;
/// The whole message: Ethernet, IPv4 and ICMP headers, and the quote.
const TOO_BIG_FRAME: usize = ETH_LEN + IPV4_LEN + ICMP_HDR_LEN + TOO_BIG_QUOTE;

/// Answers a packet that would exceed the MTU once encapsulated, as Katran does: "fragmentation
/// needed" (type 3, code 4) with next-hop MTU `mtu`, from the VIP to the client, back out where
/// it came in. The frame becomes the message: cut to the quote, new headers in front. Counted
/// both as sent and as the `too_big` drop of the packet.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, mtu: u16) -> u32 {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)) else {
        return drop(DropReason::TooBig);
    };
    // SAFETY: both pointers come from `ptr_at`, which checked them against data_end.
    let (client_mac, our_mac, client, vip) = unsafe {
        (
            (*eth).src_addr,
            (*eth).dst_addr,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    let Some(frame) = make_room::<TOO_BIG_FRAME>(ctx, TOO_BIG_QUOTE, IPV4_LEN) else {
        return drop(DropReason::TooBig);
    };
    // SAFETY: `frame` was bounds-checked for the whole message just above; the original IPv4
    // header, now the quote, starts right after the ICMP header.
    unsafe {
        let eth = frame as *mut EthHdr;
        write_mac(&raw mut (*eth).dst_addr, &client_mac);
        write_mac(&raw mut (*eth).src_addr, &our_mac);
        (*eth).ether_type = ETH_P_IP_BE;
        let ip = (frame as *mut u8).add(ETH_LEN) as *mut Ipv4Hdr;
        *ip = Ipv4Hdr {
            vihl: 0x45,
            tos: 0,
            tot_len: ((TOO_BIG_FRAME - ETH_LEN) as u16).to_be_bytes(),
            id: [0, 0],
            frags: [0, 0],
            ttl: ECHO_TTL,
            proto: PROTO_ICMP,
            check: [0, 0],
            src_addr: vip,
            dst_addr: client,
        };
        set_ipv4_checksum(ip);
        let icmp = (frame as *mut u8).add(ETH_LEN + IPV4_LEN);
        let [mtu_hi, mtu_lo] = mtu.to_be_bytes();
        let header = [
            ICMP_DEST_UNREACHABLE,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            mtu_hi,
            mtu_lo,
        ];
        (icmp as *mut [u8; ICMP_HDR_LEN]).write_unaligned(header);
        let check = checksum(icmp as *const [u8; 2], (ICMP_HDR_LEN + TOO_BIG_QUOTE) / 2);
        (icmp.add(ICMP_CHECK_OFFSET) as *mut u16).write_unaligned(check);
    }
    sent_too_big()
}

/// Counts a "too big" message sent, and the `too_big` drop of the packet it answers.
#[inline(always)]
fn sent_too_big() -> u32 {
    drop(DropReason::TooBig);
    counters::icmp(IcmpCounter::TooBigSent);
    XDP_TX
}

/// Makes the frame an ICMP message of `FRAME` bytes about itself: cut to an Ethernet header and
/// `quote` bytes of the packet, with room for an IP header of `ip_len` bytes and the ICMP header
/// in front of the quote. The Ethernet header's bytes are then stale, the caller's to write.
#[inline(always)]
fn make_room<const FRAME: usize>(
    ctx: &XdpContext,
    quote: usize,
    ip_len: usize,
) -> Option<*mut [u8; FRAME]> {
    let frame_len = ctx.data_end() - ctx.data();
    let cut = frame_len as i32 - (ETH_LEN + quote) as i32;
    let grow = (ip_len + ICMP_HDR_LEN) as i32;
    // SAFETY: plain helper calls; the frame is checked again after them.
    if cut < 0
        || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -cut) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0
    {
        return None;
    }
    ptr_at::<[u8; FRAME]>(ctx, 0)
}

/// ICMPv6's "packet too big" (RFC 4443).
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// How much of an IPv6 packet too big to encapsulate its "packet too big" quotes: the IPv6
/// header and what follows it, enough for a few extension headers and the ports.
const TOO_BIG_QUOTE6: usize = 128;
const TOO_BIG_FRAME6: usize = ETH_LEN + IPV6_LEN + ICMP_HDR_LEN + TOO_BIG_QUOTE6;

/// Answers an IPv6 packet that would exceed the MTU once encapsulated: "packet too big" with
/// MTU `mtu`, from the VIP to the client, back out where it came in; as `too_big` does for
/// IPv4. Its checksum covers the IPv6 pseudo-header.
#[inline(always)]
pub fn too_big6(ctx: &XdpContext, mtu: u32) -> u32 {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)) else {
        return drop(DropReason::TooBig);
    };
    // SAFETY: both pointers come from `ptr_at`, which checked them against data_end.
    let (client_mac, our_mac, client, vip) = unsafe {
        (
            (*eth).src_addr,
            (*eth).dst_addr,
            (&raw const (*ip).src_addr as *const [u32; 4]).read_unaligned(),
            (&raw const (*ip).dst_addr as *const [u32; 4]).read_unaligned(),
        )
    };
    let Some(frame) = make_room::<TOO_BIG_FRAME6>(ctx, TOO_BIG_QUOTE6, IPV6_LEN) else {
        return drop(DropReason::TooBig);
    };
    let icmp_len = (ICMP_HDR_LEN + TOO_BIG_QUOTE6) as u16;
    // The pseudo-header: both addresses, the ICMPv6 length and next header, as the packet
    // holds them.
    let mut pseudo = u16::from_ne_bytes(icmp_len.to_be_bytes()) as u32
        + u16::from_ne_bytes([0, PROTO_ICMPV6]) as u32;
    let mut i = 0;
    while i < 4 {
        pseudo += (vip[i] & 0xffff) + (vip[i] >> 16) + (client[i] & 0xffff) + (client[i] >> 16);
        i += 1;
    }
    // SAFETY: `frame` was bounds-checked for the whole message just above; the original IPv6
    // header, now the quote, starts right after the ICMPv6 header.
    unsafe {
        let eth = frame as *mut EthHdr;
        write_mac(&raw mut (*eth).dst_addr, &client_mac);
        write_mac(&raw mut (*eth).src_addr, &our_mac);
        (*eth).ether_type = ETH_P_IPV6_BE;
        let ip = (frame as *mut u8).add(ETH_LEN) as *mut Ipv6Hdr;
        (*ip).vcf = [0x60, 0, 0, 0];
        (*ip).payload_len = icmp_len.to_be_bytes();
        (*ip).next_hdr = PROTO_ICMPV6;
        (*ip).hop_limit = ECHO_TTL;
        (&raw mut (*ip).src_addr as *mut [u32; 4]).write_unaligned(vip);
        (&raw mut (*ip).dst_addr as *mut [u32; 4]).write_unaligned(client);
        let icmp = (frame as *mut u8).add(ETH_LEN + IPV6_LEN);
        let [m0, m1, m2, m3] = mtu.to_be_bytes();
        let header = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, m0, m1, m2, m3];
        (icmp as *mut [u8; ICMP_HDR_LEN]).write_unaligned(header);
        let check = checksum_from(pseudo, icmp as *const [u8; 2], icmp_len as usize / 2);
        (icmp.add(ICMP_CHECK_OFFSET) as *mut u16).write_unaligned(check);
    }
    sent_too_big()
}

/// The packet an ICMP or ICMPv6 error quotes, and the checksums that cover it: an IPv4 quote's
/// own header checksum, its TCP or UDP checksum (if quoted), and the ICMP checksum over the
/// whole quote.
struct Quoted {
    icmp_check: *mut u16,
    ip: *mut u8,
    /// Source and destination port.
    ports: *mut u16,
    l4_check: Option<*mut u16>,
    udp: bool,
}

impl Quoted {
    /// The packet quoted by the ICMP error whose header is `icmp`: its IP header is `ip`, its
    /// TCP or UDP header (protocol `proto`) at `l4_off`. `None` if the quote ends before the
    /// first 8 bytes of that header (the ports, and UDP's checksum), which every error quotes.
    #[inline(always)]
    fn at(
        ctx: &XdpContext,
        icmp: *mut [u8; ICMP_HDR_LEN],
        ip: *mut u8,
        l4_off: usize,
        proto: u8,
    ) -> Option<Self> {
        let l4 = ptr_at::<[u16; 4]>(ctx, l4_off)? as *mut u16;
        // TCP's checksum, if the quote goes that far. Pointers derived from a checked pointer
        // by a constant, as the verifier can follow.
        let l4_check = if proto == PROTO_TCP {
            ptr_at::<[u16; TCP_CHECK_OFFSET / 2 + 1]>(ctx, l4_off)
                .map(|tcp| unsafe { (tcp as *mut u16).add(TCP_CHECK_OFFSET / 2) })
        } else {
            Some(unsafe { l4.add(UDP_CHECK_OFFSET / 2) })
        };
        Some(Quoted {
            icmp_check: unsafe { (icmp as *mut u16).add(ICMP_CHECK_OFFSET / 2) },
            ip,
            ports: l4,
            l4_check,
            udp: proto == PROTO_UDP,
        })
    }

    /// The quoted packet's source and destination port, as it holds them.
    #[inline(always)]
    fn ports(&self) -> [u16; 2] {
        // SAFETY: bounds-checked by `at`, and the frame has not been resized since.
        unsafe {
            [
                self.ports.read_unaligned(),
                self.ports.add(1).read_unaligned(),
            ]
        }
    }

    /// Replaces one address (`IP_SRC` or `IP_DST`) and one port (0 source, 1 destination) of
    /// the quoted IPv4 packet, and every checksum over them, incrementally.
    #[inline(always)]
    fn rewrite(&self, at: usize, addr: u32, port: usize, new_port: u16) {
        // SAFETY: the pointers were bounds-checked by `ptr_at` (the IPv4 header for 20 bytes),
        // and the frame has not been resized since.
        let (old_addr, icmp) = unsafe {
            let (old_addr, [old_ip_check, new_ip_check]) = set_address(self.ip, at, addr);
            let icmp = checksum_replace32(self.icmp_check.read_unaligned(), old_addr, addr);
            (old_addr, checksum_replace(icmp, old_ip_check, new_ip_check))
        };
        self.set_port(
            icmp,
            port,
            new_port,
            #[inline(always)]
            |l4| checksum_replace32(l4, old_addr, addr),
        );
    }

    /// Replaces one address (`IP6_SRC` or `IP6_DST`) and one port (0 source, 1 destination) of
    /// the quoted IPv6 packet, and every checksum over them, incrementally.
    #[inline(always)]
    fn rewrite6(&self, at: usize, addr: [u32; 4], port: usize, new_port: u16) {
        // SAFETY: the IPv6 header was bounds-checked by `ptr_at`, and the frame has not been
        // resized since.
        let (old, icmp) = unsafe {
            let old = set_address6(self.ip.add(at), addr);
            (
                old,
                checksum_replace128(self.icmp_check.read_unaligned(), old, addr),
            )
        };
        self.set_port(
            icmp,
            port,
            new_port,
            #[inline(always)]
            |l4| checksum_replace128(l4, old, addr),
        );
    }

    /// Replaces one port (0 source, 1 destination) of the quoted packet, and nothing else, and
    /// the checksums over it.
    #[inline(always)]
    fn change_port(&self, port: usize, new_port: u16) {
        // SAFETY: the ICMP header was bounds-checked by `ptr_at`, and the frame has not been
        // resized since.
        let icmp = unsafe { self.icmp_check.read_unaligned() };
        self.set_port(icmp, port, new_port, |l4| l4);
    }

    /// Replaces one port (0 source, 1 destination) of the quoted packet, and the checksums over
    /// it: its TCP or UDP checksum, also for what `more` changes (it takes the checksum and
    /// returns it updated), and the ICMP checksum, `icmp` so far.
    #[inline(always)]
    fn set_port(&self, mut icmp: u16, port: usize, new_port: u16, more: impl FnOnce(u16) -> u16) {
        // SAFETY: the pointers were bounds-checked by `ptr_at`, and the frame has not been
        // resized since.
        unsafe {
            let port_at = self.ports.add(port & 1);
            let old_port = port_at.read_unaligned();
            port_at.write_unaligned(new_port);
            icmp = checksum_replace(icmp, old_port, new_port);
            if let Some(l4_check) = self.l4_check {
                let old = l4_check.read_unaligned();
                // A UDP checksum of 0 is "none" and stays so.
                if !(self.udp && old == 0) {
                    let mut new = more(checksum_replace(old, old_port, new_port));
                    if self.udp && new == 0 {
                        new = 0xffff;
                    }
                    l4_check.write_unaligned(new);
                    icmp = checksum_replace(icmp, old, new);
                }
            }
            self.icmp_check.write_unaligned(icmp);
        }
    }
}
