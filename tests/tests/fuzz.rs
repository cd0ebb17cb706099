//! The data plane against a reference model: random and mutated frames through
//! BPF_PROG_TEST_RUN, and for each the verdict and output frame compared with what a model,
//! written here from lb's documented behaviour, says the program must do. Needs root.
//!
//! `LB_FUZZ_FRAMES` frames (default 100,000; `cargo xtask fuzz` sends 1,000,000); the seed is
//! random and printed, and `LB_FUZZ_SEED` replays a run.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::{
    config::{self, Forwarding},
    lifecycle::Registry,
    maps::{Dataplane, MapState, be, be6, from_be6},
};
use lb_common::{DropReason, FlowKey, FlowKey6, FlowKeyOf, PROTO_TCP, PROTO_UDP, splitmix64};
use lb_tests::frames::{
    CLIENT_MAC, LB_ADDR, LB_ADDR6, LB_MAC, Packet6, XDP_DROP, XDP_PASS, XDP_TX, checksum,
    dataplane_for, ethernet, run_xdp, test_interface,
};

const PROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Every kind of listener the model knows: DSR with and without port translation, IPIP (in
/// IPv4 and, to targets named by IPv6 address, in IPv6), NAT, an allow-list, tcp_udp listeners,
/// and a global deny-list; IPv6 listeners in dsr and ip6ip6, with and without port translation. The connection table is large
/// enough that no flow is ever evicted, so a flow's target is its Maglev pick whether it is
/// new or not.
const CONFIG: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 1048576, max_target_groups: 7}
denied_sources: [192.0.2.128/25, '2001:db8:bad::/48']
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}
  - {name: web6, address: '2001:db8:10::10', port: 80, protocol: tcp_udp, target_group: web}
  - name: guarded6
    address: '2001:db8:10::11'
    port: 443
    protocol: tcp
    target_group: guarded
    allowed_sources: ['2001:db8:c::/48']
  - {name: game, address: 203.0.113.10, port: 7777, protocol: udp, target_group: game}
  - {name: tunnel, address: 203.0.113.11, port: 5000, protocol: tcp_udp, target_group: tunnel}
  - name: guarded
    address: 203.0.113.12
    port: 443
    protocol: tcp
    target_group: guarded
    allowed_sources: [198.51.100.0/24]
  - {name: natted, address: 203.0.113.13, port: 8080, protocol: tcp_udp, target_group: natted}
  - {name: game6, address: '2001:db8:10::10', port: 7777, protocol: udp, target_group: game}
  - {name: tunnel6, address: '2001:db8:10::12', port: 5000, protocol: tcp_udp, target_group: tunnel6}
  - {name: tunnel46, address: 203.0.113.11, port: 5001, protocol: tcp_udp, target_group: tunnel6}
  - {name: natted6, address: '2001:db8:10::13', port: 8080, protocol: tcp_udp, target_group: natted6}
target_groups:
  - name: web
    targets: [{address: 198.51.100.11, port: 80}, {address: 198.51.100.12, port: 80}, {address: 198.51.100.13, port: 80}]
  - name: game
    port: 7000
    targets: [{address: 198.51.100.21}, {address: 198.51.100.22}]
  - name: tunnel
    forwarding: ipip
    targets: [{address: 198.51.100.31, port: 5000}, {address: 198.51.100.32, port: 5000}]
  - name: guarded
    targets: [{address: 198.51.100.41, port: 443}]
  - name: natted
    forwarding: nat
    port: 30080
    targets: [{address: 198.51.100.51}, {address: 198.51.100.52}]
  - name: natted6
    forwarding: nat
    port: 30080
    targets: [{address: '2001:db8:1::51'}, {address: '2001:db8:1::52'}]
  - name: tunnel6
    forwarding: ipip
    targets: [{address: '2001:db8:1::31', port: 5000}, {address: '2001:db8:1::32', port: 5001}]
";

/// The NAT groups' targets and their port: the sources of replies.
const NAT_TARGETS: [[u8; 4]; 2] = [[198, 51, 100, 51], [198, 51, 100, 52]];
const NAT_TARGETS6: [&str; 2] = ["2001:db8:1::51", "2001:db8:1::52"];
const NAT_TARGET_PORT: u16 = 30080;

/// SplitMix64 over a counter: reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix64(self.0)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// What the program must do with a frame.
#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    /// Left to the kernel, unchanged.
    Pass,
    /// Left to the kernel, rewritten: a NAT translation, whose way on the FIB of this test's
    /// empty namespace does not know.
    Rewritten(Vec<u8>),
    /// Either (a NAT flow that a FIN or RST may be ending: its entries linger 5 s).
    Either(Box<Outcome>, Box<Outcome>),
    Drop(DropReason),
    /// Sent back out, as this frame.
    Tx(Vec<u8>),
    /// Dropped for this reason, and answered: this frame sent back out.
    Answered(Vec<u8>, DropReason),
}

/// lb's data plane as its README and doc comments describe it, for `CONFIG`.
struct Model {
    config: config::Config,
    registry: Registry,
    state: MapState,
    /// The NAT flows a request was forwarded for, by their replies' 5-tuple (target, client,
    /// target port, client port, protocol): the VIP and port the replies are to come from.
    nat: HashMap<(Ipv4Addr, Ipv4Addr, u16, u16, u8), NatFlow<Ipv4Addr>>,
    /// The same for IPv6.
    nat6: HashMap<(Ipv6Addr, Ipv6Addr, u16, u16, u8), NatFlow<Ipv6Addr>>,
}

struct NatFlow<A> {
    vip: A,
    port: u16,
    /// A FIN or an RST went either way: the flow may be ending.
    ending: bool,
}

impl Model {
    fn is_vip(&self, addr: Ipv4Addr) -> bool {
        self.config.listeners.iter().any(|l| l.address == addr)
    }

    /// ICMP: a well-formed echo request to a VIP is answered from the balancer (type 0,
    /// addresses and MACs swapped, TTL 64, checksums updated as RFC 1624 does); anything else
    /// is left to the kernel (no NAT flow is ever quoted by a random error).
    fn echo(&self, frame: &[u8]) -> Outcome {
        let ip = &frame[14..];
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let well_formed = ip[0] >> 4 == 4
            && ihl >= 20
            && tot_len >= ihl + 8
            && 14 + tot_len <= frame.len()
            && u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff == 0;
        let icmp = 14 + ihl;
        if !well_formed || frame[icmp] != 8 || frame[icmp + 1] != 0 || !self.is_vip(dst) {
            return Outcome::Pass;
        }
        let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(&frame[6..12]);
        out[6..12].copy_from_slice(&frame[0..6]);
        out[26..30].copy_from_slice(&frame[30..34]);
        out[30..34].copy_from_slice(&frame[26..30]);
        out[22] = 64;
        let ip_check = incremental_checksum(word(frame, 24), word(frame, 22), word(&out, 22));
        out[24..26].copy_from_slice(&ip_check.to_be_bytes());
        out[icmp] = 0;
        let icmp_check = incremental_checksum(word(frame, icmp + 2), 0x0800, 0);
        out[icmp + 2..icmp + 4].copy_from_slice(&icmp_check.to_be_bytes());
        Outcome::Tx(out)
    }

