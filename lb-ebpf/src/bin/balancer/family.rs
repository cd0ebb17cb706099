//! The two IP families: what differs between an IPv4 and an IPv6 packet's way through the
//! balancer (its headers, its keys, the maps they index), so that every stage is written once
//! and compiled for each (`balance::<V4>`, `balance::<V6>`). IPv4's path is the one lb ran
//! before IPv6 came; IPv6's maps and program are its own, and cost it no time (and, with no
//! IPv6 listener, no memory: the controller sizes them to one entry).

use aya_ebpf::{bindings::bpf_fib_lookup, maps::Array, programs::XdpContext};
use lb_common::{
    ClientKey, ClientKey6, DropReason, FORWARDING_IPIP, FORWARDING_NAT, FlowBucket, FlowBucket6,
    FlowEntry, FlowKey, FlowKey6, FlowKeyOf, FlowTable, Group, Listener, ListenerKey, ListenerKey6,
    ListenerKeyOf, ListenerSlot, ListenerSlot6, ListenerTable, NAT_IPV4, NAT_IPV6, STAGE_ICMP4,
    STAGE_ICMP6, Settings, Sticky, Target,
};
use lb_ebpf::IPV6_LEN;
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    counters::drop,
    flows,
    forward::{self, IP_DST, IP_SRC},
    icmp, limits, listener, nat,
    parse::{self, Packet},
    pick, sources,
};

/// An IP family, as the balancer's stages need it.
pub trait Family: Sized + 'static {
    type Header;
    type Addr: Copy + PartialEq + Default;
    type Key: FlowKeyOf<Addr = Self::Addr>;
    type ListenerKey: ListenerKeyOf<Addr = Self::Addr>;
    type ClientKey;
    /// This family's entry of `FLOW_TABLE`, and its bit in `Settings::denied_sources`.
    const INDEX: u32;

    fn parse(ctx: &XdpContext) -> Result<Option<Packet<Self>>, (Self::Addr, DropReason)>;

    /// What becomes of a frame that holds no TCP or UDP packet of this family: ICMP answered
    /// or sent on (`icmp_stage`), or passed.
    fn other(ctx: &XdpContext) -> u32;

    /// The echo reply to the frame, if it is an echo request to a VIP (`icmp`).
    fn echo(ctx: &XdpContext) -> Option<u32>;

    /// The frame sent on if it is an ICMP error about a flow (`icmp`).
    fn icmp_error(
        ctx: &XdpContext,
        settings: &Settings,
    ) -> Result<Option<u32>, (Self::Addr, DropReason)>;

    /// What becomes of a packet for no listener, if it is a NAT target's reply.
    fn reply(ctx: &XdpContext, packet: &Packet<Self>, settings: &Settings) -> Option<u32>;

    /// A packet for a group that forwards with ipip or nat, rewritten and sent (`target`: the
    /// target with id `target_id`).
    #[allow(clippy::too_many_arguments)]
    fn translate_or_encapsulate(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        target_id: u32,
        target: &Target,
        group: &Group,
        listener: &Listener,
        settings: &Settings,
        table: &FlowTable,
        entry: *mut FlowEntry<Self::Key>,
        new_flow: bool,
        now: u64,
    ) -> u32;

    /// Port translation (dsr and ipip), if the target's port is not the listener's.
    fn translate_port(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        target: &Target,
    ) -> Result<(), DropReason>;

    /// The target's address in this family (nat keeps the family: the config sees to it).
    fn target_addr(target: &Target) -> Self::Addr;

    /// Replaces the address and the port of one side (0 source, 1 destination) of the packet,
    /// and every checksum over them (NAT).
    fn rewrite(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        side: usize,
        addr: Self::Addr,
        port: u16,
    ) -> Result<(), DropReason>;

    /// Fills in the routing question about the packet whose IP header is `ip` (bounds-checked):
    /// its family, addresses, protocol and length.
    fn route_question(ip: *mut Self::Header, fib: &mut bpf_fib_lookup);

    /// The listener with id `id`, as a NAT reply's reverse entry names it.
    fn listener_by_id(id: u32) -> Option<&'static ListenerSlot<Self::ListenerKey>>;

    fn listener_slots() -> &'static Array<ListenerSlot<Self::ListenerKey>>;
    /// The seed half `half` of the listener table was placed with.
    fn seed(table: &ListenerTable, half: u32) -> u32;
    fn flows() -> &'static Array<FlowBucket<Self::Key>>;
    /// Whether `src` is in listener `listener`'s allow-list (`denied`: in the deny-list).
    fn listed(denied: bool, listener: u32, src: Self::Addr) -> bool;
    /// The key of `src` as a client of `listener`: for stickiness whole, for rate limits (`per
    /// source`) as the source a limit counts.
    fn client(listener: u32, src: Self::Addr, per_source: bool) -> Self::ClientKey;
    fn source_bucket(client: &Self::ClientKey) -> Option<*mut u64>;
    fn new_source_bucket(client: &Self::ClientKey, bucket: u64);
    fn sticky(client: &Self::ClientKey) -> Option<*mut Sticky>;
    fn keep_sticky(client: &Self::ClientKey, kept: &Sticky);
}

