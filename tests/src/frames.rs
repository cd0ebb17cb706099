//! Crafted Ethernet frames, and the harness that feeds them to XDP programs through
//! BPF_PROG_TEST_RUN: what the XDP tests and the benchmarks send.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Result;
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb::{
    config,
    lifecycle::{Registry, TargetKey},
    maps::{Dataplane, MapState, NextHop, be},
    net::Interface,
};
use lb_common::{FlowKey, FlowKey6, PROTO_TCP, PROTO_UDP};

/// The MAC of the balancer in crafted frames.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
/// The balancer's global IPv6 address: the outer source of IPv6 encapsulation.
pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);

/// The verdicts of an XDP program (`enum xdp_action`), as `run_xdp` returns them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The balancer's interface, as the tests pretend it is.
pub fn test_interface() -> Interface {
    Interface {
        name: "test0".into(),
        index: 1,
        mac: LB_MAC,
        mtu: 1500,
        ipv4: vec![LB_ADDR],
        // A link-local address first: encapsulation must not take it for its source.
        ipv6: vec!["fe80::3".parse().unwrap(), LB_ADDR6],
    }
}

/// The made-up MAC of a target: 02:00 followed by its address's last four bytes.
pub fn mac_of(addr: impl Into<IpAddr>) -> [u8; 6] {
    let o = match addr.into() {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(a) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
    };
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

/// The next hop of a target in crafted frames: its made-up MAC, on the only interface.
pub fn next_hop_of(key: &TargetKey) -> Option<NextHop> {
    Some(NextHop {
        interface: 0,
        mac: mac_of(key.addr.ip()),
    })
}

/// A validated config and a registry in sync with it, as `lb run` starts: every target
/// `initial`.
pub fn registered(config_text: &str) -> Result<(config::Config, Registry)> {
    let config =
        config::parse(Path::new("test.yaml"), config_text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut registry = Registry::new(
        lb_common::MAX_LISTENERS,
        config.settings.max_target_groups,
        lb_common::MAX_TARGETS,
    );
    registry
        .sync(&config, std::time::Instant::now())
        .map_err(anyhow::Error::msg)?;
    Ok((config, registry))
}

/// A loaded (not attached) balancer with its maps filled for `config_text`, by the
/// controller's own code with made-up MACs; every target starts `initial`.
pub fn dataplane_for(config_text: &str) -> Result<(Dataplane, MapState, Registry)> {
    let (config, registry) = registered(config_text)?;
    let state = MapState::build(&config, &registry, &[test_interface()], next_hop_of)?;
    let mut dataplane = Dataplane::load(&config.settings, None)?;
    dataplane.apply(&MapState::default(), &state)?;
    Ok((dataplane, state, registry))
}

/// Runs `program` `repeat` times on `frame`; returns the verdict, the output frame and the
/// kernel's average time per run.
pub fn run_xdp(
    program: &Xdp,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, Vec<u8>, std::time::Duration)> {
    let mut out = vec![0u8; frame.len() + 128];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out, result.duration))
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ttl: u8,
    pub dont_fragment: bool,
    /// Raw flags+offset field, for fragment tests (overrides `dont_fragment`).
    pub frag_field: Option<u16>,
    pub ip_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Whether a UDP packet carries a checksum (0, "none", otherwise). TCP always does.
    pub udp_checksum: bool,
}

impl Packet {
    pub fn tcp(dport: u16, sport: u16, flags: u8) -> Self {
        Packet {
            src: CLIENT,
            dst: VIP,
            proto: PROTO_TCP,
            sport,
            dport,
            tcp_flags: flags,
            ttl: 61,
            dont_fragment: true,
            frag_field: None,
            ip_options: Vec::new(),
            payload: b"hello".to_vec(),
            udp_checksum: true,
        }
    }