    /// ICMP: an echo request (`echo`) or an error; anything else is left to the kernel.
    fn icmp(&mut self, frame: &[u8]) -> Outcome {
        let ihl = (frame[14] & 0x0f) as usize * 4;
        let icmp = 14 + ihl;
        let error = frame[14] >> 4 == 4
            && ihl >= 20
            && u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff == 0
            && frame.len() >= icmp + 8
            && [3, 11, 12].contains(&frame[icmp]);
        if error {
            self.icmp_error(frame, icmp)
        } else {
            self.echo(frame)
        }
    }

    /// An ICMP error (its header at `icmp`) goes to the host that sent the packet it quotes:
    /// - about a reply (quoting VIP:listener-port → client, sent to that VIP): to the flow's
    ///   target, the Maglev pick of the reversed quote; under DSR or IPIP with the quoted
    ///   port made the target's, under NAT translated in both headers like the flow (and only
    ///   for a flow the model has seen);
    /// - about a NAT request (quoting client → target:port): to the client, from the VIP.
    ///
    /// An error that names nothing lb can place is dropped if it went to a VIP, else passed.
    fn icmp_error(&mut self, frame: &[u8], icmp: usize) -> Outcome {
        use Outcome::{Drop, Either, Pass, Rewritten, Tx};
        let addr =
            |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        let outer_dst = addr(30);
        let unmatched = if self.is_vip(outer_dst) {
            Drop(DropReason::IcmpUnmatched)
        } else {
            Pass
        };
        let q = icmp + 8;
        if frame.len() < q + 20 {
            return unmatched;
        }
        let qihl = (frame[q] & 0x0f) as usize * 4;
        let proto = frame[q + 9];
        let l4 = q + qihl;
        if frame[q] >> 4 != 4
            || qihl < 20
            || (proto != PROTO_TCP && proto != PROTO_UDP)
            || port(q + 6) & 0x3fff != 0
            || frame.len() < l4 + 8
        {
            return unmatched;
        }
        let (src, dst, sport, dport) = (addr(q + 12), addr(q + 16), port(l4), port(l4 + 2));
        let quote = Quote {
            icmp,
            ip: q,
            l4,
            proto,
        };
        let listener = self.config.listeners.iter().find(|l| {
            l.address == src && l.port == sport && l.protocol.ip_protocols().contains(&proto)
        });
        if let Some(listener) = listener.filter(|_| outer_dst == src) {
            let group = self.group_of(listener);
            let mut out = frame.to_vec();
            if group.forwarding == Forwarding::Nat {
                let Some(((target, ..), flow)) =
                    self.nat.iter().find(|((_, client, _, cport, p), f)| {
                        f.vip == src
                            && f.port == sport
                            && *client == dst
                            && *cport == dport
                            && *p == proto
                    })
                else {
                    return unmatched;
                };
                quote.rewrite(&mut out, 12, *target, 0, NAT_TARGET_PORT);
                set_outer_address(&mut out, 16, *target);
                return if flow.ending {
                    Either(Box::new(Rewritten(out)), Box::new(unmatched))
                } else {
                    Rewritten(out)
                };
            }
            let key = FlowKey::new(be(dst), be(src), dport.to_be(), sport.to_be(), proto);
            let target = self.maglev_target(&group.name, &key);
            let target_port = u16::from_be(target.port);
            if target_port != sport {
                quote.rewrite(&mut out, 12, src, 0, target_port);
            }
            return match group.forwarding {
                Forwarding::Ipip => encapsulated(&out, &target),
                _ => {
                    out[0..6].copy_from_slice(&target.mac);
                    out[6..12].copy_from_slice(&LB_MAC);
                    Tx(out)
                }
            };
        }
        let Some(flow) = self.nat.get(&(dst, src, dport, sport, proto)) else {
            return unmatched;
        };
        let mut out = frame.to_vec();
        quote.rewrite(&mut out, 16, flow.vip, 1, flow.port);
        set_outer_address(&mut out, 12, flow.vip);
        if flow.ending {
            Either(Box::new(Rewritten(out)), Box::new(unmatched))
        } else {
            Rewritten(out)
        }
    }

    /// The target group of `listener`.
    fn group_of(&self, listener: &config::Listener) -> &config::TargetGroup {
        self.config
            .target_group(&listener.target_group)
            .expect("a listener's group")
    }

    /// The target the Maglev table of group `name` gives the flow `key`.
    fn maglev_target<K: FlowKeyOf>(&self, name: &str, key: &K) -> lb_common::Target {
        let gid = self.registry.group_id(name).expect("a group id");
        let settings = self.state.settings.expect("settings");
        let id = self.state.groups[&gid].table[settings.maglev_slot(key) as usize];
        self.state.targets[&id]
    }

