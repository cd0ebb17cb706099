//! Stage 1: the frame's headers, as far as balancing needs them: Ethernet, then IPv4 or IPv6
//! (its extension headers skipped, up to a bound), then TCP or UDP.

use aya_ebpf::programs::XdpContext;
use lb_common::{DropReason, FlowKeyOf, PROTO_TCP, PROTO_UDP};
use lb_ebpf::{ETH_LEN, IPV4_LEN, IPV6_LEN, ptr_at};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::family::{Family, V4, V6};

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// More-fragments flag and fragment offset, in the first byte pair of `frags` (network order).
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// IPv6 extension headers that lb skips to reach the TCP or UDP header: hop-by-hop options,
/// routing, destination options. A fragment header ends the search: a fragment.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DESTINATION: u8 = 60;
/// How many extension headers lb skips at most; a packet with more is dropped and counted
/// (`extension_headers`). Real traffic carries one or two, if any.
pub const MAX_EXTENSION_HEADERS: usize = 4;

/// A TCP or UDP packet: where its headers are, and the fields balancing reads. Addresses and
/// ports in network byte order.
pub struct Packet<F: Family> {
    pub eth: *mut EthHdr,
    pub ip: *mut F::Header,
    /// Offset of the TCP or UDP header in the frame.
    pub l4_off: usize,
    pub src: F::Addr,
    pub dst: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 0 for UDP.
    pub tcp_flags: u8,
    pub frame_len: usize,
}

impl<F: Family> Packet<F> {
    /// The packet's 5-tuple as a connection-table key.
    #[inline(always)]
    pub fn key(&self) -> F::Key {
        F::Key::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }
}

/// The TCP or UDP packet over IPv4 in the frame: `Ok(None)` for anything that is not TCP or UDP
/// (it is not lb's to judge), or the destination and reason of a packet too broken to forward.
#[inline(always)]
pub fn parse4(ctx: &XdpContext) -> Result<Option<Packet<V4>>, (u32, DropReason)> {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)) else {
        return Ok(None);
    };
    // SAFETY: every pointer below comes from `ptr_at`, which checked it against data_end.
    // Only the fields used: copying the whole header costs a byte load and a stack store each.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let dst = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let frame_len = ctx.data_end() - ctx.data();

    let ihl = ((vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let l4_len = if proto == PROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    if vihl >> 4 != 4 || ihl < IPV4_LEN || tot_len < ihl + l4_len || ETH_LEN + tot_len > frame_len {
        return Err((dst, DropReason::Malformed));
    }
    if u16::from_be_bytes(unsafe { (*ip).frags }) & IP_MF_OFFSET_MASK != 0 {
        return Err((dst, DropReason::Fragment));
    }
    // `ihl` is at most 60: the mask tells the verifier so.
    let l4_off = ETH_LEN + (ihl & 0x3c);
    let (sport, dport, tcp_flags) =
        ports(ctx, l4_off, proto).ok_or((dst, DropReason::Malformed))?;
    Ok(Some(Packet {
        eth,
        ip,
        l4_off,
        src: u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        dst,
        sport,
        dport,
        proto,
        tcp_flags,
        frame_len,
    }))
}

/// The TCP or UDP packet over IPv6 in the frame, past up to `MAX_EXTENSION_HEADERS` extension
/// headers: as `parse4`. A fragment is dropped as IPv4's are; more extension headers than lb
/// skips, as `extension_headers`.
#[inline(always)]
pub fn parse6(ctx: &XdpContext) -> Result<Option<Packet<V6>>, ([u32; 4], DropReason)> {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv6Hdr>(ctx, ETH_LEN)) else {
        return Ok(None);
    };
    // SAFETY: every pointer below comes from `ptr_at`, which checked it against data_end.
    let (version, payload_len, mut next, src, dst) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len) as usize,
            (*ip).next_hdr,
            (&raw const (*ip).src_addr as *const [u32; 4]).read_unaligned(),
            (&raw const (*ip).dst_addr as *const [u32; 4]).read_unaligned(),
        )
    };
    let frame_len = ctx.data_end() - ctx.data();
    if version != 6 || ETH_LEN + IPV6_LEN + payload_len > frame_len {
        return Err((dst, DropReason::Malformed));
    }
    let l4_off;
    (l4_off, next) = skip_extensions(ctx, next).map_err(|reason| (dst, reason))?;
    if next != PROTO_TCP && next != PROTO_UDP {
        return Ok(None);
    }
    let l4_len = if next == PROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    // The headers checked against the frame's end first (in `ports`), then against the length
    // the packet declares.
    let (sport, dport, tcp_flags) = ports(ctx, l4_off, next).ok_or((dst, DropReason::Malformed))?;
    if l4_off + l4_len > ETH_LEN + IPV6_LEN + payload_len {
        return Err((dst, DropReason::Malformed));
    }
    Ok(Some(Packet {
        eth,
        ip,
        l4_off,
        src,
        dst,
        sport,
        dport,
        proto: next,
        tcp_flags,
        frame_len,
    }))
}