    pub fn udp(dport: u16, sport: u16) -> Self {
        Packet {
            proto: PROTO_UDP,
            tcp_flags: 0,
            dont_fragment: false,
            ..Packet::tcp(dport, sport, 0)
        }
    }

    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: be(self.src),
            dst: be(self.dst),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            pad: [0; 3],
        }
    }

    pub fn ip_packet(&self) -> Vec<u8> {
        let l4 = segment(
            self.proto,
            self.sport,
            self.dport,
            self.tcp_flags,
            &self.payload,
        );
        let ihl = 20 + self.ip_options.len();
        let mut ip = Vec::new();
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend(((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend(0x1234u16.to_be_bytes());
        let frag = self
            .frag_field
            .unwrap_or(if self.dont_fragment { 0x4000 } else { 0 });
        ip.extend(frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto);
        ip.extend([0, 0]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        ip.extend(&self.ip_options);
        let check = checksum(&ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        let mut l4 = l4;
        if self.proto == PROTO_TCP || self.udp_checksum {
            let check = match checksum(
                &[
                    pseudo_header(self.src, self.dst, self.proto, l4.len()),
                    l4.clone(),
                ]
                .concat(),
            ) {
                // In UDP a computed 0 is sent as 0xffff: 0 means "no checksum".
                0 if self.proto == PROTO_UDP => 0xffff,
                c => c,
            };
            let at = if self.proto == PROTO_TCP { 16 } else { 6 };
            l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
        }
        ip.extend(l4);
        ip
    }

    pub fn frame(&self) -> Vec<u8> {
        ethernet(LB_MAC, CLIENT_MAC, 0x0800, &self.ip_packet())
    }
}

/// An IPv6 packet: a TCP or UDP one after `extensions`, each an extension header as (its
/// type, its bytes after the next-header and length bytes; padded to a multiple of 8).
#[derive(Clone, Debug)]
pub struct Packet6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub hop_limit: u8,
    pub extensions: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Packet6 {
    pub fn tcp(dport: u16, sport: u16, flags: u8) -> Self {
        Packet6 {
            src: CLIENT6,
            dst: VIP6,
            proto: PROTO_TCP,
            sport,
            dport,
            tcp_flags: flags,
            hop_limit: 61,
            extensions: Vec::new(),
            payload: b"hello".to_vec(),
        }
    }

    pub fn udp(dport: u16, sport: u16) -> Self {
        Packet6 {
            proto: PROTO_UDP,
            tcp_flags: 0,
            ..Packet6::tcp(dport, sport, 0)
        }
    }

    pub fn key(&self) -> FlowKey6 {
        FlowKey6::new(
            lb::maps::be6(self.src),
            lb::maps::be6(self.dst),
            self.sport.to_be(),
            self.dport.to_be(),
            self.proto,
        )
    }

    /// The TCP or UDP header and payload, its checksum over the IPv6 pseudo-header.
    fn l4(&self) -> Vec<u8> {
        let mut l4 = segment(
            self.proto,
            self.sport,
            self.dport,
            self.tcp_flags,
            &self.payload,
        );
        let pseudo = pseudo_header6(self.src, self.dst, self.proto, l4.len());
        let check = checksum(&[pseudo, l4.clone()].concat());
        let at = if self.proto == PROTO_TCP { 16 } else { 6 };
        let check = if check == 0 && self.proto == PROTO_UDP {
            0xffff
        } else {
            check
        };
        l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
        l4
    }

    pub fn ip_packet(&self) -> Vec<u8> {
        let mut after = Vec::new();
        for (i, (_, bytes)) in self.extensions.iter().enumerate() {
            let next = self.extensions.get(i + 1).map_or(self.proto, |e| e.0);
            let mut ext = vec![next, 0];
            ext.extend(bytes);
            ext.resize((ext.len().max(8)).next_multiple_of(8), 0);
            ext[1] = (ext.len() / 8 - 1) as u8;
            after.extend(ext);
        }
        after.extend(self.l4());
        let first = self.extensions.first().map_or(self.proto, |e| e.0);
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend((after.len() as u16).to_be_bytes());
        ip.extend([first, self.hop_limit]);
        ip.extend(self.src.octets());
        ip.extend(self.dst.octets());
        ip.extend(after);
        ip
    }

    pub fn frame(&self) -> Vec<u8> {
        ethernet(LB_MAC, CLIENT_MAC, 0x86dd, &self.ip_packet())
    }
}

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    f.extend(ether_type.to_be_bytes());
    f.extend(payload);
    f
}

/// The IPv4 pseudo-header that TCP and UDP checksums cover.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(src.octets());
    h.extend(dst.octets());
    h.extend([0, proto]);
    h.extend((l4_len as u16).to_be_bytes());
    h
}

/// A TCP segment (sequence 1, a window of 64240) or a UDP datagram (anything but TCP) with
/// `payload`, its checksum left 0.
fn segment(proto: u8, sport: u16, dport: u16, tcp_flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    if proto == PROTO_TCP {
        h.extend(1u32.to_be_bytes()); // seq
        h.extend(0u32.to_be_bytes()); // ack
        h.extend([5 << 4, tcp_flags]);
        h.extend(64240u16.to_be_bytes());
        h.extend([0, 0, 0, 0]); // checksum, urgent
    } else {
        h.extend(((8 + payload.len()) as u16).to_be_bytes());
        h.extend([0, 0]);
    }
    h.extend(payload);
    h
}

/// The IPv6 pseudo-header that TCP, UDP and ICMPv6 checksums cover.
pub fn pseudo_header6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(src.octets());
    h.extend(dst.octets());
    h.extend((len as u32).to_be_bytes());
    h.extend([0, 0, 0, proto]);
    h
}

/// Whether the TCP or UDP checksum of the IPv4 or IPv6 packet `ip` verifies; a UDP checksum of
/// 0 (none) counts as verifying in IPv4, which allows it. An IPv6 packet's extension headers
/// are skipped (hop-by-hop, routing, destination options).
pub fn l4_checksum_ok(ip: &[u8]) -> bool {
    if ip[0] >> 4 == 6 {
        let (mut next, mut at) = (ip[6], 40);
        while matches!(next, 0 | 43 | 60) {
            (next, at) = (ip[at], at + (ip[at + 1] as usize + 1) * 8);
        }
        let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
        let l4 = &ip[at..];
        if next == PROTO_UDP && l4[6..8] == [0, 0] {
            return false;
        }
        let pseudo = pseudo_header6(addr(8), addr(24), next, l4.len());
        return checksum(&[pseudo, l4.to_vec()].concat()) == 0;
    }
    let proto = ip[9];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let l4 = &ip[ihl..];
    if proto == PROTO_UDP && l4[6..8] == [0, 0] {
        return true;
    }
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    let pseudo = pseudo_header(addr(12), addr(16), proto, l4.len());
    checksum(&[pseudo, l4.to_vec()].concat()) == 0
}

/// The Internet checksum (RFC 1071), computed independently of the data plane's.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (`kind` 8) or another ICMP message from `src` to `dst`, with `ttl`.
pub fn icmp_frame(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, kind: u8) -> Vec<u8> {
    icmp_message(
        src,
        dst,
        ttl,
        [kind, 0, 0, 0, 0x12, 0x34, 0, 1],
        b"abcdefghijklmnop",
    )
}

/// An ICMP message over IPv4: its 8-byte `header` (checksum left 0, filled in here), then
/// `body`.
pub fn icmp_message(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    header: [u8; 8],
    body: &[u8],
) -> Vec<u8> {
    let mut icmp = header.to_vec();
    icmp.extend(body);
    let check = checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0, 0, ttl, 1, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend(icmp);
    ethernet(LB_MAC, CLIENT_MAC, 0x0800, &ip)
}

/// An ICMPv6 message: its 8-byte `header` (checksum left 0, filled in here), then `body`.
pub fn icmp6_message(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    header: [u8; 8],
    body: &[u8],
) -> Vec<u8> {
    let mut icmp = header.to_vec();
    icmp.extend(body);
    let pseudo = pseudo_header6(src, dst, 58, icmp.len());
    let check = checksum(&[pseudo, icmp.clone()].concat());
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend((icmp.len() as u16).to_be_bytes());
    ip.extend([58, hop_limit]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    ip.extend(icmp);
    ethernet(LB_MAC, CLIENT_MAC, 0x86dd, &ip)
}