    /// IPv6: dsr and ip6ip6, past up to 4 extension headers, the port translated where the
    /// target's differs; ICMPv6 and anything else not TCP or UDP is the kernel's, and so is
    /// anything to an address that is no VIP.
    fn expect6(&mut self, frame: &[u8]) -> Outcome {
        use Outcome::{Drop, Pass, Tx};
        // The IPv6 header cut short: not lb's to judge.
        if frame.len() < 54 {
            return Pass;
        }
        let addr = |at: usize| {
            let octets: [u8; 16] = frame[at..at + 16].try_into().expect("16 bytes");
            IpAddr::V6(octets.into())
        };
        let (src, dst) = (addr(22), addr(38));
        let refuse = |reason| {
            if self.config.listeners.iter().any(|l| l.address == dst) {
                Drop(reason)
            } else {
                Pass
            }
        };
        let end = 54 + u16::from_be_bytes([frame[18], frame[19]]) as usize;
        if frame[14] >> 4 != 6 || end > frame.len() {
            return refuse(DropReason::Malformed);
        }
        let skipped = [0, 43, 60];
        let (mut next, mut l4) = (frame[20], 54);
        for _ in 0..4 {
            if !skipped.contains(&next) {
                break;
            }
            if l4 + 4 > frame.len() {
                return refuse(DropReason::Malformed);
            }
            // A routing header with segments left: the VIP is only a waypoint.
            if next == 43 && frame[l4 + 3] != 0 {
                return refuse(DropReason::ExtensionHeaders);
            }
            (next, l4) = (frame[l4], l4 + (frame[l4 + 1] as usize + 1) * 8);
        }
        if next == 44 {
            return refuse(DropReason::Fragment);
        }
        if skipped.contains(&next) {
            return refuse(DropReason::ExtensionHeaders);
        }
        if next != PROTO_TCP && next != PROTO_UDP {
            return self.echo6(frame, end);
        }
        let (needed, header) = if next == PROTO_TCP { (14, 20) } else { (4, 8) };
        if l4 + needed > frame.len() || l4 + header > end {
            return refuse(DropReason::Malformed);
        }
        let sport = u16::from_be_bytes([frame[l4], frame[l4 + 1]]);
        let dport = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
        let (IpAddr::V6(s6), IpAddr::V6(d6)) = (src, dst) else {
            unreachable!("read as IPv6")
        };
        let closing = next == PROTO_TCP && frame[l4 + 13] & (TCP_FIN | TCP_RST) != 0;
        let Some(listener) = self.config.listeners.iter().find(|l| {
            l.address == dst && l.port == dport && l.protocol.ip_protocols().contains(&next)
        }) else {
            // A reply of a NAT flow comes back from VIP:port; anything else is refused.
            let refused = refuse(DropReason::NoListener);
            let Some(flow) = self.nat6.get_mut(&(s6, d6, sport, dport, next)) else {
                return refused;
            };
            let mut out = frame.to_vec();
            rewrite6(&mut out, l4, next, 0, flow.port, flow.vip);
            let ending = flow.ending;
            flow.ending |= closing;
            return if ending {
                Outcome::Either(Box::new(Outcome::Rewritten(out)), Box::new(refused))
            } else {
                Outcome::Rewritten(out)
            };
        };
        let denied = self.config.denied_sources.iter().any(|n| n.contains(&src));
        let allowed = listener
            .allowed_sources
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n.contains(&src)));
        if denied || !allowed {
            return Drop(DropReason::DeniedSource);
        }
        let key = FlowKey6::new(be6(s6), be6(d6), sport.to_be(), dport.to_be(), next);
        let group = self.group_of(listener);
        let target = self.maglev_target(&group.name, &key);
        let mut out = frame.to_vec();
        let target_port = u16::from_be(target.port);
        if group.forwarding == Forwarding::Nat {
            // To the target's address and port; replies are recognised from now on (unless
            // the flow's first packet was an RST, which creates no state).
            let target_addr = from_be6(target.addr6);
            rewrite6(&mut out, l4, next, 1, target_port, target_addr);
            let rst = next == PROTO_TCP && frame[l4 + 13] & TCP_RST != 0;
            let key = (target_addr, s6, target_port, sport, next);
            match self.nat6.get_mut(&key) {
                Some(flow) => flow.ending |= closing,
                None if !rst => {
                    let flow = NatFlow {
                        vip: d6,
                        port: dport,
                        ending: closing,
                    };
                    self.nat6.insert(key, flow);
                }
                None => {}
            }
            return Outcome::Rewritten(out);
        }
        if target_port != dport {
            rewrite(&mut out, l4, next, 1, target_port, None);
        }
        // The fuzzer's IPv6 frames are far below the MTU: the xdp tests cover "packet too
        // big".
        if group.forwarding == Forwarding::Ipip {
            return encapsulated(&out, &target);
        }
        out[0..6].copy_from_slice(&target.mac);
        out[6..12].copy_from_slice(&LB_MAC);
        Tx(out)
    }

    /// ICMPv6 (right after the IPv6 header, whose payload ends at `end`): a well-formed echo
    /// request to a VIP is answered from the balancer (type 129, addresses and MACs swapped,
    /// hop limit 64, the checksum updated as RFC 1624 does); anything else is left to the
    /// kernel.
    fn echo6(&self, frame: &[u8], end: usize) -> Outcome {
        let dst: [u8; 16] = frame[38..54].try_into().expect("16 bytes");
        let vip = self
            .config
            .listeners
            .iter()
            .any(|l| l.address == IpAddr::V6(dst.into()));
        // The error's checks read the frame, not the length the packet declares.
        if frame[20] == 58 && frame.len() >= 62 && (1..=4).contains(&frame[54]) {
            return self.error6(frame, vip);
        }
        if frame[20] != 58 || end < 62 || frame[54] != 128 || frame[55] != 0 || !vip {
            return Outcome::Pass;
        }
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(&frame[6..12]);
        out[6..12].copy_from_slice(&frame[0..6]);
        out[22..38].copy_from_slice(&frame[38..54]);
        out[38..54].copy_from_slice(&frame[22..38]);
        out[21] = 64;
        out[54] = 129;
        let check = u16::from_be_bytes([frame[56], frame[57]]);
        out[56..58].copy_from_slice(&incremental_checksum(check, 0x8000, 0x8100).to_be_bytes());
        Outcome::Tx(out)
    }

    /// An ICMPv6 error (its header at 54, sent to a VIP if `to_vip`) quoting a reply of an IPv6
    /// listener, sent to that VIP: to the flow's target (the Maglev pick of the reversed quote),
    /// the way the flow goes, the quote naming the target's own port. Anything else it quotes:
    /// dropped if it went to a VIP, else passed.
    fn error6(&self, frame: &[u8], to_vip: bool) -> Outcome {
        use Outcome::{Drop, Pass, Tx};
        let unmatched = if to_vip {
            Drop(DropReason::IcmpUnmatched)
        } else {
            Pass
        };
        let q = 62;
        if frame.len() < q + 48 {
            return unmatched;
        }
        let addr = |at: usize| {
            let octets: [u8; 16] = frame[at..at + 16].try_into().expect("16 bytes");
            std::net::Ipv6Addr::from(octets)
        };
        let (proto, src, dst) = (frame[q + 6], addr(q + 8), addr(q + 24));
        let sport = u16::from_be_bytes([frame[q + 40], frame[q + 41]]);
        let dport = u16::from_be_bytes([frame[q + 42], frame[q + 43]]);
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return unmatched;
        }
        let listener = self.config.listeners.iter().find(|l| {
            l.address == IpAddr::V6(src)
                && l.port == sport
                && l.protocol.ip_protocols().contains(&proto)
        });
        let quote = Quote {
            icmp: 54,
            ip: q,
            l4: q + 40,
            proto,
        };
        let listener = listener.filter(|_| src == addr(38));
        let group = listener.map(|l| self.group_of(l));
        let Some(group) = group.filter(|g| g.forwarding != Forwarding::Nat) else {
            // About a NAT flow: a reply's, to its target; a request's, from the target's side,
            // to the client.
            let mut out = frame.to_vec();
            let flow = if listener.is_some() {
                self.nat6
                    .iter()
                    .find_map(|(&(target, client, tport, cport, p), f)| {
                        (f.vip == src
                            && f.port == sport
                            && client == dst
                            && cport == dport
                            && p == proto)
                            .then(|| {
                                quote.rewrite6(&mut out, 8, target, 0, tport, 38);
                                f.ending
                            })
                    })
            } else {
                self.nat6.get(&(dst, src, dport, sport, proto)).map(|f| {
                    quote.rewrite6(&mut out, 24, f.vip, 1, f.port, 22);
                    f.ending
                })
            };
            return match flow {
                Some(false) => Outcome::Rewritten(out),
                Some(true) => {
                    Outcome::Either(Box::new(Outcome::Rewritten(out)), Box::new(unmatched))
                }
                None => unmatched,
            };
        };
        let key = FlowKey6::new(be6(dst), be6(src), dport.to_be(), sport.to_be(), proto);
        let target = self.maglev_target(&group.name, &key);
        let mut out = frame.to_vec();
        let target_port = u16::from_be(target.port);
        if target_port != sport {
            quote.set_port(&mut out, &[], 0, target_port);
        }
        if group.forwarding == Forwarding::Ipip {
            return encapsulated(&out, &target);
        }
        out[0..6].copy_from_slice(&target.mac);
        out[6..12].copy_from_slice(&LB_MAC);
        Tx(out)
    }

    fn expect(&mut self, frame: &[u8]) -> Outcome {
        use Outcome::{Answered, Drop, Either, Pass, Rewritten, Tx};
        if frame.len() >= 14 && frame[12..14] == [0x86, 0xdd] {
            return self.expect6(frame);
        }
        // Not IPv4 (or too short to be): not lb's to judge.
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return Pass;
        }
        let ip = &frame[14..];
        let proto = ip[9];
        if proto == PROTO_ICMP {
            return self.icmp(frame);
        }
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return Pass;
        }
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let refuse = |reason| if self.is_vip(dst) { Drop(reason) } else { Pass };
        let ihl = (ip[0] & 0x0f) as usize * 4;
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let l4_len = if proto == PROTO_TCP { 20 } else { 8 };
        if ip[0] >> 4 != 4 || ihl < 20 || tot_len < ihl + l4_len || 14 + tot_len > frame.len() {
            return refuse(DropReason::Malformed);
        }
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return refuse(DropReason::Fragment);
        }
        let l4 = 14 + ihl;
        let sport = u16::from_be_bytes([frame[l4], frame[l4 + 1]]);
        let dport = u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]);
        let closing = proto == PROTO_TCP && frame[l4 + 13] & (TCP_FIN | TCP_RST) != 0;
        let Some(listener) = self.config.listeners.iter().find(|l| {
            l.address == dst && l.port == dport && l.protocol.ip_protocols().contains(&proto)
        }) else {
            // A reply of a NAT flow comes back from VIP:port; anything else is refused.
            let refused = refuse(DropReason::NoListener);
            let Some(flow) = self.nat.get_mut(&(src, dst, sport, dport, proto)) else {
                return refused;
            };
            let mut out = frame.to_vec();
            rewrite(&mut out, l4, proto, 0, flow.port, Some((12, flow.vip)));
            let translated = Rewritten(out);
            let ending = flow.ending;
            flow.ending |= closing;
            return if ending {
                Either(Box::new(translated), Box::new(refused))
            } else {
                translated
            };
        };
        let denied = self
            .config
            .denied_sources
            .iter()
            .any(|n| n.contains(&IpAddr::V4(src)));
        let allowed = listener
            .allowed_sources
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n.contains(&IpAddr::V4(src))));
        if denied || !allowed {
            return Drop(DropReason::DeniedSource);
        }
        let group = self.group_of(listener);
        // Maglev: the slot the flow's hash chooses in the group's table.
        let key = FlowKey::new(be(src), be(dst), sport.to_be(), dport.to_be(), proto);
        let target = self.maglev_target(&group.name, &key);

        let mut out = frame.to_vec();
        let target_port = u16::from_be(target.port);
        let target_addr = Ipv4Addr::from(target.addr.to_ne_bytes());
        if group.forwarding == Forwarding::Nat {
            // To the target's address and port; replies are recognised from now on (unless the
            // flow's first packet was an RST, which creates no state).
            rewrite(&mut out, l4, proto, 1, target_port, Some((16, target_addr)));
            let rst = proto == PROTO_TCP && frame[l4 + 13] & TCP_RST != 0;
            let key = (target_addr, src, target_port, sport, proto);
            match self.nat.get_mut(&key) {
                Some(flow) => flow.ending |= closing,
                None if !rst => {
                    self.nat.insert(
                        key,
                        NatFlow {
                            vip: dst,
                            port: dport,
                            ending: closing,
                        },
                    );
                }
                None => {}
            }
            return Rewritten(out);
        }
        if target_port != dport {
            rewrite(&mut out, l4, proto, 1, target_port, None);
        }
        match group.forwarding {
            Forwarding::Dsr => {
                out[0..6].copy_from_slice(&target.mac);
                out[6..12].copy_from_slice(&LB_MAC);
                Tx(out)
            }
            Forwarding::Ipip if tot_len + overhead(&target) > test_interface().mtu as usize => {
                // Before port translation: the answer quotes the packet as the client sent it.
                if ip[6] & 0x40 != 0 {
                    Answered(too_big(frame, overhead(&target)), DropReason::TooBig)
                } else {
                    Drop(DropReason::TooBig)
                }
            }
            Forwarding::Ipip => encapsulated(&out, &target),
            Forwarding::Nat => unreachable!("translated above"),
        }
    }
}

