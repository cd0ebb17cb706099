//! NAT forwarding: the balancer rewrites a request's destination to the target's address and
//! port (the client's address stays), and the targets, whose way back to the clients goes
//! through the balancer, have their replies rewritten to come from VIP:listener-port.
//!
//! Replies are recognised through the connection table only: each NAT flow has a reverse entry
//! keyed by the reply's 5-tuple (`FLOW_REVERSE`). A NAT flow ends like a conntrack entry: an RST,
//! or a FIN each way, leaves both entries only `LINGER_NS` more.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action::XDP_PASS},
    helpers::bpf_fib_lookup as fib_lookup,
    macros::map,
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    DropReason, FLOW_CLOSING, FLOW_ENDED, FLOW_FIN_CLIENT, FLOW_FIN_TARGET, FLOW_FLAGS,
    FLOW_REVERSE, FlowEntry, FlowKeyOf, FlowTable, HANDOFF_ICMP, HANDOFF_REPLY, Handoff,
    ListenerKeyOf, ListenerSlot, ListenerSlot6, MAX_LISTENERS, STAGE_NAT6, Target, flow_check,
};
use lb_ebpf::write_mac;
use network_types::eth::EthHdr;

use crate::{
    TARGETS,
    counters::drop,
    family::{Family, V6},
    flows, forward, icmp,
    parse::{self, Packet, TCP_FIN, TCP_RST},
};

/// Listeners by id: the VIP, port and idle timeout a reply's reverse entry points to; one map
/// per family.
#[map]
pub static LISTENERS_BY_ID: Array<ListenerSlot> = Array::with_max_entries(MAX_LISTENERS, 0);
#[map]
pub static LISTENERS_BY_ID6: Array<ListenerSlot6> = Array::with_max_entries(MAX_LISTENERS, 0);

/// The routing question and its answer (`towards`): 64 bytes that the stack, with IPv6's keys
/// on it, has no room for.
#[map]
static ROUTE: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// What `lb_balancer6` and `lb_icmp6` tell `lb_nat6` of the packet they hand on. Pinned: during
/// a takeover, one lb's `lb_balancer6` may hand on to its successor's `lb_nat6`.
#[map]
static HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

/// Hands an IPv6 packet on to `lb_nat6` with `handoff`; returns only if that failed.
#[inline(always)]
pub fn hand_on6(ctx: &XdpContext, handoff: Handoff) {
    if let Some(slot) = HANDOFF.get_ptr_mut(0) {
        // SAFETY: this CPU's own value.
        unsafe { *slot = handoff };
        crate::hand_on(ctx, STAGE_NAT6);
    }
}

/// `lb_nat6`: the IPv6 packet `lb_balancer6` handed on, parsed again, as its handoff says:
/// a NAT request sent to its target, a NAT reply sent to its client, an ICMPv6 error about a
/// NAT flow sent where it belongs (`icmp::nat_error6`); a packet for no listener that is no
/// reply dropped and counted if it was for a VIP, passed if not.
#[inline(always)]
pub fn stage6(ctx: &XdpContext, now: u64) -> u32 {
    let Some(handoff) = HANDOFF.get(0).copied() else {
        return XDP_PASS;
    };
    if handoff.target == HANDOFF_ICMP {
        return icmp::nat_error6(ctx, now);
    }
    let Ok(Some(packet)) = parse::parse6(ctx) else {
        return XDP_PASS;
    };
    if handoff.target == HANDOFF_REPLY {
        return reply::<V6>(ctx, &packet, now)
            .unwrap_or_else(|| crate::refuse::<V6>(packet.dst, DropReason::NoListener));
    }
    let (Some(target), Some(slot), Some(table)) = (
        TARGETS.get(handoff.target),
        LISTENERS_BY_ID6.get(handoff.listener),
        flows::FLOW_TABLE.get(V6::INDEX),
    ) else {
        return drop(DropReason::NoTarget);
    };
    let Some((entry, _, _)) = flows::lookup::<V6>(table, &packet.key()) else {
        return drop(DropReason::FlowTableFull);
    };
    request(
        ctx,
        &packet,
        target,
        handoff.listener,
        slot.listener.idle_timeout_s,
        table,
        entry,
        handoff.new_flow != 0,
        now,
    )
}

/// How long a NAT flow's entries stay after it ended, for the last ACK and retransmissions.
const LINGER_NS: u64 = 5_000_000_000;

/// A request of a NAT flow to `target`, whose flow-table entry is `entry`: to its address and
/// port, then routed like a reply, so that a target on another of the balancer's interfaces
/// (the internal network of a two-armed balancer) is reached as well as one on this. A new
/// flow's reverse entry is written first; a FIN or RST from the client marks the flow closing.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn request<F: Family>(
    ctx: &XdpContext,
    packet: &Packet<F>,
    target: &Target,
    listener: u32,
    idle_timeout_s: u32,
    table: &FlowTable,
    entry: *mut FlowEntry<F::Key>,
    new_flow: bool,
    now: u64,
) -> u32 {
    if new_flow && packet.tcp_flags & TCP_RST == 0 {
        let key = reply_key(packet, target);
        if let Some((reverse, _, hash)) = flows::lookup::<F>(table, &key) {
            flows::remember(reverse, &key, hash, FLOW_REVERSE | listener, now);
        }
    } else if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0
        && let Some((reverse, true, _)) = flows::lookup::<F>(table, &reply_key(packet, target))
    {
        closing(
            packet.tcp_flags,
            FLOW_FIN_CLIENT,
            FLOW_FIN_TARGET,
            entry,
            reverse,
            idle_timeout_s,
            now,
        );
    }
    if let Err(reason) = F::rewrite(ctx, packet, 1, F::target_addr(target), target.port) {
        return drop(reason);
    }
    towards::<F>(ctx, packet.eth, packet.ip)
}

