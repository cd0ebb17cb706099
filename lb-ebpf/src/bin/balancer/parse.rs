//! Stage 1: the frame's headers, as far as balancing needs them.

use aya_ebpf::programs::XdpContext;
use lb_common::{DropReason, FlowKey, PROTO_TCP, PROTO_UDP};
use lb_ebpf::{ETH_LEN, ETH_P_IP_BE, IPV4_LEN, ptr_at};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// More-fragments flag and fragment offset, in the first byte pair of `frags` (network order).
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// A TCP or UDP packet over IPv4: where its headers are, and the fields balancing reads.
/// Addresses and ports in network byte order.
pub struct Packet {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Offset of the TCP or UDP header in the frame.
    pub l4_off: usize,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 0 for UDP.
    pub tcp_flags: u8,
    pub frame_len: usize,
}

impl Packet {
    /// The packet's 5-tuple as a connection-table key.
    #[inline(always)]
    pub fn key(&self) -> FlowKey {
        FlowKey::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }
}

/// The packet in the frame: `Ok(None)` for anything that is not TCP or UDP over IPv4 (it is not
/// lb's to judge), or the destination and reason of a packet too broken to forward.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Option<Packet>, (u32, DropReason)> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(None);
    };
    // SAFETY: every pointer below comes from `ptr_at`, which checked it against data_end.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Ok(None);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Ok(None);
    };
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
    // TCP needs its flags; UDP only its ports (the first four bytes of both headers).
    let tcp_flags = if proto == PROTO_TCP {
        let Some(flags) = ptr_at::<u8>(ctx, l4_off + TCP_FLAGS_OFFSET) else {
            return Err((dst, DropReason::Malformed));
        };
        unsafe { *flags }
    } else {
        0
    };
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, l4_off) else {
        return Err((dst, DropReason::Malformed));
    };
    let [sport, dport] = unsafe { *ports };
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