/// Where the IPv6 packet's upper-layer header starts, and its protocol, past up to
/// `MAX_EXTENSION_HEADERS` extension headers; `next`: the IPv6 header's next header.
#[inline(always)]
fn skip_extensions(ctx: &XdpContext, mut next: u8) -> Result<(usize, u8), DropReason> {
    let mut l4_off = ETH_LEN + IPV6_LEN;
    let mut skipped = 0;
    while skipped < MAX_EXTENSION_HEADERS
        && (next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DESTINATION)
    {
        // Each is its next header, its length in 8-byte units past the first 8, then (a
        // routing header) its type and segments left, then options or addresses.
        let ext = ptr_at::<[u8; 4]>(ctx, l4_off).ok_or(DropReason::Malformed)?;
        // SAFETY: `ptr_at` checked it against data_end.
        let [following, len, _, segments_left] = unsafe { *ext };
        // Segments left: the VIP is only a waypoint, the packet for someone else.
        if next == IPV6_ROUTING && segments_left != 0 {
            return Err(DropReason::ExtensionHeaders);
        }
        next = following;
        // At most 4 × 2048 bytes: the mask tells the verifier the offset stays bounded.
        l4_off = (l4_off + (len as usize + 1) * 8) & 0x3fff;
        skipped += 1;
    }
    if next == IPV6_FRAGMENT {
        return Err(DropReason::Fragment);
    }
    if next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DESTINATION {
        return Err(DropReason::ExtensionHeaders);
    }
    Ok((l4_off, next))
}

/// The offset of a parsed IPv6 packet's TCP or UDP header, found again. `Packet::l4_off` of an
/// IPv6 packet stays unread past the parse: its value ranges, one per extension-header count,
/// would make the verifier walk every later stage once for each. Found again here, they split
/// only what follows, the rewrite.
#[inline(always)]
pub fn l4_offset6(packet: &Packet<V6>, ctx: &XdpContext) -> Result<usize, DropReason> {
    // SAFETY: the parse bounds-checked the header, and nothing resized the frame since.
    let next = unsafe { (*packet.ip).next_hdr };
    Ok(skip_extensions(ctx, next)?.0)
}

/// The source and destination port of the TCP or UDP header at `l4_off`, and TCP's flags (0
/// for UDP); `None` if the frame ends before them. Each read through the one pointer checked:
/// past a variable offset, the verifier does not carry a check over to a pointer computed anew.
#[inline(always)]
fn ports(ctx: &XdpContext, l4_off: usize, proto: u8) -> Option<(u16, u16, u8)> {
    // TCP needs its flags; UDP only its ports (the first four bytes of both headers).
    // SAFETY: `ptr_at` checked each header start against data_end.
    unsafe {
        if proto == PROTO_TCP {
            let tcp = ptr_at::<[u8; TCP_FLAGS_OFFSET + 1]>(ctx, l4_off)?;
            let [sport, dport] = (tcp as *const [u16; 2]).read_unaligned();
            Some((sport, dport, (*tcp)[TCP_FLAGS_OFFSET]))
        } else {
            let [sport, dport] = *ptr_at::<[u16; 2]>(ctx, l4_off)?;
            Some((sport, dport, 0))
        }
    }
}
