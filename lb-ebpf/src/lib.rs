//! Pieces shared by lb's programs: bounds-checked header access and checksums.
#![no_std]

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IPV4_LEN: usize = Ipv4Hdr::LEN;
pub const IPV6_LEN: usize = Ipv6Hdr::LEN;
/// EtherType of IPv4, as it reads from the wire into a native `u16`.
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// EtherType of IPv6, alike.
pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// IP protocol number of IP-in-IP (IPv4 inside), and of IPv6 inside (IPv6-in-IPv6).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
/// Where the checksum sits in a TCP and in a UDP header.
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;

/// A pointer to a `T` at `offset` in the frame, or `None` if the frame is too short.
///
/// The explicit comparison against `data_end` is what the verifier needs to see before any access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Writes the MAC `mac` at `dst` (a bounds-checked frame pointer).
///
/// Assigning a `[u8; 6]` makes LLVM call its byte-by-byte `memcpy` subprogram; three 16-bit
/// stores are what a MAC copy should cost.
#[inline(always)]
pub fn write_mac(dst: *mut [u8; 6], mac: &[u8; 6]) {
    let words = [
        u16::from_ne_bytes([mac[0], mac[1]]),
        u16::from_ne_bytes([mac[2], mac[3]]),
        u16::from_ne_bytes([mac[4], mac[5]]),
    ];
    let dst = dst as *mut u16;
    // SAFETY: the caller passes a pointer bounds-checked for 6 bytes; unaligned writes are fine.
    unsafe {
        dst.write_unaligned(words[0]);
        dst.add(1).write_unaligned(words[1]);
        dst.add(2).write_unaligned(words[2]);
    }
}

/// Fills in the checksum of the 20-byte IPv4 header `ip` (which must have no options).
#[inline(always)]
pub fn set_ipv4_checksum(ip: *mut Ipv4Hdr) {
    // SAFETY: the caller passes a pointer that has been bounds-checked for IPV4_LEN bytes.
    unsafe {
        (*ip).check = [0, 0];
        (*ip).check = checksum(ip as *const [u8; 2], IPV4_LEN / 2).to_ne_bytes();
    }
}

/// The Internet checksum of the `words` 16-bit words at `data` (a frame pointer bounds-checked
/// for them), as it is written into the packet.
#[inline(always)]
pub fn checksum(data: *const [u8; 2], words: usize) -> u16 {
    checksum_from(0, data, words)
}

/// The Internet checksum of the `words` 16-bit words at `data` and of what `sum` already
/// summed (a pseudo-header's words, each as read from the packet).
#[inline(always)]
pub fn checksum_from(mut sum: u32, data: *const [u8; 2], words: usize) -> u16 {
    let mut i = 0;
    while i < words {
        // SAFETY: the caller checked `words` words at `data`.
        sum += u16::from_ne_bytes(unsafe { *data.add(i) }) as u32;
        i += 1;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The Internet checksum `check` after a 16-bit word it covers changed from `old` to `new`
/// (RFC 1624, eqn. 3). All three as read from the packet: the sum is byte-order independent.
#[inline(always)]
pub fn checksum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The Internet checksum `check` after a 32-bit word it covers (an IPv4 address) changed: its
/// two halves, as read from the packet.
#[inline(always)]
pub fn checksum_replace32(check: u16, old: u32, new: u32) -> u16 {
    let check = checksum_replace(check, old as u16, new as u16);
    checksum_replace(check, (old >> 16) as u16, (new >> 16) as u16)
}

/// The Internet checksum `check` after an IPv6 address it covers changed from `old` to `new`
/// (words as read from the packet).
#[inline(always)]
pub fn checksum_replace128(mut check: u16, old: [u32; 4], new: [u32; 4]) -> u16 {
    let mut i = 0;
    while i < 4 {
        check = checksum_replace32(check, old[i], new[i]);
        i += 1;
    }
    check
}

/// Writes the IPv6 address `addr` at `field` (a frame pointer bounds-checked for 16 bytes),
/// word by word (a `[u32; 4]` copy would call a byte-wise memcpy); returns the old address.
#[inline(always)]
pub fn set_address6(field: *mut u8, addr: [u32; 4]) -> [u32; 4] {
    let field = field as *mut u32;
    let mut old = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        // SAFETY: as the caller promises.
        unsafe {
            old[i] = field.add(i).read_unaligned();
            field.add(i).write_unaligned(addr[i]);
        }
        i += 1;
    }
    old
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