/// What encapsulation for `target` adds: an outer IPv4 or IPv6 header.
fn overhead(target: &lb_common::Target) -> usize {
    if target.ipv6 != 0 { 40 } else { 20 }
}

/// The frame as IPIP sends it to `target`: an outer IPv4 header from the balancer (an IPv6 one
/// to a target named by IPv6 address), or a drop if it would then exceed the MTU.
fn encapsulated(frame: &[u8], target: &lb_common::Target) -> Outcome {
    if target.ipv6 != 0 {
        return encapsulated6(frame, target);
    }
    let ip = &frame[14..];
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if tot_len + 20 > test_interface().mtu as usize {
        return Outcome::Drop(DropReason::TooBig);
    }
    let mut outer = vec![0x45, ip[1]];
    outer.extend(((tot_len + 20) as u16).to_be_bytes());
    outer.extend([0, 0, ip[6] & 0x40, 0, ip[8], 4, 0, 0]);
    outer.extend(LB_ADDR.octets());
    outer.extend(target.addr.to_ne_bytes());
    let check = checksum(&outer);
    outer[10..12].copy_from_slice(&check.to_be_bytes());
    outer.extend(ip);
    Outcome::Tx(ethernet(target.mac, LB_MAC, 0x0800, &outer))
}

/// The IPv4 or IPv6 frame in IPv6 to `target`: the outer header from the balancer's global
/// address, with the inner packet's traffic class (an IPv4 one's TOS; an IPv6 one's flow label
/// too), its hop limit and the length it declares; or a drop if it would exceed the MTU.
fn encapsulated6(frame: &[u8], target: &lb_common::Target) -> Outcome {
    let ip = &frame[14..];
    let (class, len, next, hop_limit) = if ip[0] >> 4 == 6 {
        let len = 40 + u16::from_be_bytes([ip[4], ip[5]]) as usize;
        ([ip[0], ip[1], ip[2], ip[3]], len, 41, ip[7])
    } else {
        let len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        ([0x60 | ip[1] >> 4, ip[1] << 4, 0, 0], len, 4, ip[8])
    };
    if len + 40 > test_interface().mtu as usize {
        return Outcome::Drop(DropReason::TooBig);
    }
    let mut outer = class.to_vec();
    outer.extend((len as u16).to_be_bytes());
    outer.extend([next, hop_limit]);
    outer.extend(LB_ADDR6.octets());
    outer.extend(target.addr6.iter().flat_map(|w| w.to_ne_bytes()));
    outer.extend(ip);
    Outcome::Tx(ethernet(target.mac, LB_MAC, 0x86dd, &outer))
}

