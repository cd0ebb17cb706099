//! The balancer: one pass over each frame, all state in maps. The stages, in the order a packet
//! meets them, each a module:
//!
//! 1. `parse`: Ethernet → IPv4 or IPv6 → TCP/UDP. Each family has its own maps and its own
//!    copy of the pass (`family`), so IPv4's path pays nothing for IPv6.
//! 2. `listener`: the listener for (VIP, port, protocol), from the listener table; `sources`:
//!    whether the packet's source may reach it.
//! 3. `flows`: the connection table, which remembers each flow's target... `limits`: ...or,
//!    for a new flow, whether its listener's rate limits let it through...
//! 4. `pick`: ...or a pick for a new flow, by the group's algorithm (or the client's sticky
//!    target).
//! 5. `forward`: port translation, then direct server return (DSR: MAC rewrite; IPIP: outer
//!    header), `XDP_TX`; or `nat`: the destination rewritten to the target's.
//! 6. `counters`: per-CPU counters of what was forwarded and dropped.
//!
//! A packet for no listener may be a NAT target's reply: `nat` looks for its flow. `icmp` sends
//! an ICMP error about a flow where it belongs (a "fragmentation needed" about a reply goes to
//! the target that sent it), answers echo requests to a VIP, and tells a client whose packet
//! is too big to encapsulate.
//!
//! Anything not addressed to a VIP leaves untouched with `XDP_PASS`. Packets for a VIP that cannot
//! be forwarded are dropped and counted by reason; nothing is logged per packet.
#![no_std]
#![no_main]
// Atomic add on a map value (round robin's shared counter): the BPF target has no AtomicU64.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod counters;
mod family;
mod flows;
mod forward;
mod icmp;
mod limits;
mod listener;
mod nat;
mod parse;
mod pick;
mod sources;

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::bpf_ktime_get_coarse_ns,
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    DropReason, FLOW_FLAGS, FORWARDING_DSR, Group, LISTENER_RATE_LIMITED, ListenerKeyOf,
    MAX_TARGETS, SETTINGS_KEY, STAGE_COUNT, STAGE_IPV6, Settings, Target,
};
use lb_ebpf::{ETH_P_IP_BE, ETH_P_IPV6_BE, ptr_at};
use network_types::eth::EthHdr;