pub struct V4;
pub struct V6;

/// Address families of the routing question (`bpf_fib_lookup`).
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

impl Family for V4 {
    type Header = Ipv4Hdr;
    type Addr = u32;
    type Key = FlowKey;
    type ListenerKey = ListenerKey;
    type ClientKey = ClientKey;
    const INDEX: u32 = 0;

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Result<Option<Packet<Self>>, (u32, DropReason)> {
        parse::parse4(ctx)
    }

    /// ICMP, in a program of its own (`lb_icmp4`).
    #[inline(always)]
    fn other(ctx: &XdpContext) -> u32 {
        crate::hand_on(ctx, STAGE_ICMP4)
    }

    #[inline(always)]
    fn echo(ctx: &XdpContext) -> Option<u32> {
        icmp::echo(ctx)
    }

    #[inline(always)]
    fn icmp_error(ctx: &XdpContext, settings: &Settings) -> Result<Option<u32>, (u32, DropReason)> {
        icmp::error(ctx, settings, crate::clock())
    }

    #[inline(always)]
    fn reply(ctx: &XdpContext, packet: &Packet<Self>, settings: &Settings) -> Option<u32> {
        if settings.nat & NAT_IPV4 == 0 {
            return None;
        }
        nat::reply(ctx, packet, crate::clock())
    }

    #[inline(always)]
    fn translate_or_encapsulate(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        _target_id: u32,
        target: &Target,
        group: &Group,
        listener: &Listener,
        settings: &Settings,
        table: &FlowTable,
        entry: *mut FlowEntry,
        new_flow: bool,
        now: u64,
    ) -> u32 {
        if group.forwarding == FORWARDING_NAT {
            return nat::request(
                ctx,
                packet,
                target,
                listener.id,
                listener.idle_timeout_s,
                table,
                entry,
                new_flow,
                now,
            );
        }
        if let Some(action) = forward::too_big_to_encapsulate(ctx, packet, target, settings) {
            return action;
        }
        if let Err(reason) = Self::translate_port(ctx, packet, target) {
            return drop(reason);
        }
        debug_assert!(group.forwarding == FORWARDING_IPIP);
        forward::encapsulate(ctx, packet.ip, target, settings)
    }

    #[inline(always)]
    fn translate_port(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        target: &Target,
    ) -> Result<(), DropReason> {
        forward::translate_port(ctx, packet, target)
    }