/// "Fragmentation needed" for a frame too big to encapsulate: from its destination to its
/// sender, MACs swapped, the next-hop MTU the interface's less the outer header (`overhead`
/// bytes), quoting the first 64 bytes of its IPv4 packet.
fn too_big(frame: &[u8], overhead: usize) -> Vec<u8> {
    let mtu = (test_interface().mtu as usize - overhead) as u16;
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend(mtu.to_be_bytes());
    icmp.extend(&frame[14..14 + 64]);
    let check = checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0, 0, 64, 1, 0, 0]);
    ip.extend(&frame[30..34]);
    ip.extend(&frame[26..30]);
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend(icmp);
    let dst: [u8; 6] = frame[6..12].try_into().expect("a MAC");
    let src: [u8; 6] = frame[0..6].try_into().expect("a MAC");
    ethernet(dst, src, 0x0800, &ip)
}

/// Where in an ICMP error frame its header and the packet it quotes are.
struct Quote {
    icmp: usize,
    ip: usize,
    l4: usize,
    proto: u8,
}

impl Quote {
    /// Replaces the quoted packet's address at `at` (12 source, 16 destination) and its port
    /// `which` (0 source, 1 destination), updating word by word as RFC 1624 does, in this
    /// order, its IPv4 checksum, its TCP or UDP checksum if quoted (a UDP 0 stays 0; a
    /// computed 0 goes out as 0xffff) and the ICMP checksum over all of it.
    fn rewrite(&self, out: &mut [u8], at: usize, addr: Ipv4Addr, which: usize, port: u16) {
        let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let put = |b: &mut [u8], i: usize, w: u16| b[i..i + 2].copy_from_slice(&w.to_be_bytes());
        let (old, new) = (out[self.ip + at..self.ip + at + 4].to_vec(), addr.octets());
        let halves = [
            (word(&old, 0), word(&new, 0)),
            (word(&old, 2), word(&new, 2)),
        ];
        let mut icmp = word(out, self.icmp + 2);
        let old_ip_check = word(out, self.ip + 10);
        let mut ip_check = old_ip_check;
        for (o, n) in halves {
            icmp = incremental_checksum(icmp, o, n);
            ip_check = incremental_checksum(ip_check, o, n);
        }
        out[self.ip + at..self.ip + at + 4].copy_from_slice(&new);
        put(out, self.ip + 10, ip_check);
        icmp = incremental_checksum(icmp, old_ip_check, ip_check);
        put(out, self.icmp + 2, icmp);
        self.set_port(out, &halves, which, port);
    }

    /// Replaces the quoted IPv6 packet's address at `at` (8 source, 24 destination) and its port
    /// `which`, updating its TCP or UDP checksum if quoted and the ICMPv6 checksum; then the
    /// outer address at `outer_at` (22 source, 38 destination) to the same, which the ICMPv6
    /// checksum's pseudo-header holds.
    fn rewrite6(
        &self,
        out: &mut [u8],
        at: usize,
        addr: Ipv6Addr,
        which: usize,
        port: u16,
        outer_at: usize,
    ) {
        let changed = replace_words(out, self.ip + at, addr, self.icmp + 2);
        self.set_port(out, &changed, which, port);
        replace_words(out, outer_at, addr, self.icmp + 2);
    }

    /// Replaces the quoted packet's port `which` (0 source, 1 destination), updating its TCP or
    /// UDP checksum if quoted (for the address words that `changed` too) and the ICMP
    /// checksum.
    fn set_port(&self, out: &mut [u8], changed: &[(u16, u16)], which: usize, port: u16) {
        let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let put = |b: &mut [u8], i: usize, w: u16| b[i..i + 2].copy_from_slice(&w.to_be_bytes());
        let udp = self.proto == PROTO_UDP;
        let mut icmp = word(out, self.icmp + 2);
        let port_at = self.l4 + 2 * which;
        let old_port = word(out, port_at);
        put(out, port_at, port);
        icmp = incremental_checksum(icmp, old_port, port);
        let check_at = self.l4 + if udp { 6 } else { 16 };
        if check_at + 2 <= out.len() {
            let old = word(out, check_at);
            if !(udp && old == 0) {
                let mut new = incremental_checksum(old, old_port, port);
                for &(o, n) in changed {
                    new = incremental_checksum(new, o, n);
                }
                if udp && new == 0 {
                    new = 0xffff;
                }
                put(out, check_at, new);
                icmp = incremental_checksum(icmp, old, new);
            }
        }
        put(out, self.icmp + 2, icmp);
    }
}