use crate::{
    counters::drop,
    family::{Family, V4, V6},
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[map]
static TARGETS: Array<Target> = Array::with_max_entries(MAX_TARGETS, 0);

/// One entry per target group; index = group id.
#[map]
static GROUPS: Array<Group> = Array::with_max_entries(1, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The programs the balancer hands a frame on to (`bpf_tail_call`; lb_common::STAGE_*): each
/// is verified on its own, within a budget of its own. TCP and UDP over IPv4, the balancer's
/// own path, spend nearly all of one.
#[map]
static STAGES: ProgramArray = ProgramArray::with_max_entries(STAGE_COUNT, 0);

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    match ptr_at::<EthHdr>(&ctx, 0).map(|eth| unsafe { (*eth).ether_type }) {
        Some(ETH_P_IP_BE) => balance_or_refuse::<V4>(&ctx),
        Some(ETH_P_IPV6_BE) if SETTINGS.get(SETTINGS_KEY).is_some_and(|s| s.ipv6 != 0) => {
            hand_on(&ctx, STAGE_IPV6)
        }
        _ => XDP_PASS,
    }
}

/// IPv6, every packet of it.
#[xdp]
pub fn lb_balancer6(ctx: XdpContext) -> u32 {
    balance_or_refuse::<V6>(&ctx)
}

/// IPv4 that is neither TCP nor UDP: ICMP.
#[xdp]
pub fn lb_icmp4(ctx: XdpContext) -> u32 {
    icmp_stage::<V4>(&ctx)
}

/// IPv6 that is neither TCP nor UDP: ICMPv6.
#[xdp]
pub fn lb_icmp6(ctx: XdpContext) -> u32 {
    icmp_stage::<V6>(&ctx)
}

/// IPv6's NAT requests and replies, as `lb_balancer6` hands them on (`nat::stage6`).
#[xdp]
pub fn lb_nat6(ctx: XdpContext) -> u32 {
    nat::stage6(&ctx, clock())
}

/// ICMP of family `F` (`icmp`): echo requests to a VIP answered, errors about flows sent
/// where they belong; one to a VIP that names no flow lb can place dropped and counted; the
/// rest passed.
#[inline(always)]
fn icmp_stage<F: Family>(ctx: &XdpContext) -> u32 {
    let Some(settings) = SETTINGS.get(SETTINGS_KEY) else {
        return XDP_PASS;
    };
    if settings.answer_ping != 0
        && let Some(action) = F::echo(ctx)
    {
        return action;
    }
    match F::icmp_error(ctx, settings) {
        Ok(action) => action.unwrap_or(XDP_PASS),
        Err((dst, reason)) => refuse::<F>(dst, reason),
    }
}

/// Hands the frame on to stage `stage`; if it is not there (not loaded yet), passes it.
#[inline(always)]
pub fn hand_on(ctx: &XdpContext, stage: u32) -> u32 {
    // SAFETY: a tail call returns only if it failed.
    unsafe { STAGES.tail_call(ctx, stage) };
    XDP_PASS
}

/// The action for a TCP or UDP frame of family `F`. One place asks whether an unforwardable
/// packet was for a VIP: each inlined copy of the listener table's probe loop costs hundreds
/// of instructions.
#[inline(always)]
fn balance_or_refuse<F: Family>(ctx: &XdpContext) -> u32 {
    balance::<F>(ctx).unwrap_or_else(|(dst, reason)| refuse::<F>(dst, reason))
}

/// A packet to `dst` that cannot be forwarded for `reason`: dropped and counted if `dst` is a
/// VIP, passed otherwise.
#[inline(always)]
pub fn refuse<F: Family>(dst: F::Addr, reason: DropReason) -> u32 {
    if listener::is_vip::<F>(dst) {
        drop(reason)
    } else {
        XDP_PASS
    }
}

/// The action for the frame, or the destination and reason of a packet that cannot be
/// forwarded: dropped if it was for a VIP, passed otherwise.
#[inline(always)]
fn balance<F: Family>(ctx: &XdpContext) -> Result<u32, (F::Addr, DropReason)> {
    let Some(packet) = F::parse(ctx)? else {
        return Ok(F::other(ctx));
    };

    let listener_key = F::ListenerKey::new(packet.dst, packet.dport, packet.proto);
    let Some(slot) = listener::find_key::<F>(&listener_key) else {
        if let Some(settings) = SETTINGS.get(SETTINGS_KEY)
            && let Some(action) = F::reply(ctx, &packet, settings)
        {
            return Ok(action);
        }
        return Err((packet.dst, DropReason::NoListener));
    };
    let listener = slot.listener;
    let Some(settings) = SETTINGS.get(SETTINGS_KEY) else {
        return Ok(XDP_PASS);
    };
    if !sources::admitted::<F>(packet.src, &listener, settings) {
        return Ok(drop(DropReason::DeniedSource));
    }
    let Some(group) = GROUPS.get(listener.group) else {
        return Ok(drop(DropReason::NoTarget));
    };

    let key = packet.key();
    let Some(table) = flows::FLOW_TABLE.get(F::INDEX) else {
        return Ok(XDP_PASS);
    };
    let Some((entry, found, hash)) = flows::lookup::<F>(table, &key) else {
        return Ok(drop(DropReason::FlowTableFull));
    };
    let now = clock();
    let is_syn = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut new_flow = false;
    let existing = if found {
        flows::existing_target(entry, hash, &listener, !is_syn, now)
            .filter(|&id| !is_syn || flows::retransmitted_syn(entry, id))
    } else {
        None
    };
    let target_id = match existing {
        Some(id) => {
            if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                flows::end(entry);
            }
            id
        }
        None => {
            if listener.flags & LISTENER_RATE_LIMITED != 0
                && let Err(reason) = limits::admit::<F>(&listener, packet.src, now)
            {
                return Ok(counters::refused(listener.id, reason));
            }
            let Some(id) = pick::pick::<F>(&key, hash, &listener, group, settings, now) else {
                return Ok(drop(DropReason::NoTarget));
            };
            new_flow = true;
            // A stray RST must not create state for a flow that does not exist.
            if packet.tcp_flags & TCP_RST == 0 {
                flows::remember(entry, &key, hash, id, now);
            }
            id
        }
    };
    let Some(target) = TARGETS.get(target_id) else {
        return Ok(drop(DropReason::NoTarget));
    };

    counters::forwarded(listener.id, target_id, packet.frame_len, new_flow);
    if group.forwarding != FORWARDING_DSR {
        return Ok(F::translate_or_encapsulate(
            ctx, &packet, target_id, target, group, &listener, settings, table, entry, new_flow,
            now,
        ));
    }
    if let Err(reason) = F::translate_port(ctx, &packet, target) {
        return Ok(drop(reason));
    }
    Ok(forward::dsr(ctx, packet.eth, target, settings))
}

/// Now, for the connection table. Idle timeouts count in seconds: the coarse clock (a tick's
/// resolution) is plenty and is cheaper than the precise one, notably in virtual machines. Its
/// low bits are left for the entries' flags.
#[inline(always)]
fn clock() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() & !FLOW_FLAGS }
}
