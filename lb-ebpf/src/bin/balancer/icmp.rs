//! ICMP errors about NAT flows (destination unreachable, fragmentation needed, time exceeded),
//! translated in both headers like the flow itself, so that they reach the host that sent the
//! packet they quote: path MTU discovery and "port unreachable" work through NAT.
//!
//! - From the target's side, about a request (quoting client → target:port): to the client, as
//!   if from VIP:listener-port (the outer source and the quoted destination).
//! - From the client's side, about a reply (quoting VIP:listener-port → client, sent to the VIP):
//!   to the target (the outer destination and the quoted source).
//!
//! Which flow an error is about comes from the connection table, as for the replies; an error
//! about no NAT flow is left to the kernel.
//!
//! And echo requests to a VIP, answered here: `ping VIP` works as it does for an NLB's
//! addresses, though no host holds the VIP.

use aya_ebpf::{bindings::xdp_action::XDP_TX, programs::XdpContext};
use lb_common::{FORWARDING_NAT, FlowKey, ListenerKey, PROTO_TCP, PROTO_UDP};
use lb_ebpf::{
    ETH_LEN, ETH_P_IP_BE, IPV4_LEN, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, checksum_replace,
    checksum_replace32, ptr_at,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    GROUPS, TARGETS, counters, flows,
    forward::{IP_DST, IP_SRC, set_address},
    listener, nat,
    parse::IP_MF_OFFSET_MASK,
};

const PROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
/// The TTL of an echo reply, as Linux sends its own.
const ECHO_TTL: u8 = 64;
const ICMP_TIME_EXCEEDED: u8 = 11;
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
    if unsafe { (*icmp)[0] != ICMP_ECHO_REQUEST || (*icmp)[1] != 0 } || !listener::is_vip(dst) {
        return None;
    }
    // SAFETY: as above; the frame keeps its size.
    unsafe {
        let kind = icmp as *mut u16;
        let check = (icmp as *mut u16).add(ICMP_CHECK_OFFSET / 2);
        let old_kind = kind.read_unaligned();
        let new_kind = u16::from_ne_bytes([ICMP_ECHO_REPLY, 0]);
        kind.write_unaligned(new_kind);
        check.write_unaligned(checksum_replace(check.read_unaligned(), old_kind, new_kind));
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
        let client = (*eth).src_addr;
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = client;
    }
    counters::echo_answered();
    Some(XDP_TX)
}