/// Writes the IPv6 address `addr` at `at`, updating the checksum at `check_at` word by word;
/// returns each word's change.
fn replace_words(out: &mut [u8], at: usize, addr: Ipv6Addr, check_at: usize) -> Vec<(u16, u16)> {
    let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let new = addr.octets();
    let changed: Vec<(u16, u16)> = (0..8)
        .map(|i| (word(out, at + 2 * i), word(&new, 2 * i)))
        .collect();
    let mut check = word(out, check_at);
    for &(o, n) in &changed {
        check = incremental_checksum(check, o, n);
    }
    out[at..at + 16].copy_from_slice(&new);
    out[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
    changed
}

/// The IPv6 counterpart of `rewrite`: port `which` of the TCP or UDP header at `l4` and the
/// address of the same side, the checksum updated for the port, then for each address word.
fn rewrite6(out: &mut [u8], l4: usize, proto: u8, which: usize, port: u16, addr: Ipv6Addr) {
    let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let port_at = l4 + 2 * which;
    let check_at = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    let old_check = word(out, check_at);
    let mut check = incremental_checksum(old_check, word(out, port_at), port);
    out[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
    let at = 22 + 16 * which;
    let new = addr.octets();
    for i in 0..8 {
        check = incremental_checksum(check, word(out, at + 2 * i), word(&new, 2 * i));
    }
    out[at..at + 16].copy_from_slice(&new);
    if proto == PROTO_TCP || old_check != 0 {
        let check = if check == 0 && proto == PROTO_UDP {
            0xffff
        } else {
            check
        };
        out[check_at..check_at + 2].copy_from_slice(&check.to_be_bytes());
    }
}

/// Replaces the outer IPv4 header's address at `at` (12 source, 16 destination), updating its
/// checksum word by word.
fn set_outer_address(out: &mut [u8], at: usize, addr: Ipv4Addr) {
    let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let (old, new) = (out[14 + at..14 + at + 4].to_vec(), addr.octets());
    let mut check = word(out, 24);
    for half in [0, 2] {
        check = incremental_checksum(check, word(&old, half), word(&new, half));
    }
    out[14 + at..14 + at + 4].copy_from_slice(&new);
    out[24..26].copy_from_slice(&check.to_be_bytes());
}

/// Rewrites port `which` (0 source, 1 destination) of the TCP or UDP header at `l4` to `port`
/// and, with `addr`, the IPv4 address at that offset of the IP header, updating the checksums
/// word by word as RFC 1624 does: the port, then each half of the address. A UDP checksum of
/// 0 means none, and stays; a computed 0 goes out as 0xffff.
fn rewrite(
    out: &mut [u8],
    l4: usize,
    proto: u8,
    which: usize,
    port: u16,
    addr: Option<(usize, Ipv4Addr)>,
) {
    let word = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let port_at = l4 + 2 * which;
    let check_at = l4 + if proto == PROTO_TCP { 16 } else { 6 };
    let mut l4_check = incremental_checksum(word(out, check_at), word(out, port_at), port);
    if let Some((at, addr)) = addr {
        let (old, new) = (out[14 + at..14 + at + 4].to_vec(), addr.octets());
        let mut ip_check = word(out, 24);
        for half in [0, 2] {
            let (old, new) = (word(&old, half), word(&new, half));
            l4_check = incremental_checksum(l4_check, old, new);
            ip_check = incremental_checksum(ip_check, old, new);
        }
        out[14 + at..14 + at + 4].copy_from_slice(&new);
        out[24..26].copy_from_slice(&ip_check.to_be_bytes());
    }
    if proto == PROTO_TCP || word(out, check_at) != 0 {
        let l4_check = if l4_check == 0 && proto == PROTO_UDP {
            0xffff
        } else {
            l4_check
        };
        out[check_at..check_at + 2].copy_from_slice(&l4_check.to_be_bytes());
    }
    out[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
}

/// RFC 1624, equation 3: the Internet checksum `check` after one 16-bit word it covers
/// changed from `old` to `new`.
fn incremental_checksum(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Where the model's flows go: pings to a VIP and elsewhere, each listener, a VIP's port
/// without a listener, a listener's port over the other protocol, and addresses that are no
/// VIP.
const DESTINATIONS: [([u8; 4], u16, u8); 16] = [
    ([203, 0, 113, 10], 0, PROTO_ICMP),
    ([198, 51, 100, 11], 0, PROTO_ICMP),
    ([203, 0, 113, 13], 8080, PROTO_TCP),
    ([203, 0, 113, 13], 8080, PROTO_UDP),
    ([203, 0, 113, 10], 80, PROTO_TCP),
    ([203, 0, 113, 10], 7777, PROTO_UDP),
    ([203, 0, 113, 11], 5000, PROTO_TCP),
    ([203, 0, 113, 11], 5000, PROTO_UDP),
    ([203, 0, 113, 11], 5001, PROTO_TCP),
    ([203, 0, 113, 11], 5001, PROTO_UDP),
    ([203, 0, 113, 12], 443, PROTO_TCP),
    ([203, 0, 113, 10], 81, PROTO_TCP),
    ([203, 0, 113, 10], 80, PROTO_UDP),
    ([203, 0, 113, 12], 443, PROTO_UDP),
    ([198, 51, 100, 11], 80, PROTO_TCP),
    ([10, 1, 2, 3], 7777, PROTO_UDP),
];

/// A flow: source, destination, ports, protocol.
#[derive(Clone, Copy)]
struct Flow {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
}

impl Flow {
    /// Whether it is a NAT flow (a request to the NAT listener, or a reply from its targets).
    fn nat(&self) -> bool {
        self.dst == [203, 0, 113, 13] || NAT_TARGETS.contains(&self.src)
    }

    /// A reply to this request from one of the NAT group's targets, the one it went to or not.
    fn reply(&self, rng: &mut Rng) -> Flow {
        Flow {
            src: rng.pick(&NAT_TARGETS),
            dst: self.src,
            sport: NAT_TARGET_PORT,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

fn random_flow(rng: &mut Rng) -> Flow {
    let (dst, dport, proto) = rng.pick(&DESTINATIONS);
    // Clients: allowed and not (198.51.100.0/24 is the guarded listener's), denied (the upper
    // half of 192.0.2.0/24), and anyone.
    let src = match rng.below(3) {
        0 => [198, 51, 100, rng.byte()],
        1 => [192, 0, 2, rng.byte()],
        _ => (rng.next() as u32).to_be_bytes(),
    };
    Flow {
        src,
        dst,
        sport: rng.next() as u16,
        dport,
        proto,
    }
}

/// A well-formed frame of `flow`, with IP options, payload and trailing bytes at random, and
/// its checksums right (mostly) or wrong.
fn frame_of(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let options: Vec<u8> = if rng.percent(10) {
        (0..4 * (1 + rng.below(10))).map(|_| rng.byte()).collect()
    } else {
        Vec::new()
    };
    let payload_len = if rng.percent(5) {
        1400 + rng.below(200)
    } else {
        rng.below(64)
    };
    let payload: Vec<u8> = (0..payload_len).map(|_| rng.byte()).collect();
    let mut l4 = Vec::new();
    if flow.proto == PROTO_ICMP {
        // An echo request (its identifier and sequence in the ports), now and then another
        // type, or another code.
        let any = rng.byte();
        l4.extend([
            rng.pick(&[8, 8, 8, 0, 3, 11, any]),
            rng.pick(&[0, 0, 0, 0, 1]),
        ]);
        l4.extend([0, 0]);
    }
    l4.extend(flow.sport.to_be_bytes());
    l4.extend(flow.dport.to_be_bytes());
    if flow.proto == PROTO_ICMP {
        // The checksum follows the header.
    } else if flow.proto == PROTO_TCP {
        l4.extend(rng.next().to_be_bytes()); // sequence and acknowledgment numbers
        l4.push(5 << 4);
        // NAT flows without FIN or RST (but for mutations): a flow that may be ending is one
        // the model cannot say much of.
        let any = rng.byte();
        l4.push(if flow.nat() {
            rng.pick(&[0x02, 0x10, 0x18, 0x12])
        } else {
            rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04, 0x12, any])
        });
        l4.extend([0xfa, 0xf0, 0, 0, 0, 0]);
    } else {
        l4.extend(((8 + payload.len()) as u16).to_be_bytes());
        l4.extend([0, 0]);
    }
    l4.extend(&payload);
    let ihl = 20 + options.len();
    let mut ip = vec![0x40 | (ihl / 4) as u8, rng.byte()];
    ip.extend(((ihl + l4.len()) as u16).to_be_bytes());
    ip.extend([rng.byte(), rng.byte()]);
    ip.extend(rng.pick(&[0x4000u16, 0]).to_be_bytes());
    ip.extend([rng.byte(), flow.proto, 0, 0]);
    ip.extend(flow.src);
    ip.extend(flow.dst);
    ip.extend(&options);
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let at = match flow.proto {
        PROTO_TCP => 16,
        PROTO_ICMP => 2,
        _ => 6,
    };
    if flow.proto == PROTO_ICMP {
        let check = checksum(&l4);
        l4[2..4].copy_from_slice(&check.to_be_bytes());
    } else if flow.proto == PROTO_TCP || rng.percent(80) {
        let mut pseudo = Vec::new();
        pseudo.extend(flow.src);
        pseudo.extend(flow.dst);
        pseudo.extend([0, flow.proto]);
        pseudo.extend((l4.len() as u16).to_be_bytes());
        let check = match checksum(&[pseudo, l4.clone()].concat()) {
            0 if flow.proto == PROTO_UDP => 0xffff,
            c => c,
        };
        l4[at..at + 2].copy_from_slice(&check.to_be_bytes());
    }
    if rng.percent(5) {
        l4[at] ^= rng.byte() | 1;
    }
    ip.extend(l4);
    if rng.percent(5) {
        ip.extend((0..rng.below(40)).map(|_| rng.byte()));
    }
    ethernet(LB_MAC, CLIENT_MAC, 0x0800, &ip)
}

/// An ICMP error about `flow`: a router's about its reply (to the flow's destination, a VIP,
/// now and then to the balancer instead), or for a NAT flow, a target's about its request (to
/// the client). The quote is cut anywhere from 8 bytes past its IPv4 header on.
fn error_about(rng: &mut Rng, flow: &Flow) -> Vec<u8> {
    let about_request = flow.nat() && rng.percent(50);
    let (quoted, src, dst) = if about_request {
        let target = rng.pick(&NAT_TARGETS);
        let request = Flow {
            dst: target,
            dport: NAT_TARGET_PORT,
            ..*flow
        };
        (request, target, flow.src)
    } else {
        let reply = Flow {
            src: flow.dst,
            dst: flow.src,
            sport: flow.dport,
            dport: flow.sport,
            proto: flow.proto,
        };
        let to = if rng.percent(90) {
            flow.dst
        } else {
            LB_ADDR.octets()
        };
        (reply, [192, 0, 2, 1], to)
    };
    let packet = frame_of(rng, &quoted)[14..].to_vec();
    let cut = 28 + rng.below(packet.len() - 27);
    let (kind, code) = rng.pick(&[(3, 4), (3, 4), (3, 3), (3, 1), (11, 0), (12, 0)]);
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend(rng.pick(&[1280u16, 1400, 576]).to_be_bytes());
    icmp.extend(&packet[..cut]);
    let check = checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend([rng.byte(), rng.byte(), 0, 0, 64, PROTO_ICMP, 0, 0]);
    ip.extend(src);
    ip.extend(dst);
    let check = checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    ip.extend(icmp);
    ethernet(LB_MAC, CLIENT_MAC, 0x0800, &ip)
}

/// An IPv6 frame: TCP or UDP (or now and then ICMPv6) to the IPv6 listeners' VIPs, to a port
/// or an address without one, from allowed, denied and any sources, past 0 to 6 extension
/// headers (a fragment header now and then), with a payload at random.
fn frame6(rng: &mut Rng) -> Vec<u8> {
    let dst = rng.pick(&[
        "2001:db8:10::10",
        "2001:db8:10::11",
        "2001:db8:10::12",
        "2001:db8:10::13",
        "2001:db8:99::1",
    ]);
    let (dport, proto) = rng.pick(&[
        (80, PROTO_TCP),
        (80, PROTO_UDP),
        (443, PROTO_TCP),
        (81, PROTO_TCP),
        (7777, PROTO_UDP),
        (5000, PROTO_TCP),
        (5000, PROTO_UDP),
        (8080, PROTO_TCP),
        (8080, PROTO_UDP),
        (80, 58),
    ]);
    let any = rng.next() as u16;
    let prefix: u16 = rng.pick(&[0xc, 0xc, 0xbad, any]);
    // Few clients and ports, so that NAT replies and errors meet the flows of earlier requests.
    let src = std::net::Ipv6Addr::new(0x2001, 0xdb8, prefix, 0, 0, 0, 0, rng.below(4) as u16);
    let extensions = (0..rng.pick(&[0, 0, 0, 1, 2, 4, 5, 6]))
        .map(|_| {
            let kind = rng.pick(&[0, 43, 60, 60, 44]);
            let mut bytes: Vec<u8> = (0..rng.below(20)).map(|_| rng.byte()).collect();
            // A routing header's segments left: mostly none, as lb forwards.
            if kind == 43 && bytes.len() > 1 && rng.percent(75) {
                bytes[1] = 0;
            }
            (kind, bytes)
        })
        .collect();
    let packet = Packet6 {
        src,
        dst: dst.parse().expect("an address"),
        proto,
        // ICMPv6 takes its type and code from the source port: now and then an echo request.
        sport: if proto == 58 && rng.percent(50) {
            0x8000
        } else {
            1024 + rng.below(8) as u16
        },
        dport,
        tcp_flags: rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04]),
        hop_limit: 64,
        extensions,
        payload: (0..rng.below(64)).map(|_| rng.byte()).collect(),
    };
    let nat_target: std::net::Ipv6Addr = rng.pick(&NAT_TARGETS6).parse().expect("an address");
    // The NAT target's side of the flow: a reply, and the packet it got.
    let reply = Packet6 {
        src: nat_target,
        dst: packet.src,
        sport: 30080,
        dport: packet.sport,
        extensions: Vec::new(),
        ..packet.clone()
    };
    let got = Packet6 {
        dst: nat_target,
        dport: 30080,
        extensions: Vec::new(),
        ..packet.clone()
    };
    let mut frame = if rng.percent(10) {
        reply.frame()
    } else if rng.percent(5) {
        // The NAT target's port unreachable about what it got, to the client.
        let header = [1, 4, 0, 0, 0, 0, 0, 0];
        let got = got.ip_packet();
        let cut = 48 + rng.below(got.len() - 47);
        lb_tests::frames::icmp6_message(nat_target, packet.src, 64, header, &got[..cut])
    } else if rng.percent(15) {
        // An error about its reply, from a router, to the VIP (or the client); the quote cut
        // anywhere from its ports on.
        let reply = Packet6 {
            src: packet.dst,
            dst: packet.src,
            sport: packet.dport,
            dport: packet.sport,
            extensions: Vec::new(),
            ..packet.clone()
        }
        .ip_packet();
        let cut = 44 + rng.below(reply.len() - 43);
        let to = if rng.percent(90) {
            packet.dst
        } else {
            packet.src
        };
        let kind = rng.pick(&[1, 2, 2, 3, 4]);
        let router = "2001:db8:1::4".parse().expect("an address");
        let header = [kind, 0, 0, 0, 0, 0, 0x05, 0x00];
        lb_tests::frames::icmp6_message(router, to, 64, header, &reply[..cut])
    } else {
        packet.frame()
    };
    if rng.percent(5) {
        frame.extend((0..rng.below(40)).map(|_| rng.byte()));
    }
    frame
}

/// One or more of: a cut at any length, a wrong version, header length, total length or
/// checksum, a fragment, another protocol or EtherType, random bytes anywhere.
fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        // Each list of likely values below ends with any value at all.
        let any = rng.next();
        match rng.below(9) {
            0 => frame.truncate(14 + rng.below(frame.len() - 13)),
            1 if frame.len() > 14 => frame[14] = (frame[14] & 0x0f) | (rng.byte() << 4),
            2 if frame.len() > 14 => frame[14] = (frame[14] & 0xf0) | (rng.byte() & 0x0f),
            3 if frame.len() > 17 => {
                let len = u16::from_be_bytes([frame[16], frame[17]]);
                let new = rng.pick(&[len.wrapping_add(1), len.wrapping_sub(1), any as u16]);
                frame[16..18].copy_from_slice(&new.to_be_bytes());
            }
            4 if frame.len() > 21 => {
                let field = rng.pick(&[0x2000u16, 0x0001, 0x3fff, 0x4001, any as u16]);
                frame[20..22].copy_from_slice(&field.to_be_bytes());
            }
            5 if frame.len() > 23 => frame[23] = rng.pick(&[1, 4, 6, 17, 47, 132, any as u8]),
            6 => {
                let ether_type: u16 = rng.pick(&[0x86dd, 0x8100, 0x0806, any as u16]);
                frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
            }
            7 if frame.len() > 25 => frame[24 + rng.below(2)] ^= rng.byte() | 1,
            _ => {
                let at = rng.below(frame.len());
                frame[at] = rng.byte();
            }
        }
    }
}

/// Whether the data plane's `got` is what the model wants (drops compared by verdict, their
/// reasons by the counters at the end); for an `Either`, the branch it matches.
fn matching<'a>(want: &'a Outcome, got: &Outcome) -> Option<&'a Outcome> {
    match (want, got) {
        (Outcome::Either(a, b), _) => matching(a, got).or_else(|| matching(b, got)),
        (Outcome::Drop(_), Outcome::Drop(_)) => Some(want),
        (Outcome::Answered(a, _), Outcome::Tx(b)) => (a == b).then_some(want),
        _ => (want == got).then_some(want),
    }
}

