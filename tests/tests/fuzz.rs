//! The data plane against a reference model: random and mutated frames through
//! BPF_PROG_TEST_RUN, and for each the verdict and output frame compared with what a model,
//! written here from lb's documented behaviour, says the program must do. Needs root.
//!
//! `LB_FUZZ_FRAMES` frames (default 100,000; `cargo xtask fuzz` sends 1,000,000); the seed is
//! random and printed, and `LB_FUZZ_SEED` replays a run.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::{
    config::{self, Forwarding},
    lifecycle::Registry,
    maps::{Dataplane, MapState, be},
};
use lb_common::{DropReason, FlowKey, PROTO_TCP, PROTO_UDP, splitmix64};
use lb_tests::frames::{
    CLIENT_MAC, LB_ADDR, LB_MAC, XDP_DROP, XDP_PASS, XDP_TX, checksum, dataplane_for, ethernet,
    run_xdp, test_interface,
};

const PROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Every kind of listener the model knows: DSR with and without port translation, IPIP, NAT,
/// an allow-list, tcp_udp listeners, and a global deny-list. The connection table is large
/// enough that no flow is ever evicted, so a flow's target is its Maglev pick whether it is
/// new or not.
const CONFIG: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 1048576, max_target_groups: 5}
denied_sources: [192.0.2.128/25]
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}
  - {name: game, address: 203.0.113.10, port: 7777, protocol: udp, target_group: game}
  - {name: tunnel, address: 203.0.113.11, port: 5000, protocol: tcp_udp, target_group: tunnel}
  - name: guarded
    address: 203.0.113.12
    port: 443
    protocol: tcp
    target_group: guarded
    allowed_sources: [198.51.100.0/24]
  - {name: natted, address: 203.0.113.13, port: 8080, protocol: tcp_udp, target_group: natted}
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
";

/// The NAT group's targets and their port: the sources of replies.
const NAT_TARGETS: [[u8; 4]; 2] = [[198, 51, 100, 51], [198, 51, 100, 52]];
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
}

/// lb's data plane as its README and doc comments describe it, for `CONFIG`.
struct Model {
    config: config::Config,
    registry: Registry,
    state: MapState,
    /// The NAT flows a request was forwarded for, by their replies' 5-tuple (target, client,
    /// target port, client port, protocol): the VIP and port the replies are to come from.
    nat: HashMap<(Ipv4Addr, Ipv4Addr, u16, u16, u8), NatFlow>,
}

struct NatFlow {
    vip: Ipv4Addr,
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

    fn expect(&mut self, frame: &[u8]) -> Outcome {
        use Outcome::{Drop, Either, Pass, Rewritten, Tx};
        // Not IPv4 (or too short to be): not lb's to judge.
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return Pass;
        }
        let ip = &frame[14..];
        let proto = ip[9];
        if proto == PROTO_ICMP {
            return self.echo(frame);
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
        let denied = self.config.denied_sources.iter().any(|n| n.contains(&src));
        let allowed = listener
            .allowed_sources
            .as_ref()
            .is_none_or(|list| list.iter().any(|n| n.contains(&src)));
        if denied || !allowed {
            return Drop(DropReason::DeniedSource);
        }
        let group = self
            .config
            .target_groups
            .iter()
            .find(|g| g.name == listener.target_group)
            .expect("a listener's group");
        // Maglev: the slot the flow's hash chooses in the group's table.
        let key = FlowKey::new(be(src), be(dst), sport.to_be(), dport.to_be(), proto);
        let gid = self.registry.group_id(&group.name).expect("a group id");
        let settings = self.state.settings.expect("settings");
        let id = self.state.groups[&gid].table[settings.maglev_slot(&key) as usize];
        let target = self.state.targets[&id];

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
            Forwarding::Ipip => {
                if tot_len + 20 > test_interface().mtu as usize {
                    return Drop(DropReason::TooBig);
                }
                let mut outer = vec![0x45, ip[1]];
                outer.extend(((tot_len + 20) as u16).to_be_bytes());
                outer.extend([0, 0, ip[6] & 0x40, 0, ip[8], 4, 0, 0]);
                outer.extend(LB_ADDR.octets());
                outer.extend(target.addr.to_ne_bytes());
                let check = checksum(&outer);
                outer[10..12].copy_from_slice(&check.to_be_bytes());
                outer.extend(&out[14..]);
                Tx(ethernet(target.mac, LB_MAC, 0x0800, &outer))
            }
            Forwarding::Nat => unreachable!("translated above"),
        }
    }
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
const DESTINATIONS: [([u8; 4], u16, u8); 14] = [
    ([203, 0, 113, 10], 0, PROTO_ICMP),
    ([198, 51, 100, 11], 0, PROTO_ICMP),
    ([203, 0, 113, 13], 8080, PROTO_TCP),
    ([203, 0, 113, 13], 8080, PROTO_UDP),
    ([203, 0, 113, 10], 80, PROTO_TCP),
    ([203, 0, 113, 10], 7777, PROTO_UDP),
    ([203, 0, 113, 11], 5000, PROTO_TCP),
    ([203, 0, 113, 11], 5000, PROTO_UDP),
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
            Some(Outcome::Drop(reason)) => {
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
    // that come back and of new ones, and replies to NAT requests.
    for _ in 0..16 {
        let flow = rng.pick(&pool);
        let frame = frame_of(&mut rng, &flow);
        for len in 14..=frame.len() {
            check(&mut dp, &frame[..len], sent)?;
            sent += 1;
        }
    }
    while sent < frames {
        let flow = match rng.below(100) {
            0..15 if !nat_requests.is_empty() => rng.pick(&nat_requests).reply(&mut rng),
            15..70 => rng.pick(&pool),
            _ => random_flow(&mut rng),
        };
        let mut frame = frame_of(&mut rng, &flow);
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
    let translated = model.nat.len();
    println!(
        "fuzz: {sent} frames: {passed} passed, {sent_on} sent on, {dropped} dropped (by reason \
         {counted:?}); {translated} NAT flows; {} mismatches",
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
        passed > 0 && sent_on > 0 && dropped > 0 && translated > 0,
        "every outcome occurs"
    );
    Ok(())
}