/// The frame translated and sent on if it is an ICMP error about a NAT flow; `None` if not.
#[inline(always)]
pub fn nat_error(ctx: &XdpContext, now: u64) -> Option<u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)?;
    // SAFETY: every pointer here comes from `ptr_at`, which checked it against data_end.
    let (ether_type, vihl, proto, frags) =
        unsafe { ((*eth).ether_type, (*ip).vihl, (*ip).proto, (*ip).frags) };
    if ether_type != ETH_P_IP_BE
        || proto != PROTO_ICMP
        || vihl >> 4 != 4
        || u16::from_be_bytes(frags) & IP_MF_OFFSET_MASK != 0
    {
        return None;
    }
    let icmp_off = ETH_LEN + ((vihl & 0x0f) as usize * 4 & 0x3c);
    let icmp = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, icmp_off)?;
    let kind = unsafe { (*icmp)[0] };
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    // The quoted packet: its IPv4 header and the first 8 bytes of its TCP or UDP header.
    let inner_off = icmp_off + ICMP_HDR_LEN;
    let inner = ptr_at::<Ipv4Hdr>(ctx, inner_off)?;
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
    let l4_off = inner_off + (inner_ihl & 0x3c);
    // Every error quotes at least 8 bytes past the IPv4 header: the ports, and UDP's checksum.
    let l4 = ptr_at::<[u16; 4]>(ctx, l4_off)? as *mut u16;
    let (src, dst, sport, dport) = unsafe {
        (
            u32::from_ne_bytes((*inner).src_addr),
            u32::from_ne_bytes((*inner).dst_addr),
            l4.read_unaligned(),
            l4.add(1).read_unaligned(),
        )
    };
    // TCP's checksum, if the quote goes that far. Pointers derived from a checked pointer by a
    // constant, as the verifier can follow.
    let l4_check = if inner_proto == PROTO_TCP {
        ptr_at::<[u16; TCP_CHECK_OFFSET / 2 + 1]>(ctx, l4_off)
            .map(|tcp| unsafe { (tcp as *mut u16).add(TCP_CHECK_OFFSET / 2) })
    } else {
        Some(unsafe { l4.add(UDP_CHECK_OFFSET / 2) })
    };
    let quoted = Quoted {
        icmp_check: unsafe { (icmp as *mut u16).add(ICMP_CHECK_OFFSET / 2) },
        ip: inner as *mut u8,
        ports: l4,
        l4_check,
        udp: inner_proto == PROTO_UDP,
    };
    let table = flows::FLOW_TABLE.get(0)?;
    // The quote reversed: the flow's forward entry if it quotes a reply, its reverse entry if
    // it quotes a request.
    let key = FlowKey::new(dst, src, dport, sport, inner_proto);

    // About a reply, which left from VIP:listener-port: back to the target that sent it.
    let listener_key = ListenerKey {
        addr: src,
        port: sport,
        proto: inner_proto,
        pad: 0,
    };
    if let Some(slot) = listener::find_key(&listener_key) {
        let listener = &slot.listener;
        if GROUPS.get(listener.group)?.forwarding != FORWARDING_NAT {
            return None;
        }
        let (entry, found, hash) = flows::lookup(table, &key)?;
        if !found {
            return None;
        }
        let target = TARGETS.get(flows::existing_target(entry, hash, listener, false, now)?)?;
        quoted.rewrite(IP_SRC, target.addr, 0, target.port);
        set_address(ip as *mut u8, IP_DST, target.addr);
        return Some(nat::towards(ctx, eth, ip));
    }

    // About a request, which went to target:port: to the client, from VIP:listener-port.
    let (_, slot) = nat::reverse_flow(table, &key, now)?;
    quoted.rewrite(IP_DST, slot.key.addr, 1, slot.key.port);
    // The outer source too: no pseudo-header covers it in ICMP.
    set_address(ip as *mut u8, IP_SRC, slot.key.addr);
    Some(nat::towards(ctx, eth, ip))
}

/// The packet an ICMP error quotes, and the checksums that cover it: its own IPv4 header's, its
/// TCP or UDP checksum (if quoted), and the ICMP checksum over the whole quote.
struct Quoted {
    icmp_check: *mut u16,
    ip: *mut u8,
    /// Source and destination port.
    ports: *mut u16,
    l4_check: Option<*mut u16>,
    udp: bool,
}

impl Quoted {
    /// Replaces one address (`IP_SRC` or `IP_DST`) and one port (0 source, 1 destination) of
    /// the quoted packet, and every checksum over them, incrementally.
    #[inline(always)]
    fn rewrite(&self, at: usize, addr: u32, port: usize, new_port: u16) {
        // SAFETY: the pointers were bounds-checked by `ptr_at` (the IPv4 header for 20 bytes),
        // and the frame has not been resized since.
        unsafe {
            let (old_addr, [old_ip_check, new_ip_check]) = set_address(self.ip, at, addr);
            let port_at = self.ports.add(port & 1);
            let old_port = port_at.read_unaligned();
            port_at.write_unaligned(new_port);
            let mut icmp = checksum_replace32(self.icmp_check.read_unaligned(), old_addr, addr);
            icmp = checksum_replace(icmp, old_ip_check, new_ip_check);
            icmp = checksum_replace(icmp, old_port, new_port);
            if let Some(l4_check) = self.l4_check {
                let old = l4_check.read_unaligned();
                // A UDP checksum of 0 is "none" and stays so.
                if !(self.udp && old == 0) {
                    let mut new = checksum_replace32(old, old_addr, addr);
                    new = checksum_replace(new, old_port, new_port);
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