/// An empty network namespace for the run: its FIB knows no way anywhere, so a NAT
/// translation is left to the kernel (`XDP_PASS`) whatever the host's routes are.
struct EmptyNetns(String);

impl EmptyNetns {
    fn new() -> Result<Self> {
        let name = format!("lbx-fuzz-{}", std::process::id() % 10000);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        let made = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()?;
        ensure!(made.success(), "ip netns add {name}");
        Ok(EmptyNetns(name))
    }
}

impl Drop for EmptyNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

#[test]
fn the_data_plane_does_what_the_model_says_for_random_and_mutated_frames() -> Result<()> {
    let frames: u64 = match std::env::var("LB_FUZZ_FRAMES") {
        Ok(n) => n.parse().context("LB_FUZZ_FRAMES must be a number")?,
        Err(_) => 100_000,
    };
    let seed: u64 = match std::env::var("LB_FUZZ_SEED") {
        Ok(s) => s.parse().context("LB_FUZZ_SEED must be a number")?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    println!("fuzz: {frames} frames, seed {seed} (replay: LB_FUZZ_SEED={seed})");
    let netns = EmptyNetns::new()?;
    lb_tests::in_netns(&netns.0, move || fuzz(frames, seed))?
}

fn fuzz(frames: u64, seed: u64) -> Result<()> {
    let (mut dp, state, registry) = dataplane_for(CONFIG)?;
    let (config, _) = lb_tests::frames::registered(CONFIG)?;
    let mut model = Model {
        config,
        registry,
        state,
        nat: HashMap::new(),
        nat6: HashMap::new(),
    };
    let mut rng = Rng(seed);
    // Flows that come back, so that many frames meet a flow the table knows.
    let pool: Vec<Flow> = (0..256).map(|_| random_flow(&mut rng)).collect();
    let nat_requests: Vec<Flow> = pool.iter().filter(|f| f.nat()).copied().collect();
    let mut expected_drops: BTreeMap<u32, u64> = BTreeMap::new();
    let mut mismatches = Vec::new();
    // Frames the data plane passed (rewritten or not), sent on and dropped.
    let mut outcomes = [0u64; 3];
    let mut sent = 0u64;
    let mut check = |dp: &mut Dataplane, frame: &[u8], index: u64| -> Result<()> {
        let (verdict, out, _) = run_xdp(dp.program_mut(), frame, 1)
            .with_context(|| format!("frame {index}: the kernel refused the run"))?;
        let got = match verdict {
            XDP_PASS if out == frame => Outcome::Pass,
            XDP_PASS => Outcome::Rewritten(out),
            XDP_TX => Outcome::Tx(out),
            XDP_DROP => Outcome::Drop(DropReason::Malformed),
            _ => {
                mismatches.push(format!("frame {index}: verdict {verdict}, {:02x?}", frame));
                return Ok(());
            }
        };
        outcomes[match got {
            Outcome::Tx(_) => 1,
            Outcome::Drop(_) => 2,
            _ => 0,
        }] += 1;
        let want = model.expect(frame);
        match matching(&want, &got) {
            Some(Outcome::Drop(reason) | Outcome::Answered(_, reason)) => {
                *expected_drops.entry(*reason as u32).or_default() += 1;
            }
            Some(_) => {}
            None if mismatches.len() < 10 => mismatches.push(format!(
                "frame {index} {:02x?}:\n  model: {want:02x?}\n  lb:    {got:02x?}",
                frame
            )),
            None => {}
        }
        Ok(())
    };
    // Every cut of a few well-formed frames, then random and mutated ones: requests of flows
    // that come back and of new ones, replies to NAT requests, ICMP errors about flows, and
    // IPv6.
    for _ in 0..16 {
        let flow = rng.pick(&pool);
        let frame = frame_of(&mut rng, &flow);
        for len in 14..=frame.len() {
            check(&mut dp, &frame[..len], sent)?;
            sent += 1;
        }
    }
    while sent < frames {
        let mut frame = match rng.below(100) {
            0..15 if !nat_requests.is_empty() => {
                let reply = rng.pick(&nat_requests).reply(&mut rng);
                frame_of(&mut rng, &reply)
            }
            15..52 => {
                let flow = rng.pick(&pool);
                frame_of(&mut rng, &flow)
            }
            52..62 => frame6(&mut rng),
            62..70 => {
                let flow = rng.pick(&pool);
                error_about(&mut rng, &flow)
            }
            _ => {
                let flow = random_flow(&mut rng);
                frame_of(&mut rng, &flow)
            }
        };
        if rng.percent(40) {
            mutate(&mut rng, &mut frame);
        }
        check(&mut dp, &frame, sent)?;
        sent += 1;
    }
    // Each drop counted under the reason the model gives.
    let counted: BTreeMap<u32, u64> = dp
        .drops()?
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(r, n)| (r as u32, n))
        .collect();
    let [passed, sent_on, dropped] = outcomes;
    let translated = model.nat.len() + model.nat6.len();
    let icmp: BTreeMap<&str, u64> = dp
        .icmp_sent()?
        .into_iter()
        .map(|(kind, n)| (kind.name(), n))
        .collect();
    println!(
        "fuzz: {sent} frames: {passed} passed, {sent_on} sent on, {dropped} dropped (by reason \
         {counted:?}); {translated} NAT flows; ICMP sent {icmp:?}; {} mismatches",
        mismatches.len()
    );
    if !mismatches.is_empty() {
        bail!("seed {seed}: {}", mismatches.join("\n"));
    }
    ensure!(
        counted == expected_drops,
        "seed {seed}: drops counted {counted:?}, the model's {expected_drops:?}"
    );
    ensure!(
        passed > 0 && sent_on > 0 && dropped > 0 && translated > 0 && icmp.values().all(|&n| n > 0),
        "every outcome occurs"
    );
    Ok(())
}
