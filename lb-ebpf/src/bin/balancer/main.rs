//! The balancer: one pass over each frame, all state in maps. The stages, in the order a packet
//! meets them, each a module:
//!
//! 1. `parse`: Ethernet → IPv4 → TCP/UDP.
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
    maps::Array,
    programs::XdpContext,
};
use lb_common::{
    DropReason, FLOW_FLAGS, FORWARDING_IPIP, FORWARDING_NAT, Group, LISTENER_RATE_LIMITED,
    ListenerKey, MAX_TARGETS, SETTINGS_KEY, Settings, Target,
};

use crate::{
    counters::drop,
    parse::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[map]
static TARGETS: Array<Target> = Array::with_max_entries(MAX_TARGETS, 0);

/// One entry per target group; index = group id.
#[map]
static GROUPS: Array<Group> = Array::with_max_entries(1, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    // One place asks whether an unforwardable packet was for a VIP: each inlined copy of the
    // listener table's probe loop costs hundreds of instructions.
    balance(&ctx).unwrap_or_else(|(dst, reason)| {
        if listener::is_vip(dst) {
            drop(reason)
        } else {
            XDP_PASS
        }
    })
}

/// The action for the frame, or the destination and reason of a packet that cannot be
/// forwarded: dropped if it was for a VIP, passed otherwise.
#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, (u32, DropReason)> {
    let Some(packet) = parse::parse(ctx)? else {
        let Some(settings) = SETTINGS.get(SETTINGS_KEY) else {
            return Ok(XDP_PASS);
        };
        if settings.answer_ping != 0
            && let Some(action) = icmp::echo(ctx)
        {
            return Ok(action);
        }
        return Ok(icmp::error(ctx, settings, clock())?.unwrap_or(XDP_PASS));
    };

    let listener_key = ListenerKey {
        addr: packet.dst,
        port: packet.dport,
        proto: packet.proto,
        pad: 0,
    };
    let Some(slot) = listener::find_key(&listener_key) else {
        if SETTINGS.get(SETTINGS_KEY).is_some_and(|s| s.nat != 0)
            && let Some(action) = nat::reply(ctx, &packet, clock())
        {
            return Ok(action);
        }
        return Err((packet.dst, DropReason::NoListener));
    };
    let listener = slot.listener;
    let Some(settings) = SETTINGS.get(SETTINGS_KEY) else {
        return Ok(XDP_PASS);
    };
    if !sources::admitted(packet.src, &listener, settings) {
        return Ok(drop(DropReason::DeniedSource));
    }
    let Some(group) = GROUPS.get(listener.group) else {
        return Ok(drop(DropReason::NoTarget));
    };

    let key = packet.key();
    let Some(table) = flows::FLOW_TABLE.get(0) else {
        return Ok(XDP_PASS);
    };
    let Some((entry, found, hash)) = flows::lookup(table, &key) else {
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
                && let Err(reason) = limits::admit(&listener, packet.src, now)
            {
                return Ok(counters::refused(listener.id, reason));
            }
            let Some(id) = pick::pick(&key, hash, &listener, group, settings, now) else {
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
    if group.forwarding == FORWARDING_NAT {
        if new_flow && packet.tcp_flags & TCP_RST == 0 {
            nat::remember_reverse(table, &packet, target, listener.id, now);
        } else if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            nat::client_closing(table, &packet, entry, target, listener.idle_timeout_s, now);
        }
        return Ok(nat::request(ctx, &packet, target));
    }
    if group.forwarding == FORWARDING_IPIP
        && let Some(action) = forward::too_big_to_encapsulate(ctx, &packet, target, settings)
    {
        return Ok(action);
    }
    if target.port != packet.dport
        && let Err(reason) = forward::rewrite(ctx, &packet, None, 1, target.port)
    {
        return Ok(drop(reason));
    }
    if group.forwarding == FORWARDING_IPIP {
        Ok(forward::encapsulate(ctx, packet.ip, target, settings))
    } else {
        Ok(forward::dsr(ctx, packet.eth, target, settings))
    }
}

/// Now, for the connection table. Idle timeouts count in seconds: the coarse clock (a tick's
/// resolution) is plenty and is cheaper than the precise one, notably in virtual machines. Its
/// low bits are left for the entries' flags.
#[inline(always)]
fn clock() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() & !FLOW_FLAGS }
}