/// The reply of a NAT flow, translated and sent towards its client; `None` if the packet is no
/// such reply (it then takes the path of any packet that is not for a VIP).
#[inline(always)]
pub fn reply<F: Family>(ctx: &XdpContext, packet: &Packet<F>, now: u64) -> Option<u32> {
    let table = flows::FLOW_TABLE.get(F::INDEX)?;
    let (entry, slot) = reverse_flow::<F>(table, &packet.key(), now)?;
    let (vip, port) = (slot.key.address(), slot.key.port());
    if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let forward_key = F::Key::new(packet.dst, vip, packet.dport, port, packet.proto);
        if let Some((forward, true, _)) = flows::lookup::<F>(table, &forward_key) {
            closing(
                packet.tcp_flags,
                FLOW_FIN_TARGET,
                FLOW_FIN_CLIENT,
                forward,
                entry,
                slot.listener.idle_timeout_s,
                now,
            );
        }
    }
    if let Err(reason) = F::rewrite(ctx, packet, 0, vip, port) {
        return Some(drop(reason));
    }
    Some(towards::<F>(ctx, packet.eth, packet.ip))
}

/// The live reverse entry of the replies with 5-tuple `key`, and the listener they answer for,
/// whose VIP and port they are to come from. A reply keeps its flow from going idle, and the
/// first makes the entry established.
#[allow(clippy::type_complexity)]
#[inline(always)]
pub fn reverse_flow<F: Family>(
    table: &FlowTable,
    key: &F::Key,
    now: u64,
) -> Option<(
    *mut FlowEntry<F::Key>,
    &'static ListenerSlot<F::ListenerKey>,
)> {
    let (entry, found, hash) = flows::lookup::<F>(table, key)?;
    if !found {
        return None;
    }
    let (value, check, last_seen) = flows::read(entry);
    if value & FLOW_REVERSE == 0 || check != flow_check(hash, value) {
        return None;
    }
    let slot = F::listener_by_id(value & !FLOW_REVERSE)?;
    let idle = now.wrapping_sub(last_seen & !FLOW_FLAGS);
    if idle > slot.listener.idle_timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    flows::refresh(entry, last_seen, idle, true, now);
    Some((entry, slot))
}

/// Sends a translated packet (Ethernet header `eth`, IP header `ip`) on its way: the kernel's
/// routing and neighbour tables give the interface and MACs (the controller resolves every
/// target's, so requests find theirs); without a neighbour entry yet, the kernel's stack
/// forwards it.
#[inline(always)]
pub fn towards<F: Family>(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut F::Header) -> u32 {
    let Some(fib) = ROUTE.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    // SAFETY: this CPU's own value, valid for the run; all-zero is a valid value of this
    // plain C struct.
    let fib = unsafe {
        fib.write_bytes(0, 1);
        &mut *fib
    };
    F::route_question(ip, fib);
    // SAFETY: the XDP context as the kernel passed it.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let found = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return XDP_PASS;
    }
    // SAFETY: the caller bounds-checked the Ethernet header, and the frame has not been
    // resized since.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &fib.dmac);
        write_mac(&raw mut (*eth).src_addr, &fib.smac);
    }
    forward::send(ctx, fib.ifindex)
}

/// The 5-tuple of the replies to `packet`'s flow once it goes to `target`.
#[inline(always)]
fn reply_key<F: Family>(packet: &Packet<F>, target: &Target) -> F::Key {
    F::Key::new(
        F::target_addr(target),
        packet.src,
        target.port,
        packet.sport,
        packet.proto,
    )
}

/// Records a FIN (`mine`) on the reverse entry, and ends the flow on an RST or once both sides
/// sent one: both entries then stay only `LINGER_NS`.
#[inline(always)]
fn closing<K>(
    flags: u8,
    mine: u64,
    theirs: u64,
    forward: *mut FlowEntry<K>,
    reverse: *mut FlowEntry<K>,
    idle_timeout_s: u32,
    now: u64,
) {
    // SAFETY: both point into buckets, map values valid for the duration of the run.
    unsafe {
        let seen = (&raw const (*reverse).last_seen_ns).read_volatile();
        if flags & TCP_RST == 0 && seen & theirs == 0 {
            (&raw mut (*reverse).last_seen_ns).write(seen | mine);
            return;
        }
        flows::end(forward);
        // Seen `idle_timeout - LINGER` ago: idle past the timeout `LINGER` from now.
        let idle = idle_timeout_s as u64 * 1_000_000_000;
        let aged = now.wrapping_sub(idle.saturating_sub(LINGER_NS)) & !FLOW_FLAGS;
        (&raw mut (*forward).last_seen_ns).write(aged | FLOW_CLOSING | FLOW_ENDED);
        (&raw mut (*reverse).last_seen_ns).write(aged | FLOW_CLOSING | (seen & FLOW_FLAGS) | mine);
    }
}
