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
    maps::Array,
    programs::XdpContext,
};
use lb_common::{
    FLOW_CLOSING, FLOW_ENDED, FLOW_FIN_CLIENT, FLOW_FIN_TARGET, FLOW_FLAGS, FLOW_REVERSE,
    FlowEntry, FlowKey, FlowTable, ListenerSlot, MAX_LISTENERS, Target, flow_check,
};
use lb_ebpf::write_mac;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    counters::drop,
    family::{Family, V4},
    flows,
    forward::{self, IP_DST, IP_SRC},
    parse::{Packet, TCP_FIN, TCP_RST},
};

/// Listeners by id: the VIP, port and idle timeout a reply's reverse entry points to.
#[map]
pub static LISTENERS_BY_ID: Array<ListenerSlot> = Array::with_max_entries(MAX_LISTENERS, 0);

/// How long a NAT flow's entries stay after it ended, for the last ACK and retransmissions.
const LINGER_NS: u64 = 5_000_000_000;
const AF_INET: u8 = 2;

/// A request of a NAT flow to `target`: to its address and port, then routed like a reply, so
/// that a target on another of the balancer's interfaces (the internal network of a two-armed
/// balancer) is reached as well as one on this.
#[inline(always)]
pub fn request(ctx: &XdpContext, packet: &Packet<V4>, target: &Target) -> u32 {
    if let Err(reason) = forward::rewrite(ctx, packet, Some((IP_DST, target.addr)), 1, target.port)
    {
        return drop(reason);
    }
    towards(ctx, packet.eth, packet.ip)
}

/// Writes the reverse entry of a new NAT flow: replies from `target` to the packet's client.
#[inline(always)]
pub fn remember_reverse(
    table: &FlowTable,
    packet: &Packet<V4>,
    target: &Target,
    listener: u32,
    now: u64,
) {
    let key = reply_key(packet, target);
    if let Some((entry, _, hash)) = flows::lookup::<V4>(table, &key) {
        flows::remember(entry, &key, hash, FLOW_REVERSE | listener, now);
    }
}

/// A FIN or an RST from the client of an established NAT flow: the flow ends on an RST, or on
/// this FIN if the target sent one already.
#[inline(always)]
pub fn client_closing(
    table: &FlowTable,
    packet: &Packet<V4>,
    forward: *mut FlowEntry,
    target: &Target,
    idle_timeout_s: u32,
    now: u64,
) {
    let reverse = match flows::lookup::<V4>(table, &reply_key(packet, target)) {
        Some((entry, true, _)) => entry,
        _ => return,
    };
    closing(
        packet.tcp_flags,
        FLOW_FIN_CLIENT,
        FLOW_FIN_TARGET,
        forward,
        reverse,
        idle_timeout_s,
        now,
    );
}

/// The reply of a NAT flow, translated and sent towards its client; `None` if the packet is no
/// such reply (it then takes the path of any packet that is not for a VIP).
#[inline(always)]
pub fn reply(ctx: &XdpContext, packet: &Packet<V4>, now: u64) -> Option<u32> {
    let table = flows::FLOW_TABLE.get(V4::INDEX)?;
    let (entry, slot) = reverse_flow(table, &packet.key(), now)?;
    if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let forward_key = FlowKey::new(
            packet.dst,
            slot.key.addr,
            packet.dport,
            slot.key.port,
            packet.proto,
        );
        if let Some((forward, true, _)) = flows::lookup::<V4>(table, &forward_key) {
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
    if let Err(reason) =
        forward::rewrite(ctx, packet, Some((IP_SRC, slot.key.addr)), 0, slot.key.port)
    {
        return Some(drop(reason));
    }
    Some(towards(ctx, packet.eth, packet.ip))
}

/// The live reverse entry of the replies with 5-tuple `key`, and the listener they answer for,
/// whose VIP and port they are to come from. A reply keeps its flow from going idle, and the
/// first makes the entry established.
#[inline(always)]
pub fn reverse_flow(
    table: &FlowTable,
    key: &FlowKey,
    now: u64,
) -> Option<(*mut FlowEntry, &'static ListenerSlot)> {
    let (entry, found, hash) = flows::lookup::<V4>(table, key)?;
    if !found {
        return None;
    }
    let (value, check, last_seen) = flows::read(entry);
    if value & FLOW_REVERSE == 0 || check != flow_check(hash, value) {
        return None;
    }
    let slot = LISTENERS_BY_ID.get(value & !FLOW_REVERSE)?;
    let idle = now.wrapping_sub(last_seen & !FLOW_FLAGS);
    if idle > slot.listener.idle_timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    flows::refresh(entry, last_seen, idle, true, now);
    Some((entry, slot))
}

/// Sends a translated packet (Ethernet header `eth`, IPv4 header `ip`) on its way: the kernel's
/// routing and neighbour tables give the interface and MACs (the controller resolves every
/// target's, so requests find theirs); without a neighbour entry yet, the kernel's stack
/// forwards it.
#[inline(always)]
pub fn towards(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr) -> u32 {
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    // SAFETY: the caller bounds-checked both headers, and the frame has not been resized since.
    unsafe {
        fib.l4_protocol = (*ip).proto;
        fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
    }
    // SAFETY: the XDP context as the kernel passed it.
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let found = unsafe {
        fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return XDP_PASS;
    }
    // SAFETY: as above.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &fib.dmac);
        write_mac(&raw mut (*eth).src_addr, &fib.smac);
    }
    forward::send(ctx, fib.ifindex)
}

/// The 5-tuple of the replies to `packet`'s flow once it goes to `target`.
#[inline(always)]
fn reply_key(packet: &Packet<V4>, target: &Target) -> FlowKey {
    FlowKey::new(
        target.addr,
        packet.src,
        target.port,
        packet.sport,
        packet.proto,
    )
}

/// Records a FIN (`mine`) on the reverse entry, and ends the flow on an RST or once both sides
/// sent one: both entries then stay only `LINGER_NS`.
#[inline(always)]
fn closing(
    flags: u8,
    mine: u64,
    theirs: u64,
    forward: *mut FlowEntry,
    reverse: *mut FlowEntry,
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