    #[inline(always)]
    fn target_addr(target: &Target) -> u32 {
        target.addr
    }

    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        side: usize,
        addr: u32,
        port: u16,
    ) -> Result<(), DropReason> {
        let at = if side == 0 { IP_SRC } else { IP_DST };
        forward::rewrite(ctx, packet, Some((at, addr)), side, port)
    }

    #[inline(always)]
    fn route_question(ip: *mut Ipv4Hdr, fib: &mut bpf_fib_lookup) {
        fib.family = AF_INET;
        // SAFETY: the caller bounds-checked the header.
        unsafe {
            fib.l4_protocol = (*ip).proto;
            fib.__bindgen_anon_1.tot_len = u16::from_be_bytes((*ip).tot_len);
            fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes((*ip).src_addr);
            fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes((*ip).dst_addr);
        }
    }

    #[inline(always)]
    fn listener_by_id(id: u32) -> Option<&'static ListenerSlot> {
        nat::LISTENERS_BY_ID.get(id)
    }

    #[inline(always)]
    fn listener_slots() -> &'static Array<ListenerSlot> {
        &listener::LISTENER_SLOTS
    }

    #[inline(always)]
    fn seed(table: &ListenerTable, half: u32) -> u32 {
        if half == 0 {
            table.seeds[0]
        } else {
            table.seeds[1]
        }
    }

    #[inline(always)]
    fn flows() -> &'static Array<FlowBucket> {
        &flows::FLOWS
    }

    #[inline(always)]
    fn listed(denied: bool, listener: u32, src: u32) -> bool {
        sources::listed4(denied, listener, src)
    }

    #[inline(always)]
    fn client(listener: u32, src: u32, _per_source: bool) -> ClientKey {
        ClientKey {
            listener,
            client: src,
        }
    }

    #[inline(always)]
    fn source_bucket(client: &ClientKey) -> Option<*mut u64> {
        limits::SOURCE_BUCKETS.get_ptr_mut(client)
    }

    #[inline(always)]
    fn new_source_bucket(client: &ClientKey, bucket: u64) {
        // A full table evicts its least recently seen source; an error leaves this one
        // untracked.
        let _ = limits::SOURCE_BUCKETS.insert(client, &bucket, 0);
    }

    #[inline(always)]
    fn sticky(client: &ClientKey) -> Option<*mut Sticky> {
        pick::STICKY.get_ptr_mut(client)
    }

    #[inline(always)]
    fn keep_sticky(client: &ClientKey, kept: &Sticky) {
        // A full table evicts its least recently used client; an error leaves the client
        // unkept.
        let _ = pick::STICKY.insert(client, kept, 0);
    }
}

impl Family for V6 {
    type Header = Ipv6Hdr;
    type Addr = [u32; 4];
    type Key = FlowKey6;
    type ListenerKey = ListenerKey6;
    type ClientKey = ClientKey6;
    const INDEX: u32 = 1;

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Result<Option<Packet<Self>>, ([u32; 4], DropReason)> {
        parse::parse6(ctx)
    }

    /// ICMPv6, in a program of its own (`lb_icmp6`; neighbour discovery among what it
    /// passes).
    #[inline(always)]
    fn other(ctx: &XdpContext) -> u32 {
        crate::hand_on(ctx, STAGE_ICMP6)
    }

    #[inline(always)]
    fn echo(ctx: &XdpContext) -> Option<u32> {
        icmp::echo6(ctx)
    }

    #[inline(always)]
    fn icmp_error(
        ctx: &XdpContext,
        settings: &Settings,
    ) -> Result<Option<u32>, ([u32; 4], DropReason)> {
        icmp::error6(ctx, settings)
    }

    /// In a program of its own (`lb_nat6`), if it is a reply: IPv6's keys leave this one no
    /// stack for it.
    #[inline(always)]
    fn reply(ctx: &XdpContext, _packet: &Packet<Self>, settings: &Settings) -> Option<u32> {
        if settings.nat & NAT_IPV6 != 0 {
            nat::hand_on6(ctx, lb_common::Handoff::reply());
        }
        None
    }

    /// nat (in `lb_nat6`, as replies are), or ipip as IPv6 in IPv6 (the config gives an IPv6
    /// listener's ipip group IPv6 targets only).
    #[inline(always)]
    fn translate_or_encapsulate(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        target_id: u32,
        target: &Target,
        group: &Group,
        listener: &Listener,
        settings: &Settings,
        _table: &FlowTable,
        _entry: *mut FlowEntry<FlowKey6>,
        new_flow: bool,
        _now: u64,
    ) -> u32 {
        if group.forwarding == FORWARDING_NAT {
            nat::hand_on6(
                ctx,
                lb_common::Handoff::request(target_id, listener.id, new_flow),
            );
            return drop(DropReason::EncapFailed);
        }
        if let Some(action) = forward::too_big_to_encapsulate6(ctx, packet, target, settings) {
            return action;
        }
        if let Err(reason) = Self::translate_port(ctx, packet, target) {
            return drop(reason);
        }
        // SAFETY: the parse bounds-checked the header, and nothing resized the frame since.
        forward::encapsulate6(
            ctx,
            unsafe { forward::Outer6::of(packet.ip) },
            target,
            settings,
        )
    }

    #[inline(always)]
    fn translate_port(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        target: &Target,
    ) -> Result<(), DropReason> {
        forward::translate_port6(ctx, packet, target)
    }

    #[inline(always)]
    fn target_addr(target: &Target) -> [u32; 4] {
        target.addr6
    }

    #[inline(always)]
    fn rewrite(
        ctx: &XdpContext,
        packet: &Packet<Self>,
        side: usize,
        addr: [u32; 4],
        port: u16,
    ) -> Result<(), DropReason> {
        forward::rewrite6(ctx, packet, side, addr, port)
    }

    #[inline(always)]
    fn route_question(ip: *mut Ipv6Hdr, fib: &mut bpf_fib_lookup) {
        fib.family = AF_INET6;
        // SAFETY: the caller bounds-checked the header.
        unsafe {
            fib.l4_protocol = (*ip).next_hdr;
            fib.__bindgen_anon_1.tot_len = IPV6_LEN as u16 + u16::from_be_bytes((*ip).payload_len);
            fib.__bindgen_anon_3.ipv6_src =
                (&raw const (*ip).src_addr as *const [u32; 4]).read_unaligned();
            fib.__bindgen_anon_4.ipv6_dst =
                (&raw const (*ip).dst_addr as *const [u32; 4]).read_unaligned();
        }
    }

    #[inline(always)]
    fn listener_by_id(id: u32) -> Option<&'static ListenerSlot6> {
        nat::LISTENERS_BY_ID6.get(id)
    }

    #[inline(always)]
    fn listener_slots() -> &'static Array<ListenerSlot6> {
        &listener::LISTENER_SLOTS6
    }

    #[inline(always)]
    fn seed(table: &ListenerTable, half: u32) -> u32 {
        if half == 0 {
            table.seeds6[0]
        } else {
            table.seeds6[1]
        }
    }

    #[inline(always)]
    fn flows() -> &'static Array<FlowBucket6> {
        &flows::FLOWS6
    }

    #[inline(always)]
    fn listed(denied: bool, listener: u32, src: [u32; 4]) -> bool {
        sources::listed6(denied, listener, src)
    }

    /// Per source, a /64: one host commonly holds a whole one.
    #[inline(always)]
    fn client(listener: u32, src: [u32; 4], per_source: bool) -> ClientKey6 {
        ClientKey6 {
            listener,
            client: if per_source {
                [src[0], src[1], 0, 0]
            } else {
                src
            },
        }
    }

    #[inline(always)]
    fn source_bucket(client: &ClientKey6) -> Option<*mut u64> {
        limits::SOURCE_BUCKETS6.get_ptr_mut(client)
    }

    #[inline(always)]
    fn new_source_bucket(client: &ClientKey6, bucket: u64) {
        let _ = limits::SOURCE_BUCKETS6.insert(client, &bucket, 0);
    }

    #[inline(always)]
    fn sticky(client: &ClientKey6) -> Option<*mut Sticky> {
        pick::STICKY6.get_ptr_mut(client)
    }

    #[inline(always)]
    fn keep_sticky(client: &ClientKey6, kept: &Sticky) {
        let _ = pick::STICKY6.insert(client, kept, 0);
    }
}
