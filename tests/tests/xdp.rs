//! The balancer on crafted frames, through BPF_PROG_TEST_RUN: exact output bytes for dsr and
//! ipip, untouched pass-through for everything else, and the right verdict (and drop counter)
//! for truncated and malformed frames. Needs root.
//!
//! Maps are filled by the controller's own code (`config::parse` → `MapState::build` →
//! `Dataplane::write`), with made-up MACs instead of ARP.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use lb::{
    config,
    lifecycle::Registry,
    maps::{Dataplane, MapState},
};
use lb_common::{DropReason, IcmpCounter};
use lb_tests::frames::{
    CLIENT_MAC, CLIENT6, LB_ADDR, LB_MAC, Packet, Packet6, VIP, VIP6, XDP_DROP, XDP_PASS,
    XDP_REDIRECT, XDP_TX, checksum, dataplane_for, ethernet, icmp_frame, icmp_message,
    icmp6_message, l4_checksum_ok, mac_of, next_hop_of, registered, run_xdp, test_interface,
};

const CONFIG: &str = "
settings:
  maglev_table_size: 4099
  connection_table_size: 4096
  max_target_groups: 4
  hash_seed: 42
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}
  - {name: dns, address: 203.0.113.10, port: 53, protocol: tcp_udp, target_group: dns}
target_groups:
  - name: web
    forwarding: dsr
    targets:
      - {address: 198.51.100.11, port: 80}
      - {address: 198.51.100.12, port: 80}
      - {address: 198.51.100.13, port: 80}
  - name: dns
    forwarding: ipip
    targets:
      - {address: 198.51.100.21, port: 53}
      - {address: 198.51.100.22, port: 53, weight: 3}
";

fn load() -> Result<(Dataplane, MapState)> {
    let (dataplane, state, _) = dataplane_for(CONFIG)?;
    Ok((dataplane, state))
}

fn run(dataplane: &mut Dataplane, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let (verdict, out, _) = run_xdp(dataplane.program_mut(), frame, 1)?;
    Ok((verdict, out))
}

/// The target the data plane must pick for `packet` in group `group`: id and entry.
fn expected_target(state: &MapState, group: u32, packet: &Packet) -> (u32, lb_common::Target) {
    let slot = state.settings.unwrap().maglev_slot(&packet.key());
    let table = &state.groups[&group].table;
    let id = table[slot as usize];
    (id, state.targets[&id])
}

fn drops(dataplane: &Dataplane, reason: DropReason) -> Result<u64> {
    Ok(dataplane
        .drops()?
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| n))
}

// ---------------------------------------------------------------------------------------------

#[test]
fn dsr_rewrites_only_the_macs() -> Result<()> {
    let (mut dp, state) = load()?;
    for sport in [1024u16, 40000, 65535] {
        let packet = Packet::tcp(80, sport, 0x02);
        let frame = packet.frame();
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let (_, target) = expected_target(&state, 0, &packet);
        let mut expected = frame.clone();
        expected[0..6].copy_from_slice(&target.mac);
        expected[6..12].copy_from_slice(&LB_MAC);
        ensure!(
            out == expected,
            "sport {sport}: got {out:02x?}\nwant {expected:02x?}"
        );
    }
    Ok(())
}

#[test]
fn dsr_reads_ports_after_ip_options() -> Result<()> {
    let (mut dp, state) = load()?;
    let mut packet = Packet::tcp(80, 5555, 0x10);
    packet.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP END: IHL 6
    let frame = packet.frame();
    let (verdict, out) = run(&mut dp, &frame)?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let (_, target) = expected_target(&state, 0, &packet);
    ensure!(out[0..6] == target.mac && out[6..12] == LB_MAC && out[12..] == frame[12..]);
    Ok(())
}

#[test]
fn ipip_prepends_a_correct_outer_header() -> Result<()> {
    let (mut dp, state) = load()?;
    for (packet, df) in [
        (Packet::udp(53, 3333), false),
        (Packet::tcp(53, 4444, 0x02), true),
    ] {
        let inner = packet.ip_packet();
        let (verdict, out) = run(&mut dp, &packet.frame())?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let (_, target) = expected_target(&state, 1, &packet);

        let mut outer = vec![0x45, 0];
        outer.extend(((20 + inner.len()) as u16).to_be_bytes());
        outer.extend([0, 0]);
        outer.extend(if df { [0x40, 0] } else { [0, 0] });
        outer.extend([packet.ttl, 4, 0, 0]);
        outer.extend(LB_ADDR.octets());
        outer.extend(target.addr.to_ne_bytes());
        let check = checksum(&outer);
        outer[10..12].copy_from_slice(&check.to_be_bytes());
        let mut expected = ethernet(target.mac, LB_MAC, 0x0800, &outer);
        expected.extend(&inner);
        ensure!(out == expected, "got {out:02x?}\nwant {expected:02x?}");
        ensure!(
            checksum(&out[14..34]) == 0,
            "outer header checksum does not verify"
        );
        ensure!(
            state
                .targets
                .values()
                .any(|t| t.addr == target.addr && t.group == 1),
            "picked a target outside the group"
        );
    }
    Ok(())
}

/// A balancer on two interfaces (`lb run -i ext0 -i int0`) whose targets are behind the second:
/// frames for them are redirected there, from its MAC and, in ipip, its address.
#[test]
fn targets_behind_another_interface_get_frames_redirected_there() -> Result<()> {
    const INT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x33];
    const INT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
    let internal = lb::net::Interface {
        name: "int0".into(),
        index: 42,
        mac: INT_MAC,
        mtu: 1500,
        ipv4: vec![INT_ADDR],
        ipv6: Vec::new(),
    };
    let (config, registry) = registered(CONFIG)?;
    let state = MapState::build(&config, &registry, &[test_interface(), internal], |k| {
        Some(lb::maps::NextHop {
            interface: 1,
            ..next_hop_of(k)?
        })
    })?;
    let mut dp = Dataplane::load(&config.settings, None)?;
    dp.apply(&MapState::default(), &state)?;

    let packet = Packet::tcp(80, 4000, 0x02);
    let (verdict, out) = run(&mut dp, &packet.frame())?;
    let (_, target) = expected_target(&state, 0, &packet);
    ensure!(verdict == XDP_REDIRECT, "dsr verdict {verdict}");
    ensure!(
        out[0..6] == target.mac && out[6..12] == INT_MAC,
        "dsr MACs {:02x?}",
        &out[0..12]
    );

    let packet = Packet::udp(53, 3333);
    let (verdict, out) = run(&mut dp, &packet.frame())?;
    ensure!(verdict == XDP_REDIRECT, "ipip verdict {verdict}");
    ensure!(
        out[6..12] == INT_MAC,
        "ipip source MAC {:02x?}",
        &out[6..12]
    );
    ensure!(
        out[26..30] == INT_ADDR.octets(),
        "outer source {:?}",
        &out[26..30]
    );
    Ok(())
}

/// The L4 switch's example: :80 to port 30080 in dsr, :6800 (tcp and udp) to 18600 in ipip.
const TRANSLATED: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: g1}
  - {name: game, address: 203.0.113.10, port: 6800, protocol: tcp_udp, target_group: g2}
  - {name: turns, address: 203.0.113.10, port: 8080, protocol: tcp, target_group: turns}
target_groups:
  - name: g1
    port: 30080
    targets: [{address: 198.51.100.11}, {address: 198.51.100.12}]
  - name: g2
    forwarding: ipip
    port: 18600
    targets: [{address: 198.51.100.12}, {address: 198.51.100.13}]
  - name: turns
    algorithm: round_robin
    targets: [{address: 198.51.100.11, port: 8080}, {address: 198.51.100.12, port: 8080}]
";

/// The packet as the target must receive it: the same, to the target's port, with the checksum
/// a sender would have computed for that (built independently of the data plane).
fn to_port(packet: &Packet, port: u16) -> Packet {
    Packet {
        dport: port,
        ..packet.clone()
    }
}

#[test]
fn translated_ports_are_rewritten_with_valid_checksums_in_dsr_and_ipip() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(TRANSLATED)?;
    let mut no_checksum = Packet::udp(6800, 3001);
    no_checksum.udp_checksum = false;
    let cases = [
        (Packet::tcp(80, 1024, 0x02), 30080, 0),
        (Packet::tcp(80, 40000, 0x10), 30080, 0),
        (Packet::tcp(6800, 2000, 0x02), 18600, 1),
        (Packet::udp(6800, 3000), 18600, 1),
        (no_checksum, 18600, 1),
    ];
    for (packet, port, group) in cases {
        ensure!(l4_checksum_ok(&packet.ip_packet()), "the test's own input");
        let (verdict, out) = run(&mut dp, &packet.frame())?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let (_, target) = expected_target(&state, group, &packet);
        ensure!(u16::from_be(target.port) == port);
        let want = to_port(&packet, port);
        let inner = if group == 0 {
            ensure!(out[0..6] == target.mac && out[6..12] == LB_MAC);
            &out[14..]
        } else {
            ensure!(out[23] == 4 && out[30..34] == target.addr.to_ne_bytes());
            &out[34..]
        };
        ensure!(
            inner == want.ip_packet(),
            "{packet:?}\ngot  {inner:02x?}\nwant {:02x?}",
            want.ip_packet()
        );
        ensure!(
            l4_checksum_ok(inner),
            "the translated checksum does not verify"
        );
        if !packet.udp_checksum {
            ensure!(
                inner[26..28] == [0, 0],
                "a UDP packet without checksum got one"
            );
        }
    }
    Ok(())
}

#[test]
fn tcp_udp_listener_takes_both_protocols() -> Result<()> {
    let (mut dp, _) = load()?;
    for packet in [Packet::udp(53, 1000), Packet::tcp(53, 1000, 0x02)] {
        ensure!(run(&mut dp, &packet.frame())?.0 == XDP_TX);
    }
    // Port 80 is tcp only.
    ensure!(run(&mut dp, &Packet::udp(80, 1000).frame())?.0 == XDP_DROP);
    Ok(())
}

#[test]
fn traffic_not_for_a_vip_passes_unchanged() -> Result<()> {
    let (mut dp, _) = load()?;
    let mut to_host = Packet::tcp(22, 50000, 0x02);
    to_host.dst = LB_ADDR;
    let mut elsewhere = Packet::udp(53, 50000);
    elsewhere.dst = Ipv4Addr::new(198, 51, 100, 99);
    let arp = ethernet([0xff; 6], CLIENT_MAC, 0x0806, &[0u8; 28]);
    let ipv6 = ethernet(LB_MAC, CLIENT_MAC, 0x86dd, &[0x60; 60]);
    let mut icmp_to_vip = Packet::tcp(80, 1, 0).ip_packet();
    icmp_to_vip[9] = 1;
    let icmp_to_vip = ethernet(LB_MAC, CLIENT_MAC, 0x0800, &icmp_to_vip);
    for frame in [to_host.frame(), elsewhere.frame(), arp, ipv6, icmp_to_vip] {
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_PASS, "verdict {verdict} for {frame:02x?}");
        ensure!(out == frame, "frame changed");
    }
    Ok(())
}

#[test]
fn vip_port_without_listener_is_dropped_and_counted() -> Result<()> {
    let (mut dp, _) = load()?;
    let before = drops(&dp, DropReason::NoListener)?;
    for frame in [
        Packet::tcp(443, 1000, 0x02).frame(),
        Packet::udp(8080, 1000).frame(),
    ] {
        ensure!(run(&mut dp, &frame)?.0 == XDP_DROP);
    }
    ensure!(drops(&dp, DropReason::NoListener)? == before + 2);
    Ok(())
}

#[test]
fn truncated_frames_never_crash_and_get_the_right_verdict() -> Result<()> {
    let (mut dp, _) = load()?;
    for packet in [Packet::tcp(80, 1234, 0x10), Packet::udp(53, 1234)] {
        let frame = packet.frame();
        let before = drops(&dp, DropReason::Malformed)?;
        // The kernel hands XDP no frame shorter than an Ethernet header.
        for len in 14..frame.len() {
            let (verdict, _) = run(&mut dp, &frame[..len])?;
            // Without a full IPv4 header nobody can tell the frame is for a VIP: the stack
            // decides. From there on, the IP length no longer fits: a malformed VIP packet.
            let want = if len < 34 { XDP_PASS } else { XDP_DROP };
            ensure!(
                verdict == want,
                "length {len}: verdict {verdict}, want {want}"
            );
        }
        let dropped = (frame.len() - 34) as u64;
        ensure!(drops(&dp, DropReason::Malformed)? == before + dropped);
        ensure!(run(&mut dp, &frame)?.0 == XDP_TX);
    }
    Ok(())
}

#[test]
fn malformed_and_fragmented_vip_packets_are_dropped_and_counted() -> Result<()> {
    let (mut dp, _) = load()?;
    let good = Packet::tcp(80, 999, 0x10).frame();
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    let mut short_total = good.clone();
    short_total[16..18].copy_from_slice(&30u16.to_be_bytes());
    let mut huge_ihl = good.clone();
    huge_ihl[14] = 0x4f; // 60-byte header: the TCP header no longer fits
    let before = drops(&dp, DropReason::Malformed)?;
    for frame in [&bad_ihl, &bad_version, &short_total, &huge_ihl] {
        ensure!(run(&mut dp, frame)?.0 == XDP_DROP, "{frame:02x?}");
    }
    ensure!(drops(&dp, DropReason::Malformed)? == before + 4);

    let mut first = Packet::udp(53, 7);
    first.frag_field = Some(0x2000); // more fragments
    let mut later = Packet::udp(53, 7);
    later.frag_field = Some(0x0010); // offset 128 bytes
    for frame in [first.frame(), later.frame()] {
        ensure!(run(&mut dp, &frame)?.0 == XDP_DROP);
    }
    ensure!(drops(&dp, DropReason::Fragment)? == 2);
    Ok(())
}

#[test]
fn connection_table_keeps_flows_and_ignores_stray_resets() -> Result<()> {
    let (mut dp, state) = load()?;
    let ack = Packet::tcp(80, 2000, 0x10);
    ensure!(dp.flow(&ack.key()).is_none());
    ensure!(run(&mut dp, &ack.frame())?.0 == XDP_TX);
    let flow = dp
        .flow(&ack.key())
        .ok_or_else(|| anyhow::anyhow!("no flow entry"))?;
    ensure!(flow.target == expected_target(&state, 0, &ack).0);

    let rst = Packet::tcp(80, 2001, 0x04);
    ensure!(run(&mut dp, &rst.frame())?.0 == XDP_TX);
    ensure!(dp.flow(&rst.key()).is_none(), "an RST created a flow");

    let udp = Packet::udp(53, 2002);
    run(&mut dp, &udp.frame())?;
    ensure!(
        dp.flow(&udp.key()).is_some(),
        "a UDP flow was not remembered"
    );
    Ok(())
}

/// A flow is forgotten only when both of its buckets are full, and then it is the least
/// recently seen of their embryonic entries that goes (flows that sent one packet each): a flow
/// that keeps sending outlives newer ones that went quiet.
#[test]
fn full_flow_buckets_forget_their_least_recently_seen_flow() -> Result<()> {
    let (mut dp, state) = load()?;
    let first = Packet::tcp(80, 5000, 0x10);
    let slots = 2 * lb_common::FLOW_WAYS;
    let same = sharing_buckets(&dp, &first, slots)?;

    run(&mut dp, &first.frame())?;
    // Last-seen times move in steps of one second (the data plane refreshes them no more often).
    std::thread::sleep(Duration::from_millis(1100));
    for p in &same[..slots - 1] {
        run(&mut dp, &p.frame())?;
    }
    ensure!(present(&dp, &first) && same[..slots - 1].iter().all(|p| present(&dp, p)));
    std::thread::sleep(Duration::from_millis(1100));
    run(&mut dp, &first.frame())?; // still active: refreshed
    run(&mut dp, &same[slots - 1].frame())?; // one flow more than both buckets hold
    ensure!(present(&dp, &first), "the active flow was forgotten");
    ensure!(
        present(&dp, &same[slots - 1]),
        "the new flow was not remembered"
    );
    let forgotten = same.iter().filter(|p| !present(&dp, p)).count();
    ensure!(forgotten == 1, "{forgotten} quiet flows forgotten, not one");
    // The forgotten flow no longer counts as a connection of its target: of 9, 8 remain.
    let connections: u64 = state
        .targets
        .keys()
        .map(|&id| dp.active_connections(id))
        .sum();
    ensure!(
        connections == slots as u64,
        "{connections} active connections"
    );
    Ok(())
}

#[test]
fn counters_follow_listener_and_target() -> Result<()> {
    let (mut dp, state) = load()?;
    let packet = Packet::tcp(80, 3000, 0x02);
    let frame = packet.frame();
    for _ in 0..3 {
        run(&mut dp, &frame)?;
    }
    let listener = dp.listener_counters(0)?;
    ensure!(listener.packets == 3 && listener.bytes == 3 * frame.len() as u64);
    ensure!(
        listener.new_flows == 1,
        "a retransmitted SYN is the same flow: {listener:?}"
    );
    let (id, _) = expected_target(&state, 0, &packet);
    ensure!(dp.target_counters(id)?.packets == 3);
    Ok(())
}

const ALGORITHMS: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: rr, address: 203.0.113.10, port: 80, protocol: tcp, target_group: rr}
  - {name: sip, address: 203.0.113.10, port: 53, protocol: udp, target_group: sip}
target_groups:
  - name: rr
    algorithm: round_robin
    port: 80
    targets:
      - {address: 198.51.100.11, weight: 2}
      - {address: 198.51.100.12}
      - {address: 198.51.100.13}
  - name: sip
    algorithm: source_ip
    forwarding: ipip
    port: 53
    targets: [{address: 198.51.100.21}, {address: 198.51.100.22}, {address: 198.51.100.23}]
";

/// The target a frame was sent to, by its destination MAC.
fn sent_to(state: &MapState, out: &[u8]) -> Option<u32> {
    state
        .targets
        .iter()
        .find(|(_, t)| out[0..6] == t.mac)
        .map(|(&id, _)| id)
}

/// Round robin: new flows take the targets in the smooth weighted sequence (2:1:1 is a b c a),
/// one after another; a retransmitted SYN keeps its target and takes no turn.
#[test]
fn round_robin_takes_the_sequence_and_a_retransmitted_syn_keeps_its_target() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(ALGORITHMS)?;
    let sequence = &state.groups[&0].table;
    ensure!(sequence.len() == 4, "sequence {sequence:?}");
    let mut taken = Vec::new();
    for sport in 4000..4012u16 {
        let syn = Packet::tcp(80, sport, 0x02);
        let (verdict, out) = run(&mut dp, &syn.frame())?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let id = sent_to(&state, &out).context("sent to no target")?;
        taken.push(id);
        // The same SYN again (its SYN-ACK was lost): the same target, and no turn taken.
        let (_, again) = run(&mut dp, &syn.frame())?;
        ensure!(
            sent_to(&state, &again) == Some(id),
            "flow {sport}: the retransmitted SYN moved"
        );
    }
    let want: Vec<u32> = sequence.iter().cycle().take(12).copied().collect();
    ensure!(
        taken == want,
        "took {taken:?}, the sequence is {sequence:?}"
    );
    let mut turns: Vec<usize> = state
        .targets
        .keys()
        .map(|id| sequence.iter().filter(|&s| s == id).count())
        .filter(|&n| n > 0)
        .collect();
    turns.sort();
    ensure!(
        turns == [1, 1, 2],
        "2:1:1 takes {turns:?} turns: {sequence:?}"
    );
    Ok(())
}

/// source_ip: every flow of a client goes to one target, the one its address alone hashes to.
#[test]
fn source_ip_sends_every_flow_of_a_client_to_one_target() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(ALGORITHMS)?;
    let settings = state.settings.context("settings")?;
    let mut seen = std::collections::BTreeSet::new();
    for host in 1..=30u8 {
        let client = Ipv4Addr::new(192, 0, 2, host);
        let slot = settings.maglev_slot(&lb_common::FlowKey::new(
            u32::from_ne_bytes(client.octets()),
            0,
            0,
            0,
            0,
        ));
        let want = state.groups[&1].table[slot as usize];
        for sport in [1000u16, 2000, 3000] {
            let mut packet = Packet::udp(53, sport);
            packet.src = client;
            let (verdict, out) = run(&mut dp, &packet.frame())?;
            ensure!(verdict == XDP_TX, "verdict {verdict}");
            ensure!(
                sent_to(&state, &out) == Some(want),
                "{client}:{sport} went elsewhere"
            );
        }
        seen.insert(want);
    }
    ensure!(seen.len() == 3, "30 clients met only {seen:?}");
    Ok(())
}

/// A listener `web` (TCP :80, with `listener_extra`) over a group (with `group_extra`) of
/// targets 198.51.100.`before`, then of `after`: the first config and the map states of both,
/// built with one registry, as a reload builds them.
fn group_change(
    listener_extra: &str,
    group_extra: &str,
    before: &[u8],
    after: &[u8],
) -> Result<(config::Config, MapState, MapState)> {
    let config_for = |hosts: &[u8]| -> Result<config::Config> {
        let targets: String = hosts
            .iter()
            .map(|h| format!("      - {{address: 198.51.100.{h}}}\n"))
            .collect();
        let text = format!(
            "settings: {{maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 2}}\n\
             listeners:\n  - {{name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web{listener_extra}}}\n\
             target_groups:\n  - name: web\n    port: 80\n{group_extra}    targets:\n{targets}"
        );
        config::parse(Path::new("change.yaml"), &text).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let iface = [test_interface()];
    let (before, after) = (config_for(before)?, config_for(after)?);
    let mut registry = Registry::new(4, 2, 8);
    let now = std::time::Instant::now();
    registry.sync(&before, now).map_err(anyhow::Error::msg)?;
    let state_a = MapState::build(&before, &registry, &iface, next_hop_of)?;
    registry.sync(&after, now).map_err(anyhow::Error::msg)?;
    let state_b = MapState::build(&after, &registry, &iface, next_hop_of)?;
    Ok((before, state_a, state_b))
}

#[test]
fn idle_flows_are_picked_again_and_active_ones_keep_their_target() -> Result<()> {
    let (before, state_a, state_b) =
        group_change(", idle_timeout: 1s", "", &[11, 12, 13], &[11, 12, 13, 14])?;

    // A flow that the new table would send elsewhere.
    let packet = (1000..2000)
        .map(|sport| Packet::tcp(80, sport, 0x10))
        .find(|p| expected_target(&state_a, 0, p).0 != expected_target(&state_b, 0, p).0)
        .expect("adding a target moves some flows");
    let (old_id, old) = expected_target(&state_a, 0, &packet);
    let (new_id, new) = expected_target(&state_b, 0, &packet);

    let mut dp = Dataplane::load(&before.settings, None)?;
    dp.apply(&MapState::default(), &state_a)?;
    let (_, out) = run(&mut dp, &packet.frame())?;
    ensure!(out[0..6] == old.mac);
    dp.apply(&state_a, &state_b)?;
    // Still active: the flow keeps its target although the table changed.
    let (_, out) = run(&mut dp, &packet.frame())?;
    ensure!(out[0..6] == old.mac && dp.flow(&packet.key()).map(|f| f.target) == Some(old_id));
    // Idle past the listener's 1 s timeout: a new flow, picked from the new table.
    std::thread::sleep(Duration::from_millis(1500));
    let (_, out) = run(&mut dp, &packet.frame())?;
    ensure!(out[0..6] == new.mac, "an idle flow kept its old target");
    ensure!(dp.flow(&packet.key()).map(|f| f.target) == Some(new_id));
    Ok(())
}

#[test]
fn flows_leave_a_target_that_turns_unhealthy_and_no_other_flow_moves() -> Result<()> {
    let (config, mut registry) = registered(CONFIG)?;
    let iface = [test_interface()];
    let keys: Vec<_> = registry
        .targets()
        .map(|(k, _)| k.clone())
        .filter(|k| k.group == "web")
        .collect();
    for key in &keys {
        registry.record(key, true, 1, 1);
    }
    let healthy = MapState::build(&config, &registry, &iface, next_hop_of)?;
    let mut dp = Dataplane::load(&config.settings, None)?;
    dp.apply(&MapState::default(), &healthy)?;

    // Established flows (not SYNs) spread over the three web targets.
    let flows: Vec<Packet> = (3000..3060)
        .map(|sport| Packet::tcp(80, sport, 0x10))
        .collect();
    let mut before = Vec::new();
    for p in &flows {
        let (_, out) = run(&mut dp, &p.frame())?;
        before.push(out[0..6].to_vec());
    }
    let sick = &keys[0];
    let sick_mac = mac_of(sick.addr.ip()).to_vec();
    ensure!(
        before.contains(&sick_mac),
        "no flow on the target that will fail"
    );

    registry.record(sick, false, 1, 1);
    let degraded = MapState::build(&config, &registry, &iface, next_hop_of)?;
    dp.apply(&healthy, &degraded)?;
    for (p, was) in flows.iter().zip(&before) {
        let (_, out) = run(&mut dp, &p.frame())?;
        if *was == sick_mac {
            ensure!(
                out[0..6] != sick_mac[..],
                "a flow stayed on the unhealthy target"
            );
        } else {
            ensure!(out[0..6] == was[..], "a flow on a healthy target moved");
        }
    }

    // From the third write on, only the slots that differ from what a table half holds are
    // written. New flows must follow the intended table exactly.
    // Each step gives a table unlike the one the half it goes into holds.
    let mut current = degraded;
    for (key, ok) in [(&keys[0], true), (&keys[1], false), (&keys[2], false)] {
        registry.record(key, ok, 1, 1);
        let next = MapState::build(&config, &registry, &iface, next_hop_of)?;
        dp.apply(&current, &next)?;
        for sport in 4000..4100 {
            let syn = Packet::tcp(80, sport, 0x02);
            let (_, out) = run(&mut dp, &syn.frame())?;
            let (_, want) = expected_target(&next, 0, &syn);
            ensure!(
                out[0..6] == want.mac,
                "after a diff write the table is not the intended one"
            );
        }
        current = next;
    }
    Ok(())
}

const NAT: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: app}
  - {name: game, address: 203.0.113.10, port: 6800, protocol: udp, target_group: app}
  - {name: plain, address: 203.0.113.10, port: 443, protocol: tcp, target_group: dsr}
target_groups:
  - name: app
    forwarding: nat
    port: 30080
    targets: [{address: 198.51.100.21}, {address: 198.51.100.22}]
  - name: dsr
    targets: [{address: 198.51.100.31, port: 443}]
";

/// A reply of `target` (address, port) to the client of `request`.
fn reply_to(request: &Packet, addr: Ipv4Addr, port: u16, flags: u8) -> Packet {
    Packet {
        src: addr,
        dst: request.src,
        sport: port,
        dport: request.sport,
        tcp_flags: flags,
        ..request.clone()
    }
}

/// A namespace where the kernel's FIB knows the way, as a NAT balancer's does: the targets on
/// a veth interface with their made-up MACs as neighbours, the client behind a router there;
/// in IPv4 and IPv6.
struct Routed(String);

const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const TARGET6_1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x21);
const TARGET6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x22);

impl Routed {
    fn new() -> Result<Self> {
        // One per test: tests run in parallel.
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("lbx-fib-{}-{made}", std::process::id() % 10000);
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let routed = Routed(name.clone());
        let ip = |args: &str| -> Result<()> {
            let status = Command::new("ip")
                .args(["-n", &name])
                .args(args.split_whitespace())
                .status()?;
            ensure!(status.success(), "ip {args}");
            Ok(())
        };
        ensure!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()?
                .success()
        );
        ip("link add d0 type veth peer name d1")?;
        ip("link set d1 up")?;
        ip("addr add 198.51.100.3/24 dev d0")?;
        ip("link set d0 up")?;
        for host in [21u8, 22, 1] {
            let addr = Ipv4Addr::new(198, 51, 100, host);
            let mac = if host == 1 { ROUTER_MAC } else { mac_of(addr) };
            let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            ip(&format!("neigh add {addr} lladdr {} dev d0", mac.join(":")))?;
        }
        ip("route add 192.0.2.0/24 via 198.51.100.1")?;
        ip("-6 addr add 2001:db8:1::3/64 dev d0 nodad")?;
        for (addr, mac) in [
            (TARGET6_1, mac_of(TARGET6_1)),
            (TARGET6_2, mac_of(TARGET6_2)),
            (ROUTER6, ROUTER_MAC),
        ] {
            let mac: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            ip(&format!(
                "-6 neigh add {addr} lladdr {} dev d0",
                mac.join(":")
            ))?;
        }
        ip(&format!("-6 route add 2001:db8:c::/48 via {ROUTER6}"))?;
        // A FIB lookup for a packet that is passing through answers only where forwarding is on.
        for setting in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            let status = Command::new("ip")
                .args(["netns", "exec", &name, "sysctl", "-qw", setting])
                .status()?;
            ensure!(status.success(), "sysctl {setting}");
        }
        Ok(routed)
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn nat_rewrites_requests_to_the_target_and_replies_back_to_the_vip() -> Result<()> {
    let routed = Routed::new()?;
    lb_tests::in_netns(&routed.0, nat_both_ways)?
}

fn nat_both_ways() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(NAT)?;
    let mut no_checksum = Packet::udp(6800, 5002);
    no_checksum.udp_checksum = false;
    for request in [
        Packet::tcp(80, 5000, 0x02),
        Packet::udp(6800, 5001),
        no_checksum,
    ] {
        // Routed by the FIB: to the veth interface (not the one it came in on, so a redirect),
        // with the target's MAC from the neighbour table.
        let (verdict, out) = run(&mut dp, &request.frame())?;
        ensure!(verdict == XDP_REDIRECT, "verdict {verdict}");
        let (_, target) = expected_target(&state, 0, &request);
        let addr = Ipv4Addr::from(target.addr.to_ne_bytes());
        // To the target's address and port; the client's address stays.
        let want = Packet {
            dst: addr,
            dport: 30080,
            ..request.clone()
        };
        ensure!(out[0..6] == target.mac, "{:02x?}", &out[0..12]);
        ensure!(
            out[14..] == want.ip_packet()[..],
            "request\ngot  {:02x?}\nwant {:02x?}",
            &out[14..],
            want.ip_packet()
        );
        ensure!(checksum(&out[14..34]) == 0 && l4_checksum_ok(&out[14..]));

        // The reply comes back through the balancer and leaves from VIP:listener-port, towards
        // the client's router.
        let reply = reply_to(&request, addr, 30080, 0x12);
        let (verdict, out) = run(&mut dp, &reply.frame())?;
        ensure!(verdict == XDP_REDIRECT, "reply verdict {verdict}");
        ensure!(out[0..6] == ROUTER_MAC, "{:02x?}", &out[0..12]);
        let want = Packet {
            src: request.dst,
            sport: request.dport,
            ..reply.clone()
        };
        ensure!(
            out[14..] == want.ip_packet()[..],
            "reply\ngot  {:02x?}\nwant {:02x?}",
            &out[14..],
            want.ip_packet()
        );
        ensure!(checksum(&out[14..34]) == 0 && l4_checksum_ok(&out[14..]));
        if !request.udp_checksum {
            ensure!(
                out[40..42] == [0, 0],
                "a UDP reply without checksum got one"
            );
        }
    }
    Ok(())
}

/// An ICMP error from `src` to `dst` (type, code, the 4 bytes after the checksum) quoting
/// `quoted`, in a frame to the balancer.
fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: [u8; 2],
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let [a, b, c, d] = rest;
    icmp_message(src, dst, 64, [kind[0], kind[1], 0, 0, a, b, c, d], quoted)
}

/// Checks an ICMP error the balancer sent: both checksums verify, it goes from `src` to `dst`
/// (at the MAC `mac`), and it quotes exactly `quoted`.
fn ensure_icmp(
    out: &[u8],
    mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    quoted: &[u8],
) -> Result<()> {
    ensure!(out[0..6] == mac, "to {:02x?}", &out[0..6]);
    ensure!(checksum(&out[14..34]) == 0, "outer IPv4 checksum");
    ensure!(checksum(&out[34..]) == 0, "ICMP checksum");
    ensure!(
        out[26..30] == src.octets() && out[30..34] == dst.octets(),
        "outer {:?}",
        &out[26..34]
    );
    ensure!(
        out[42..] == *quoted,
        "quote\ngot  {:02x?}\nwant {:02x?}",
        &out[42..],
        quoted
    );
    Ok(())
}

/// ICMP errors about NAT flows cross the balancer translated like the flow: a target's port
/// unreachable reaches the client about the packet the client sent; a router's "fragmentation
/// needed" about a reply reaches the target about the packet the target sent.
#[test]
fn icmp_errors_about_nat_flows_are_translated_in_both_headers() -> Result<()> {
    let routed = Routed::new()?;
    lb_tests::in_netns(&routed.0, nat_icmp_errors)?
}

fn nat_icmp_errors() -> Result<()> {
    const PORT_UNREACHABLE: [u8; 2] = [3, 3];
    const FRAG_NEEDED: [u8; 2] = [3, 4];
    let (mut dp, state, _) = dataplane_for(NAT)?;
    let router = Ipv4Addr::new(192, 0, 2, 1);
    for request in [Packet::udp(6800, 5100), Packet::tcp(80, 5101, 0x02)] {
        let (_, to_target) = run(&mut dp, &request.frame())?;
        let (_, target) = expected_target(&state, 0, &request);
        let addr = Ipv4Addr::from(target.addr.to_ne_bytes());

        // The target's error quotes the request as it arrived there; the client gets it from
        // the VIP, quoting the request as the client sent it. A quote of only 8 bytes past
        // the IPv4 header (RFC 792's minimum) leaves TCP's checksum out: that quote too.
        let sent = request.ip_packet();
        for cut in [to_target.len() - 14, 28] {
            let error = icmp_error(
                addr,
                request.src,
                PORT_UNREACHABLE,
                [0; 4],
                &to_target[14..14 + cut],
            );
            let (verdict, out) = run(&mut dp, &error)?;
            ensure!(verdict == XDP_REDIRECT, "verdict {verdict}");
            ensure_icmp(&out, ROUTER_MAC, request.dst, request.src, &sent[..cut])?;
        }

        // A router on the client's side cannot pass the reply on: its error goes to the VIP,
        // and on to the target, quoting the reply as the target sent it.
        let reply = reply_to(&request, addr, 30080, 0x12);
        let (_, to_client) = run(&mut dp, &reply.frame())?;
        let mtu = [0, 0, 0x05, 0x78];
        let error = icmp_error(router, request.dst, FRAG_NEEDED, mtu, &to_client[14..]);
        let (verdict, out) = run(&mut dp, &error)?;
        ensure!(verdict == XDP_REDIRECT, "verdict {verdict}");
        ensure_icmp(&out, target.mac, router, addr, &reply.ip_packet())?;
        ensure!(out[38..42] == mtu, "the MTU changed");
    }

    // Errors about no flow: one to a client (about a request to a target that was never
    // asked) is the kernel's; one to the VIP (about a reply to another client port) is dropped
    // and counted.
    let stray = Packet::udp(6800, 5199);
    let quote = Packet {
        dst: Ipv4Addr::new(198, 51, 100, 21),
        dport: 30080,
        ..stray.clone()
    };
    let to_client = icmp_error(
        quote.dst,
        stray.src,
        PORT_UNREACHABLE,
        [0; 4],
        &quote.ip_packet(),
    );
    let (verdict, out) = run(&mut dp, &to_client)?;
    ensure!(
        verdict == XDP_PASS && out == to_client,
        "an error to a client about no flow was touched"
    );
    let to_vip = icmp_error(
        router,
        stray.dst,
        FRAG_NEEDED,
        [0; 4],
        &reply_to(&stray, stray.dst, 6800, 0).ip_packet(),
    );
    let (verdict, _) = run(&mut dp, &to_vip)?;
    ensure!(verdict == XDP_DROP, "verdict {verdict}");
    ensure!(drops(&dp, DropReason::IcmpUnmatched)? == 1);
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToTarget)? == 2);
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToClient)? == 4);
    Ok(())
}

/// A router between a DSR or IPIP target and the client cannot pass a reply on: its error goes
/// to the VIP (the reply's source), and the balancer sends it to the flow's target, whose
/// stack then lowers its path MTU. Under port translation the quote is made to name the
/// target's own port, as its socket knows it. An error about a flow the table does not hold
/// goes where the hash places it; under round robin, which has no such place, it is dropped
/// and counted, as is an error about no listener.
#[test]
fn icmp_errors_about_replies_go_to_the_flows_target() -> Result<()> {
    const FRAG_NEEDED: [u8; 2] = [3, 4];
    const MTU: [u8; 4] = [0, 0, 0x05, 0x00];
    let (mut dp, state, _) = dataplane_for(TRANSLATED)?;
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let mut long_reply = Packet::tcp(80, 0, 0x10);
    long_reply.payload = vec![0x5a; 1400];
    let cases = [
        (Packet::tcp(80, 5000, 0x02), 0, 30080),
        (Packet::tcp(6800, 5001, 0x02), 1, 18600),
        (Packet::udp(6800, 5002), 1, 18600),
    ];
    let mut forwarded = 0;
    for (request, group, target_port) in cases {
        run(&mut dp, &request.frame())?;
        let (_, target) = expected_target(&state, group, &request);
        // The reply left the target from VIP:listener-port; the router quotes all of it, or
        // only RFC 792's 8 bytes past the IPv4 header.
        let reply = Packet {
            payload: long_reply.payload.clone(),
            ..reply_to(&request, VIP, request.dport, 0x10)
        };
        let as_target_knows = reply_to(&request, VIP, target_port, 0x10);
        let as_target_knows = Packet {
            payload: reply.payload.clone(),
            ..as_target_knows
        };
        for cut in [reply.ip_packet().len(), 28] {
            let error = icmp_error(router, VIP, FRAG_NEEDED, MTU, &reply.ip_packet()[..cut]);
            let want = icmp_error(
                router,
                VIP,
                FRAG_NEEDED,
                MTU,
                &as_target_knows.ip_packet()[..cut],
            );
            let (verdict, out) = run(&mut dp, &error)?;
            ensure!(verdict == XDP_TX, "verdict {verdict}");
            forwarded += 1;
            let inner = if group == 0 {
                ensure!(out[0..6] == target.mac && out[6..12] == LB_MAC);
                &out[14..]
            } else {
                ensure!(out[23] == 4 && out[30..34] == target.addr.to_ne_bytes());
                ensure!(checksum(&out[14..34]) == 0, "outer IPv4 checksum");
                &out[34..]
            };
            ensure!(
                inner == &want[14..],
                "{request:?} cut {cut}\ngot  {inner:02x?}\nwant {:02x?}",
                &want[14..]
            );
            ensure!(checksum(&inner[20..]) == 0, "ICMP checksum");
        }
    }

    // A flow this balancer never saw (another node's, or one it forgot): the hash's target.
    let unknown = Packet::tcp(80, 5100, 0x10);
    let (_, target) = expected_target(&state, 0, &unknown);
    let quote = reply_to(&unknown, VIP, 80, 0x10).ip_packet();
    let (verdict, out) = run(&mut dp, &icmp_error(router, VIP, FRAG_NEEDED, MTU, &quote))?;
    ensure!(
        verdict == XDP_TX && out[0..6] == target.mac,
        "verdict {verdict}"
    );
    forwarded += 1;
    // A round-robin flow the table holds: its error reaches the target the table remembers,
    // which no hash could tell.
    let turn = Packet::tcp(8080, 5300, 0x02);
    let (_, out) = run(&mut dp, &turn.frame())?;
    let remembered = out[0..6].to_vec();
    let quote = reply_to(&turn, VIP, 8080, 0x10).ip_packet();
    let (verdict, out) = run(&mut dp, &icmp_error(router, VIP, FRAG_NEEDED, MTU, &quote))?;
    ensure!(
        verdict == XDP_TX && out[0..6] == remembered[..],
        "verdict {verdict}"
    );
    forwarded += 1;
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToTarget)? == forwarded);

    // Dropped and counted: under round robin, and about a port without a listener.
    let turns = Packet::tcp(8080, 5200, 0x10);
    let no_listener = Packet::tcp(8443, 5201, 0x10);
    for unmatched in [turns, no_listener] {
        let quote = reply_to(&unmatched, VIP, unmatched.dport, 0x10).ip_packet();
        let (verdict, _) = run(&mut dp, &icmp_error(router, VIP, FRAG_NEEDED, MTU, &quote))?;
        ensure!(verdict == XDP_DROP, "{unmatched:?}: verdict {verdict}");
    }
    ensure!(drops(&dp, DropReason::IcmpUnmatched)? == 2);
    // Not sent to the VIP: the kernel's.
    let error = icmp_error(router, LB_ADDR, FRAG_NEEDED, MTU, &quote);
    ensure!(run(&mut dp, &error)? == (XDP_PASS, error.clone()));
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToTarget)? == forwarded);
    Ok(())
}

/// A packet that would exceed the MTU once encapsulated, with DF set, is answered with
/// "fragmentation needed" from the VIP, carrying the MTU less the outer header and quoting the
/// packet as the client sent it (before port translation); without DF it is only dropped.
#[test]
fn packets_too_big_to_encapsulate_get_fragmentation_needed() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(TRANSLATED)?;
    let mtu = test_interface().mtu as usize;
    let mut big = Packet::tcp(6800, 6000, 0x10);
    big.payload = vec![7; mtu - 20 - 40 + 1];
    let sent = big.ip_packet();
    ensure!(sent.len() == mtu - 20 + 1);
    let (verdict, out) = run(&mut dp, &big.frame())?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let next_hop_mtu = ((mtu - 20) as u16).to_be_bytes();
    let mut want = icmp_error(
        VIP,
        big.src,
        [3, 4],
        [0, 0, next_hop_mtu[0], next_hop_mtu[1]],
        &sent[..64],
    );
    want[0..6].copy_from_slice(&CLIENT_MAC);
    want[6..12].copy_from_slice(&LB_MAC);
    ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");
    ensure!(checksum(&out[14..34]) == 0 && checksum(&out[34..]) == 0);
    ensure!(dp.icmp_sent_of(IcmpCounter::TooBigSent)? == 1);
    ensure!(drops(&dp, DropReason::TooBig)? == 1);

    // Without DF: dropped, nothing sent. One byte less: encapsulated.
    let mut udp = Packet::udp(6800, 6001);
    udp.payload = vec![7; mtu - 20 - 28 + 1];
    ensure!(run(&mut dp, &udp.frame())?.0 == XDP_DROP);
    ensure!(dp.icmp_sent_of(IcmpCounter::TooBigSent)? == 1);
    ensure!(drops(&dp, DropReason::TooBig)? == 2);
    big.payload.pop();
    let (verdict, out) = run(&mut dp, &big.frame())?;
    ensure!(verdict == XDP_TX && out.len() == 14 + mtu && out[23] == 4);
    Ok(())
}

#[test]
fn reply_shaped_packets_without_a_flow_pass_untouched() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(NAT)?;
    let request = Packet::tcp(80, 6000, 0x02);
    let target = Ipv4Addr::new(198, 51, 100, 21);
    // No request went out for these: another client port, another target port, a target of
    // the dsr group, and a reply before any request.
    for reply in [
        reply_to(&request, target, 30080, 0x12),
        reply_to(&Packet::tcp(80, 6001, 0x02), target, 30081, 0x12),
        reply_to(
            &Packet::tcp(443, 6002, 0x02),
            Ipv4Addr::new(198, 51, 100, 31),
            443,
            0x12,
        ),
    ] {
        let frame = reply.frame();
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(
            verdict == XDP_PASS && out == frame,
            "{reply:?} was not passed untouched"
        );
    }
    Ok(())
}

#[test]
fn nat_flows_end_after_a_fin_each_way_or_an_rst() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(NAT)?;
    let closing = |dp: &Dataplane, key: &lb_common::FlowKey| {
        dp.flow(key)
            .is_some_and(|e| e.last_seen_ns & lb_common::FLOW_CLOSING != 0)
    };
    let connections = |dp: &Dataplane| -> u64 {
        state
            .targets
            .keys()
            .map(|&id| dp.active_connections(id))
            .sum()
    };
    // FIN from the client, then from the target: ended after the second.
    let syn = Packet::tcp(80, 7000, 0x02);
    run(&mut dp, &syn.frame())?;
    let (_, target) = expected_target(&state, 0, &syn);
    let addr = Ipv4Addr::from(target.addr.to_ne_bytes());
    let reverse = reply_to(&syn, addr, 30080, 0x10).key();
    ensure!(
        dp.flow(&reverse).is_some(),
        "no reverse entry for a new NAT flow"
    );
    ensure!(connections(&dp) == 1, "a NAT flow counts one connection");
    run(&mut dp, &Packet::tcp(80, 7000, 0x11).frame())?;
    ensure!(!closing(&dp, &syn.key()), "one FIN ended the flow");
    ensure!(
        connections(&dp) == 0,
        "the client's FIN ended its connection"
    );
    run(&mut dp, &reply_to(&syn, addr, 30080, 0x11).frame())?;
    ensure!(
        closing(&dp, &syn.key()) && closing(&dp, &reverse),
        "FIN each way did not end it"
    );
    // The last ACK still goes through during the linger (to the stack: no route here).
    let (verdict, out) = run(&mut dp, &Packet::tcp(80, 7000, 0x10).frame())?;
    ensure!(verdict == XDP_PASS && out[14 + 16..14 + 20] == addr.octets());
    ensure!(closing(&dp, &syn.key()));

    // An RST from the target ends another flow at once.
    let syn = Packet::tcp(80, 7001, 0x02);
    run(&mut dp, &syn.frame())?;
    let (_, target) = expected_target(&state, 0, &syn);
    let addr = Ipv4Addr::from(target.addr.to_ne_bytes());
    ensure!(connections(&dp) == 1);
    run(&mut dp, &reply_to(&syn, addr, 30080, 0x14).frame())?;
    ensure!(closing(&dp, &syn.key()), "an RST did not end the flow");
    ensure!(
        connections(&dp) == 0,
        "the target's RST ended its connection"
    );
    // A flow that is not NAT never ends early: its entry lives until it is idle.
    let dsr = Packet::tcp(443, 7002, 0x02);
    run(&mut dp, &dsr.frame())?;
    run(&mut dp, &Packet::tcp(443, 7002, 0x04).frame())?;
    ensure!(!closing(&dp, &dsr.key()));
    Ok(())
}

const LEAST_CONNECTIONS: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: lc, address: 203.0.113.10, port: 80, protocol: tcp, target_group: lc}
  - {name: lc-udp, address: 203.0.113.10, port: 53, protocol: udp, target_group: lc, idle_timeout: 1s}
target_groups:
  - name: lc
    algorithm: least_connections
    port: 80
    targets:
      - {address: 198.51.100.11, weight: 2}
      - {address: 198.51.100.12}
      - {address: 198.51.100.13}
";

/// Least connections: each new flow goes to the target with the fewest active connections per
/// weight; a connection counts from its first packet until the client's FIN or RST (once), or
/// until it goes idle, which the controller's reconciliation finds; a target that fails its
/// health check counts none.
#[test]
fn least_connections_counts_connections_from_start_to_end() -> Result<()> {
    let (config, mut registry) = registered(LEAST_CONNECTIONS)?;
    let keys: Vec<_> = registry.targets().map(|(k, _)| k.clone()).collect();
    for key in &keys {
        registry.record(key, true, 1, 1);
    }
    let state = MapState::build(&config, &registry, &[test_interface()], next_hop_of)?;
    let mut dp = Dataplane::load(&config.settings, None)?;
    dp.apply(&MapState::default(), &state)?;
    let id_of = |host: u8| -> Result<u32> {
        let addr = u32::from_ne_bytes([198, 51, 100, host]);
        state
            .targets
            .iter()
            .find(|(_, t)| t.addr == addr)
            .map(|(&id, _)| id)
            .context("no such target")
    };
    let ids = [id_of(11)?, id_of(12)?, id_of(13)?];
    let counts = |dp: &Dataplane| ids.map(|id| dp.active_connections(id));

    // 8 connections, weights 2:1:1: exactly 4, 2 and 2, whatever order ties are broken in.
    let mut flows = Vec::new();
    for sport in 5000..5008u16 {
        let syn = Packet::tcp(80, sport, 0x02);
        let (verdict, out) = run(&mut dp, &syn.frame())?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let id = sent_to(&state, &out).context("sent to no target")?;
        let (_, again) = run(&mut dp, &syn.frame())?;
        ensure!(
            sent_to(&state, &again) == Some(id),
            "a retransmitted SYN moved"
        );
        flows.push((sport, id));
    }
    ensure!(counts(&dp) == [4, 2, 2], "counts {:?}", counts(&dp));

    // The client ends two of the first target's connections with a FIN (sent twice) and one
    // of the second's with an RST; the closing packets still reach their targets.
    let on = |id: u32| flows.iter().filter(move |f| f.1 == id).map(|f| f.0);
    let ended: Vec<(u16, u8)> = on(ids[0])
        .take(2)
        .map(|sport| (sport, 0x11))
        .chain(on(ids[1]).take(1).map(|sport| (sport, 0x14)))
        .collect();
    for &(sport, flags) in &ended {
        for _ in 0..2 {
            let (_, out) = run(&mut dp, &Packet::tcp(80, sport, flags).frame())?;
            let kept = flows.iter().find(|f| f.0 == sport).map(|f| f.1);
            ensure!(sent_to(&state, &out) == kept, "a closing packet moved");
        }
    }
    ensure!(counts(&dp) == [2, 1, 2], "after 3 ends: {:?}", counts(&dp));
    // 1, 1 and 2 per weight: the next goes to the first or the second, never the third.
    let (_, out) = run(&mut dp, &Packet::tcp(80, 5100, 0x02).frame())?;
    let next = sent_to(&state, &out).context("sent to no target")?;
    ensure!(next != ids[2], "a new flow went to the busiest target");
    let settled = counts(&dp);
    dp.reconcile_connections(&state);
    ensure!(counts(&dp) == settled, "reconciling changed right counts");

    // A UDP flow counts while it is not idle; the data plane never sees it end.
    let datagram = Packet::udp(53, 6000);
    run(&mut dp, &datagram.frame())?;
    let with_udp = counts(&dp);
    ensure!(with_udp.iter().sum::<u64>() == settled.iter().sum::<u64>() + 1);
    std::thread::sleep(Duration::from_millis(1500)); // past the listener's 1 s idle timeout
    // A correction waits for a second pass to agree on it.
    dp.reconcile_connections(&state);
    ensure!(
        counts(&dp) == with_udp,
        "one pass corrected: {:?}",
        counts(&dp)
    );
    dp.reconcile_connections(&state);
    ensure!(
        counts(&dp) == settled,
        "an idle flow still counts: {:?}",
        counts(&dp)
    );
    let entry = dp.flow(&datagram.key()).context("the UDP flow's entry")?;
    ensure!(
        entry.last_seen_ns & lb_common::FLOW_ENDED != 0,
        "not marked ended"
    );
    // Its next datagram is a new flow, counted once: the old one is not taken off again.
    run(&mut dp, &datagram.frame())?;
    ensure!(counts(&dp).iter().sum::<u64>() == settled.iter().sum::<u64>() + 1);

    // A target that fails its health check loses its flows: none of its connections count.
    let sick = keys
        .iter()
        .find(|k| k.addr.ip() == std::net::Ipv4Addr::new(198, 51, 100, 13))
        .context("target .13")?;
    registry.record(sick, false, 1, 1);
    let degraded = MapState::build(&config, &registry, &[test_interface()], next_hop_of)?;
    dp.apply(&state, &degraded)?;
    dp.reconcile_connections(&degraded);
    dp.reconcile_connections(&degraded);
    ensure!(
        dp.active_connections(ids[2]) == 0,
        "an unhealthy target counts connections"
    );
    Ok(())
}

/// `n` flows (ACKs from 192.0.2.0/24) other than `first` that have both of its connection-table
/// buckets: two in a million are, of 1024 buckets, about 30 in the 16 million tried, so finding
/// fewer than the 10 a test asks for happens less than once in 100000.
fn sharing_buckets(dp: &Dataplane, first: &Packet, n: usize) -> Result<Vec<Packet>> {
    // A flow's two buckets, in either order: a flow may live in either.
    let buckets_of = |p: &Packet| {
        let mut b = dp.flow_buckets(&p.key());
        b.sort();
        b
    };
    let buckets = buckets_of(first);
    let same: Vec<Packet> = (1..=255u8)
        .flat_map(|host| {
            (1024..u16::MAX).map(move |sport| {
                let mut p = Packet::tcp(80, sport, 0x10);
                p.src = Ipv4Addr::new(192, 0, 2, host);
                p
            })
        })
        .filter(|p| p.key() != first.key() && buckets_of(p) == buckets)
        .take(n)
        .collect();
    ensure!(
        same.len() == n,
        "only {} flows share both buckets",
        same.len()
    );
    Ok(same)
}

fn present(dp: &Dataplane, p: &Packet) -> bool {
    dp.flow(&p.key()).is_some()
}

/// The flood guard's rule for a full table: a new flow never takes the entry of an
/// established one (a flow whose client sent a second packet); it takes an empty entry, else
/// an ended flow's, else an embryonic flow's (a SYN flood turns over only its own entries);
/// with none of those, it is dropped and counted.
#[test]
fn new_flows_never_evict_established_ones() -> Result<()> {
    let (mut dp, _) = load()?;
    let slots = 2 * lb_common::FLOW_WAYS;
    let same = sharing_buckets(&dp, &Packet::tcp(80, 5000, 0x10), slots + 2)?;
    let (established, new) = same.split_at(slots);
    let syn = |p: &Packet| Packet {
        tcp_flags: 0x02,
        ..p.clone()
    };
    for p in established {
        run(&mut dp, &syn(p).frame())?;
        run(&mut dp, &p.frame())?; // the client's ACK: established
    }
    for p in new {
        let (verdict, _) = run(&mut dp, &syn(p).frame())?;
        ensure!(
            verdict == XDP_DROP,
            "a SYN found room among established flows"
        );
    }
    ensure!(drops(&dp, DropReason::FlowTableFull)? == 2);
    ensure!(
        established.iter().all(|p| present(&dp, p)),
        "an established flow was evicted"
    );

    // One established flow ends: the first new flow takes its entry; the next new flow takes
    // that embryonic flow's entry, not an established one.
    run(
        &mut dp,
        &Packet {
            tcp_flags: 0x11,
            ..established[0].clone()
        }
        .frame(),
    )?;
    for (i, p) in new.iter().enumerate() {
        let (verdict, _) = run(&mut dp, &syn(p).frame())?;
        ensure!(verdict == XDP_TX, "new flow {i}: verdict {verdict}");
        ensure!(present(&dp, p), "new flow {i} not remembered");
    }
    ensure!(!present(&dp, &new[0]), "the embryonic flow kept its entry");
    ensure!(
        established[1..].iter().all(|p| present(&dp, p)),
        "an established flow was evicted"
    );
    Ok(())
}

/// Least connections in a group larger than it scans: each new flow goes to the one of its
/// two candidates (chosen by the connection table's secret hash) with fewer connections, as a
/// model that follows every placement predicts, and every placement is counted.
#[test]
fn least_connections_over_many_targets_sends_each_flow_to_the_less_loaded_of_two() -> Result<()> {
    let targets: String = (1..=40)
        .map(|h| format!("      - {{address: 198.51.100.{h}}}\n"))
        .collect();
    let text = format!(
        "settings: {{maglev_table_size: 4099, connection_table_size: 8192, max_target_groups: 1}}\n\
         listeners:\n  - {{name: lc, address: 203.0.113.10, port: 80, protocol: tcp, target_group: lc}}\n\
         target_groups:\n  - name: lc\n    algorithm: least_connections\n    port: 80\n    targets:\n{targets}"
    );
    let (mut dp, state, _) = dataplane_for(&text)?;
    let table = &state.groups[&0].table[..40];
    ensure!(table.len() as u32 > lb_common::LEAST_CONNECTIONS_SCAN);
    // The model: each new flow goes to the candidate with fewer connections, the first on a tie.
    let mut model: HashMap<u32, u64> = table.iter().map(|&id| (id, 0)).collect();
    for sport in 1000..1800u16 {
        let packet = Packet::tcp(80, sport, 0x02);
        let [a, b] =
            lb_common::two_choices(dp.flow_hash(&packet.key()), 40).map(|s| table[s as usize]);
        let expected = if lb_common::fewer_connections((model[&b], 1), (model[&a], 1)) {
            b
        } else {
            a
        };
        let (verdict, out) = run(&mut dp, &packet.frame())?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        ensure!(
            sent_to(&state, &out) == Some(expected),
            "flow {sport} went to {:?}, not to {expected}, the less loaded of {a} ({}) and {b} ({})",
            sent_to(&state, &out),
            model[&a],
            model[&b]
        );
        *model.get_mut(&expected).unwrap() += 1;
    }
    for (&id, &count) in &model {
        ensure!(
            dp.active_connections(id) == count,
            "target {id}: {} connections counted, {count} placed",
            dp.active_connections(id)
        );
    }
    Ok(())
}

/// Stickiness: a client keeps the target it got across a change of the group that moves its
/// flows under the algorithm alone, until it opens no flow for the duration; then its flows
/// follow the algorithm again.
#[test]
fn a_sticky_client_keeps_its_target_across_a_group_change_for_the_duration() -> Result<()> {
    let sticky = "    stickiness: {type: source_ip, duration: 1s}\n";
    let (before, state_a, state_b) = group_change("", sticky, &[11, 12], &[11, 12, 13, 14, 15])?;
    let mut dp = Dataplane::load(&before.settings, None)?;
    dp.apply(&MapState::default(), &state_a)?;

    let syn = |sport: u16| Packet::tcp(80, sport, 0x02);
    let (_, out) = run(&mut dp, &syn(1000).frame())?;
    let (kept, _) = expected_target(&state_a, 0, &syn(1000));
    ensure!(
        sent_to(&state_a, &out) == Some(kept),
        "the first flow was not Maglev's pick"
    );
    dp.apply(&state_a, &state_b)?;
    let moved: Vec<u16> = (2000..2040)
        .filter(|&s| expected_target(&state_b, 0, &syn(s)).0 != kept)
        .collect();
    ensure!(
        moved.len() > 20,
        "the new table keeps too many flows on the old target"
    );
    for sport in 2000..2040 {
        let (_, out) = run(&mut dp, &syn(sport).frame())?;
        ensure!(
            sent_to(&state_b, &out) == Some(kept),
            "flow {sport} left the client's sticky target"
        );
    }
    // Quiet for longer than the 1 s duration: its next flow follows the table (one that the
    // table sends elsewhere).
    std::thread::sleep(Duration::from_millis(1500));
    let packet = (3000..3100)
        .map(syn)
        .find(|p| expected_target(&state_b, 0, p).0 != kept)
        .context("every flow hashes to the kept target")?;
    let (_, out) = run(&mut dp, &packet.frame())?;
    ensure!(
        sent_to(&state_b, &out) == Some(expected_target(&state_b, 0, &packet).0),
        "stickiness outlived its duration"
    );
    Ok(())
}

/// Every algorithm, with stickiness, in every forwarding mode: a sticky client's new flows all
/// reach one target of the group, sent the mode's way, and count as its connections.
#[test]
fn every_algorithm_with_stickiness_works_in_every_forwarding_mode() -> Result<()> {
    let algorithms = ["maglev", "source_ip", "round_robin", "least_connections"];
    let modes = ["dsr", "ipip", "nat"];
    let mut listeners = String::new();
    let mut groups = String::new();
    for (a, algorithm) in algorithms.iter().enumerate() {
        for (m, mode) in modes.iter().enumerate() {
            let port = 1000 + 10 * a + m;
            listeners += &format!(
                "  - {{name: l{port}, address: 203.0.113.10, port: {port}, protocol: tcp, target_group: g{port}}}\n"
            );
            groups += &format!(
                "  - name: g{port}\n    algorithm: {algorithm}\n    forwarding: {mode}\n    port: {port}\n    stickiness: {{type: source_ip, duration: 1h}}\n    targets: [{{address: 198.51.100.11}}, {{address: 198.51.100.12}}]\n"
            );
        }
    }
    let text = format!(
        "settings: {{maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 12}}\n\
         listeners:\n{listeners}target_groups:\n{groups}"
    );
    let (mut dp, state, _) = dataplane_for(&text)?;
    for (a, algorithm) in algorithms.iter().enumerate() {
        for (m, mode) in modes.iter().enumerate() {
            let port = (1000 + 10 * a + m) as u16;
            let (_, listener) = state
                .listeners
                .iter()
                .find(|(k, _)| k.port == port.to_be())
                .context("no listener")?;
            let mut reached = std::collections::BTreeSet::new();
            for sport in 5000..5004u16 {
                let (verdict, out) = run(&mut dp, &Packet::tcp(port, sport, 0x02).frame())?;
                // NAT frames are routed by the kernel's FIB, which has no route here: the
                // translated frame goes to the stack.
                let want = if *mode == "nat" { XDP_PASS } else { XDP_TX };
                ensure!(verdict == want, "{algorithm} {mode}: verdict {verdict}");
                let to = if *mode == "dsr" {
                    state
                        .targets
                        .iter()
                        .find(|(_, t)| t.group == listener.group && out[0..6] == t.mac)
                } else {
                    let dst = u32::from_ne_bytes(out[30..34].try_into()?);
                    state
                        .targets
                        .iter()
                        .find(|(_, t)| t.group == listener.group && t.addr == dst)
                };
                reached.insert(
                    *to.with_context(|| format!("{algorithm} {mode}: no target"))?
                        .0,
                );
            }
            ensure!(
                reached.len() == 1,
                "{algorithm} {mode}: a sticky client reached {reached:?}"
            );
            let id = *reached.first().context("no target")?;
            ensure!(
                dp.active_connections(id) == 4,
                "{algorithm} {mode}: {} connections",
                dp.active_connections(id)
            );
        }
    }
    Ok(())
}

const SOURCES: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 2}
denied_sources: [192.0.2.128/25]
listeners:
  - {name: open, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}
  - name: guarded
    address: 203.0.113.10
    port: 81
    protocol: tcp
    target_group: guarded
    allowed_sources: [192.0.2.0/24, 198.51.100.7]
target_groups:
  - name: web
    targets: [{address: 198.51.100.11, port: 80}]
  - name: guarded
    targets: [{address: 198.51.100.12, port: 81}]
";

/// Allow-lists and the deny-list: a source reaches a listener only if no denied prefix holds
/// it and, where the listener has an allow-list, an allowed one does; refused packets are
/// dropped and counted. A change of the lists takes effect on the next packet.
#[test]
fn sources_outside_the_allow_list_or_inside_the_deny_list_are_dropped() -> Result<()> {
    let (mut dp, state, registry) = dataplane_for(SOURCES)?;
    let from = |src: [u8; 4], port: u16| {
        let mut p = Packet::tcp(port, 4000, 0x02);
        p.src = Ipv4Addr::from(src);
        p.frame()
    };
    let cases: [([u8; 4], u16, u32); 7] = [
        ([198, 51, 100, 2], 80, XDP_TX),   // no allow-list, not denied
        ([192, 0, 2, 200], 80, XDP_DROP),  // denied, wherever it goes
        ([192, 0, 2, 5], 81, XDP_TX),      // in an allowed prefix
        ([198, 51, 100, 7], 81, XDP_TX),   // the allowed address
        ([198, 51, 100, 8], 81, XDP_DROP), // next to it, not allowed
        ([192, 0, 2, 130], 81, XDP_DROP),  // allowed /24, but in the denied /25
        ([192, 0, 2, 127], 81, XDP_TX),    // allowed, just below the denied /25
    ];
    for (src, port, want) in cases {
        let (verdict, _) = run(&mut dp, &from(src, port))?;
        ensure!(
            verdict == want,
            "{src:?} to :{port}: verdict {verdict}, not {want}"
        );
    }
    ensure!(drops(&dp, DropReason::DeniedSource)? == 3);

    // A reload drops both lists: everyone passes.
    let open = SOURCES
        .replace("denied_sources: [192.0.2.128/25]\n", "")
        .replace("    allowed_sources: [192.0.2.0/24, 198.51.100.7]\n", "");
    let config =
        config::parse(Path::new("open.yaml"), &open).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opened = MapState::build(&config, &registry, &[test_interface()], next_hop_of)?;
    ensure!(opened.allowed_sources.is_empty() && opened.denied_sources.is_empty());
    dp.apply(&state, &opened)?;
    for (src, port, _) in cases {
        let (verdict, _) = run(&mut dp, &from(src, port))?;
        ensure!(verdict == XDP_TX, "{src:?} to :{port} still refused");
    }
    // And back: the lists are written again.
    dp.apply(&opened, &state)?;
    for (src, port, want) in cases {
        let (verdict, _) = run(&mut dp, &from(src, port))?;
        ensure!(
            verdict == want,
            "after the second reload, {src:?} to :{port}: {verdict}"
        );
    }
    Ok(())
}

const RATE_LIMITS: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 8192, max_target_groups: 3}
listeners:
  - {name: paced, address: 203.0.113.10, port: 80, protocol: tcp, target_group: a, max_new_flows_per_second: 10}
  - {name: per_source, address: 203.0.113.10, port: 81, protocol: tcp_udp, target_group: b, max_new_flows_per_second_per_source: 10}
  - {name: free, address: 203.0.113.10, port: 82, protocol: tcp, target_group: c}
target_groups:
  - {name: a, targets: [{address: 198.51.100.11, port: 80}]}
  - {name: b, targets: [{address: 198.51.100.12, port: 81}]}
  - {name: c, targets: [{address: 198.51.100.13, port: 82}]}
";

/// Rate limits on new flows: from a full bucket a second's worth passes and the rest is dropped
/// and counted, per listener and per source; flows already in the connection table are never
/// limited; the bucket refills at the rate; a listener without limits is untouched, and a
/// reload that removes a limit lifts it at once.
#[test]
fn new_flows_beyond_a_rate_limit_are_dropped_and_counted() -> Result<()> {
    let (mut dp, state, registry) = dataplane_for(RATE_LIMITS)?;
    let from = |src: [u8; 4], port: u16, sport: u16, flags: u8| {
        let mut p = Packet::tcp(port, sport, flags);
        p.src = Ipv4Addr::from(src);
        p
    };
    // How many of `packets` the data plane forwards.
    let passed = |dp: &mut Dataplane, packets: &mut dyn Iterator<Item = Packet>| -> Result<u64> {
        let mut n = 0;
        for p in packets {
            let (verdict, _) = run(dp, &p.frame())?;
            ensure!(
                verdict == XDP_TX || verdict == XDP_DROP,
                "verdict {verdict}"
            );
            n += (verdict == XDP_TX) as u64;
        }
        Ok(n)
    };
    // The listener's bucket: 10 at once, then one per 100 ms (the clock's tick, a few ms, is
    // the slack in these bounds).
    let start = Instant::now();
    let first = passed(
        &mut dp,
        &mut (1000..1200).map(|s| from([192, 0, 2, 1], 80, s, 0x02)),
    )?;
    let most = 10 + (start.elapsed().as_secs_f64() / 0.1).ceil() as u64;
    ensure!(
        (10..=most).contains(&first),
        "{first} of 200 passed, not 10..={most}"
    );
    ensure!(drops(&dp, DropReason::ListenerRateLimit)? == 200 - first);
    // Admitted flows go on with an empty bucket; refused ones are not let in by their ACK.
    let acks = |sports: std::ops::Range<u16>| sports.map(|s| from([192, 0, 2, 1], 80, s, 0x10));
    ensure!(passed(&mut dp, &mut acks(1000..1010))? == 10);
    let late = passed(&mut dp, &mut acks(1100..1200))?;
    let most = (start.elapsed().as_secs_f64() / 0.1).ceil() as u64 + 10 - first;
    ensure!(late <= most, "{late} refused flows let in by their ACK");
    // It refills at 10 per second.
    std::thread::sleep(Duration::from_millis(350));
    let waited = start.elapsed().as_secs_f64();
    let refilled = passed(
        &mut dp,
        &mut (2000..2100).map(|s| from([192, 0, 2, 1], 80, s, 0x02)),
    )?;
    let most = (start.elapsed().as_secs_f64() / 0.1).ceil() as u64 + 10 - first - late;
    ensure!(
        (3..=most).contains(&refilled),
        "{refilled} passed {waited:.3} s after the burst, not 3..={most}"
    );

    // Per source: 10 at once from each, in its own bucket.
    let per_source = |dp: &mut Dataplane, host: u8, sports: std::ops::Range<u16>| {
        passed(
            dp,
            &mut sports.map(|s| from([198, 51, 100, host], 81, s, 0x02)),
        )
    };
    ensure!(per_source(&mut dp, 200, 1000..1030)? == 10);
    ensure!(per_source(&mut dp, 201, 1000..1030)? == 10);
    ensure!(drops(&dp, DropReason::SourceRateLimit)? == 40);
    // Each listener counts what its limits refused.
    let refused = |dp: &Dataplane, name: &str| -> Result<Vec<u64>> {
        let id = registry.listener_id(name).context("listener id")?;
        Ok(dp
            .refused_new_flows(id)?
            .into_iter()
            .map(|(_, n)| n)
            .collect())
    };
    ensure!(refused(&dp, "paced")? == [200 - first + 100 - late + 100 - refilled, 0]);
    ensure!(refused(&dp, "per_source")? == [0, 40]);
    // UDP to the same tcp_udp listener shares the source's bucket.
    let mut udp = Packet::udp(81, 5000);
    udp.src = Ipv4Addr::new(198, 51, 100, 200);
    ensure!(run(&mut dp, &udp.frame())?.0 == XDP_DROP);
    // No limit: all pass.
    ensure!(
        passed(
            &mut dp,
            &mut (1000..1200).map(|s| from([192, 0, 2, 1], 82, s, 0x02))
        )? == 200
    );

    // A reload without the limits lifts them.
    let open = RATE_LIMITS
        .replace(", max_new_flows_per_second: 10", "")
        .replace(", max_new_flows_per_second_per_source: 10", "");
    let config =
        config::parse(Path::new("open.yaml"), &open).map_err(|e| anyhow::anyhow!("{e}"))?;
    let opened = MapState::build(&config, &registry, &[test_interface()], next_hop_of)?;
    ensure!(opened.limits.is_empty());
    dp.apply(&state, &opened)?;
    ensure!(
        passed(
            &mut dp,
            &mut (3000..3200).map(|s| from([192, 0, 2, 1], 80, s, 0x02))
        )? == 200
    );
    ensure!(per_source(&mut dp, 200, 3000..3030)? == 30);
    Ok(())
}

/// Ping: an echo request to a VIP is answered from the balancer, byte for byte what a host
/// would send (addresses swapped, TTL 64, valid checksums), and counted; one to another address,
/// or another ICMP message, passes untouched; with `answer_ping: false` the VIP's passes too.
#[test]
fn echo_requests_to_a_vip_are_answered_and_counted() -> Result<()> {
    let (mut dp, _) = load()?;
    let client = lb_tests::frames::CLIENT;
    let request = icmp_frame(client, VIP, 57, 8);
    let (verdict, out) = run(&mut dp, &request)?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let mut reply = icmp_frame(VIP, client, 64, 0);
    reply[0..6].copy_from_slice(&CLIENT_MAC);
    reply[6..12].copy_from_slice(&LB_MAC);
    ensure!(out == reply, "\n{out:02x?}\n{reply:02x?}");
    ensure!(checksum(&out[14..34]) == 0 && checksum(&out[34..]) == 0);
    ensure!(dp.icmp_sent_of(IcmpCounter::EchoReply)? == 1);
    for frame in [
        icmp_frame(client, Ipv4Addr::new(198, 51, 100, 3), 57, 8),
        icmp_frame(client, VIP, 57, 0),
        icmp_frame(client, VIP, 57, 13),
        request[..request.len() - 20].to_vec(),
    ] {
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_PASS && out == frame, "verdict {verdict}");
    }
    ensure!(dp.icmp_sent_of(IcmpCounter::EchoReply)? == 1);

    let quiet = CONFIG.replace(
        "  hash_seed: 42\n",
        "  hash_seed: 42\n  answer_ping: false\n",
    );
    ensure!(quiet != CONFIG);
    let (mut dp, _, _) = dataplane_for(&quiet)?;
    let (verdict, out) = run(&mut dp, &request)?;
    ensure!(verdict == XDP_PASS && out == request, "verdict {verdict}");
    ensure!(dp.icmp_sent_of(IcmpCounter::EchoReply)? == 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IPv6

/// Dual stack: IPv6 listeners beside an IPv4 one on the same group, whose targets (dual-stack
/// hosts, named by their IPv4 addresses) take both.
const IPV6: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
denied_sources: ['2001:db8:bad::/48']
listeners:
  - {name: web6, address: '2001:db8:10::10', port: 80, protocol: tcp, target_group: web}
  - {name: web4, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}
  - name: game6
    address: '2001:db8:10::10'
    port: 7777
    protocol: udp
    target_group: game
    allowed_sources: ['2001:db8:c::/48']
    max_new_flows_per_second_per_source: 2
target_groups:
  - name: web
    targets: [{address: 198.51.100.11, port: 80}, {address: 198.51.100.12, port: 80}, {address: 198.51.100.13, port: 80}]
  - name: game
    algorithm: source_ip
    targets: [{address: 198.51.100.21, port: 7777}, {address: 198.51.100.22, port: 7777}]
";

/// The reply to IPv6 `request` from where it went, with `payload` bytes.
fn reply6(request: &Packet6, payload: usize) -> Packet6 {
    Packet6 {
        src: request.dst,
        dst: request.src,
        sport: request.dport,
        dport: request.sport,
        payload: vec![0x5a; payload],
        ..request.clone()
    }
}

/// The target the data plane must pick for IPv6 `packet` in group `group`.
fn expected_target6(state: &MapState, group: u32, packet: &Packet6) -> (u32, lb_common::Target) {
    let settings = state.settings.unwrap();
    let key = packet.key();
    let slot = if state.groups[&group].algorithm == lb_common::ALGORITHM_SOURCE_IP {
        settings.maglev_slot(&lb_common::FlowKey6::new(key.src, [0; 4], 0, 0, 0))
    } else {
        settings.maglev_slot(&key)
    };
    let id = state.groups[&group].table[slot as usize];
    (id, state.targets[&id])
}

/// A hop-by-hop, a routing and a destination-options header: what may come before TCP or UDP.
fn extension_headers(n: usize) -> Vec<(u8, Vec<u8>)> {
    [
        (0u8, vec![1, 4, 0, 0, 0, 0]),
        (43, vec![0, 0, 0, 0, 0, 0]),
        (60, vec![1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ]
    .into_iter()
    .cycle()
    .take(n)
    .collect()
}

/// IPv6 in dsr: the frame goes to the target's MAC, unchanged above Ethernet, for TCP and UDP,
/// past up to four extension headers; the pick is Maglev's over the IPv6 5-tuple (source_ip's
/// over the client's address), the connection table keeps the flow, and the flow counts as
/// its listener's and its target's.
#[test]
fn ipv6_dsr_rewrites_only_the_macs() -> Result<()> {
    let (mut dp, state, registry) = dataplane_for(IPV6)?;
    let mut cases = vec![
        (Packet6::tcp(80, 1111, 0x02), 0),
        (Packet6::tcp(80, 1112, 0x10), 0),
        (Packet6::udp(7777, 2222), 1),
    ];
    for n in 1..=4 {
        let mut p = Packet6::tcp(80, 3000 + n as u16, 0x10);
        p.extensions = extension_headers(n);
        cases.push((p, 0));
    }
    let mut ids = Vec::new();
    for (packet, group) in cases {
        let frame = packet.frame();
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_TX, "{packet:?}: verdict {verdict}");
        let (id, target) = expected_target6(&state, group, &packet);
        ensure!(out[0..6] == target.mac && out[6..12] == LB_MAC && out[12..] == frame[12..]);
        ensure!(
            dp.flow(&packet.key()).map(|f| f.target) == Some(id),
            "{packet:?}: no flow"
        );
        ids.push(id);
    }
    // The IPv4 listener of the same group, beside.
    ensure!(run(&mut dp, &Packet::tcp(80, 1111, 0x02).frame())?.0 == XDP_TX);
    let web6 = registry.listener_id("web6").unwrap();
    let active = dp.active_flows(&state);
    ensure!(active.listeners.get(&web6) == Some(&6));
    ensure!(
        ids.iter()
            .all(|id| active.targets.get(id).is_some_and(|&n| n > 0))
    );
    Ok(())
}

/// What an IPv6 packet for a VIP that cannot be forwarded becomes: dropped and counted by
/// reason (more extension headers than lb skips, a fragment, a port without a listener, a
/// header that lies about its length, at every truncation); to any other address, or not TCP
/// or UDP, passed untouched.
#[test]
fn ipv6_packets_that_cannot_be_forwarded_are_dropped_and_counted_or_passed() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(IPV6)?;
    let mut too_many = Packet6::tcp(80, 4000, 0x02);
    too_many.extensions = extension_headers(5);
    let mut fragment = Packet6::udp(7777, 4001);
    fragment.extensions = vec![(44, vec![0, 1, 0, 0, 0, 1])];
    let mut version = Packet6::tcp(80, 4002, 0x02).frame();
    version[14] = 0x40;
    // A routing header with a segment left: the VIP is a waypoint, the packet someone else's.
    let mut waypoint = Packet6::tcp(80, 4007, 0x02);
    waypoint.extensions = vec![(43, vec![0, 1, 0, 0, 0, 0])];
    for (frame, reason) in [
        (too_many.frame(), DropReason::ExtensionHeaders),
        (waypoint.frame(), DropReason::ExtensionHeaders),
        (fragment.frame(), DropReason::Fragment),
        (Packet6::tcp(81, 4003, 0x02).frame(), DropReason::NoListener),
        (version, DropReason::Malformed),
    ] {
        let before = drops(&dp, reason)?;
        let (verdict, _) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_DROP, "{reason:?}: verdict {verdict}");
        ensure!(drops(&dp, reason)? == before + 1, "{reason:?} not counted");
    }
    let elsewhere = Packet6 {
        dst: "2001:db8:99::1".parse()?,
        ..Packet6::tcp(80, 4004, 0x02)
    };
    let mut icmp = Packet6::udp(7777, 4005).frame();
    icmp[20] = 58;
    for frame in [elsewhere.frame(), icmp] {
        ensure!(run(&mut dp, &frame)? == (XDP_PASS, frame.clone()));
    }
    // Cut anywhere past Ethernet: before the IPv6 header is whole it is not lb's to judge;
    // after, the packet says it is longer than it is.
    let mut full = Packet6::tcp(80, 4006, 0x02);
    full.extensions = extension_headers(2);
    let frame = full.frame();
    for len in 14..frame.len() {
        let (verdict, out) = run(&mut dp, &frame[..len])?;
        if len < 54 {
            ensure!(
                verdict == XDP_PASS && out == frame[..len],
                "cut at {len}: {verdict}"
            );
        } else {
            ensure!(verdict == XDP_DROP, "cut at {len}: verdict {verdict}");
        }
    }
    Ok(())
}

/// IPv6 sources: a listener's allow-list and the global deny-list by prefix, and the
/// per-source rate limit by /64, which one host commonly holds whole.
#[test]
fn ipv6_sources_are_allowed_denied_and_limited_by_prefix() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(IPV6)?;
    let from = |src: &str, dport: u16, sport: u16| -> Result<Packet6> {
        Ok(Packet6 {
            src: src.parse()?,
            ..Packet6::udp(dport, sport)
        })
    };
    ensure!(run(&mut dp, &from("2001:db8:c::7", 7777, 5000)?.frame())?.0 == XDP_TX);
    ensure!(run(&mut dp, &from("2001:db8:d::7", 7777, 5001)?.frame())?.0 == XDP_DROP);
    let denied = Packet6 {
        src: "2001:db8:bad::1".parse()?,
        ..Packet6::tcp(80, 5002, 0x02)
    };
    ensure!(run(&mut dp, &denied.frame())?.0 == XDP_DROP);
    ensure!(drops(&dp, DropReason::DeniedSource)? == 2);
    // Two new flows per second per /64: the third from another address of the same /64 is
    // refused, one from the next /64 is not.
    ensure!(run(&mut dp, &from("2001:db8:c::8", 7777, 5003)?.frame())?.0 == XDP_TX);
    ensure!(run(&mut dp, &from("2001:db8:c::9", 7777, 5004)?.frame())?.0 == XDP_DROP);
    ensure!(drops(&dp, DropReason::SourceRateLimit)? == 1);
    ensure!(run(&mut dp, &from("2001:db8:c:1::9", 7777, 5005)?.frame())?.0 == XDP_TX);
    Ok(())
}

/// An ICMPv6 echo request (`kind` 128) or another ICMPv6 message from `src` to `dst`.
fn icmp6_frame(src: Ipv6Addr, dst: Ipv6Addr, hop_limit: u8, kind: u8) -> Vec<u8> {
    icmp6_message(
        src,
        dst,
        hop_limit,
        [kind, 0, 0, 0, 0x12, 0x34, 0, 1],
        b"abcdefghijklmnop",
    )
}

/// `ping -6`: an echo request to an IPv6 VIP is answered from the balancer, byte for byte what
/// a host would send, and counted; one to another address, or neighbour discovery, passes.
#[test]
fn ipv6_echo_requests_to_a_vip_are_answered_and_counted() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(IPV6)?;
    let vip: Ipv6Addr = "2001:db8:10::10".parse()?;
    let client: Ipv6Addr = "2001:db8:c::7".parse()?;
    let (verdict, out) = run(&mut dp, &icmp6_frame(client, vip, 57, 128))?;
    let mut reply = icmp6_frame(vip, client, 64, 129);
    reply[0..6].copy_from_slice(&CLIENT_MAC);
    reply[6..12].copy_from_slice(&LB_MAC);
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    ensure!(out == reply, "got  {out:02x?}\nwant {reply:02x?}");
    ensure!(dp.icmp_sent_of(IcmpCounter::EchoReply)? == 1);
    for frame in [
        icmp6_frame(client, "2001:db8:99::1".parse()?, 57, 128),
        icmp6_frame(client, vip, 57, 135),
    ] {
        ensure!(run(&mut dp, &frame)? == (XDP_PASS, frame.clone()));
    }
    Ok(())
}

/// A router that cannot pass an IPv6 dsr target's reply on sends "packet too big" to the VIP:
/// the balancer sends it on to the flow's target, unchanged but for the MACs; a flow it never
/// saw, to where the hash places it. One about a port without a listener is dropped and
/// counted; one to another address passed.
#[test]
fn ipv6_errors_about_replies_go_to_the_flows_target() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(IPV6)?;
    let router: Ipv6Addr = "2001:db8:1::4".parse()?;
    let too_big = |to: Ipv6Addr, quote: &Packet6| {
        icmp6_message(
            router,
            to,
            64,
            [2, 0, 0, 0, 0, 0, 0x05, 0x00],
            &quote.ip_packet(),
        )
    };
    let reply = |request: &Packet6| reply6(request, 1400);
    let seen = Packet6::tcp(80, 6000, 0x02);
    run(&mut dp, &seen.frame())?;
    let never = Packet6::tcp(80, 6001, 0x10);
    for request in [seen, never] {
        let error = too_big(request.dst, &reply(&request));
        let (verdict, out) = run(&mut dp, &error)?;
        let (_, target) = expected_target6(&state, 0, &request);
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        ensure!(out[0..6] == target.mac && out[6..12] == LB_MAC && out[12..] == error[12..]);
    }
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToTarget)? == 2);
    let no_listener = too_big(VIP6, &reply(&Packet6::tcp(81, 6002, 0x10)));
    ensure!(run(&mut dp, &no_listener)?.0 == XDP_DROP);
    ensure!(drops(&dp, DropReason::IcmpUnmatched)? == 1);
    let elsewhere = too_big(CLIENT6, &reply(&Packet6::tcp(80, 6003, 0x10)));
    ensure!(run(&mut dp, &elsewhere)? == (XDP_PASS, elsewhere.clone()));
    Ok(())
}

/// ipip to targets named by IPv6 address: an IPv6 listener's packets in IPv6 (ip6ip6), an
/// IPv4 listener's in IPv6 too (IPv4-in-IPv6), on one group.
const IPV6_IPIP: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: tunnel6, address: '2001:db8:10::10', port: 80, protocol: tcp_udp, target_group: hosts6}
  - {name: tunnel4, address: 203.0.113.10, port: 80, protocol: tcp_udp, target_group: hosts6}
target_groups:
  - name: hosts6
    forwarding: ipip
    targets: [{address: '2001:db8:1::11', port: 80}, {address: '2001:db8:1::12', port: 80}]
";

/// The outer IPv6 header lb puts in front of a packet of `inner_len` bytes for `target`.
fn outer6(
    class: [u8; 4],
    inner_len: usize,
    next: u8,
    hop_limit: u8,
    target: &lb_common::Target,
) -> Vec<u8> {
    let mut outer = class.to_vec();
    outer.extend((inner_len as u16).to_be_bytes());
    outer.extend([next, hop_limit]);
    outer.extend(lb_tests::frames::LB_ADDR6.octets());
    outer.extend(target.addr6.iter().flat_map(|w| w.to_ne_bytes()));
    outer
}

/// ip6ip6 and IPv4-in-IPv6: the outer header comes from the balancer's global IPv6 address
/// (not its link-local one) to the target's, carries the inner packet's traffic class (an
/// IPv6 packet's flow label too) and hop limit, and the inner packet follows unchanged.
#[test]
fn ipip_to_ipv6_targets_prepends_an_outer_ipv6_header() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(IPV6_IPIP)?;
    for packet in [Packet6::tcp(80, 1234, 0x02), Packet6::udp(80, 1235)] {
        let mut frame = packet.frame();
        // Traffic class 0xb8 (EF), flow label 0x12345.
        frame[14..18].copy_from_slice(&[0x6b, 0x81, 0x23, 0x45]);
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let (_, target) = expected_target6(&state, 0, &packet);
        ensure!(target.ipv6 == 1);
        let inner = &frame[14..];
        let mut want = ethernet(
            target.mac,
            LB_MAC,
            0x86dd,
            &outer6(
                [0x6b, 0x81, 0x23, 0x45],
                inner.len(),
                41,
                packet.hop_limit,
                &target,
            ),
        );
        want.extend(inner);
        ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");
    }
    for packet in [Packet::tcp(80, 1236, 0x02), Packet::udp(80, 1237)] {
        let mut frame = packet.frame();
        // TOS 0xb8, the header checksum kept right.
        frame[15] = 0xb8;
        frame[24..26].copy_from_slice(&[0, 0]);
        let check = checksum(&frame[14..34]);
        frame[24..26].copy_from_slice(&check.to_be_bytes());
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_TX, "verdict {verdict}");
        let (_, target) = expected_target(&state, 0, &packet);
        let inner = &frame[14..];
        let mut want = ethernet(
            target.mac,
            LB_MAC,
            0x86dd,
            &outer6([0x6b, 0x80, 0, 0], inner.len(), 4, packet.ttl, &target),
        );
        want.extend(inner);
        ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");
    }
    Ok(())
}

/// A packet that would exceed the MTU once in IPv6: an IPv6 one is always answered with
/// "packet too big" (IPv6 is never fragmented on the way), an IPv4 one with DF with
/// "fragmentation needed"; both carry the MTU less the 40-byte outer header, from the VIP, and
/// quote the packet (an IPv6 one for 128 bytes). One byte less is encapsulated.
#[test]
fn packets_too_big_for_ipv6_encapsulation_get_packet_too_big() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(IPV6_IPIP)?;
    let mtu = test_interface().mtu as usize;
    let mut big6 = Packet6::tcp(80, 2000, 0x10);
    big6.payload = vec![7; mtu - 40 - 40 - 20 + 1];
    let sent = big6.ip_packet();
    ensure!(sent.len() == mtu - 40 + 1);
    let (verdict, out) = run(&mut dp, &big6.frame())?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let next_hop_mtu = ((mtu - 40) as u32).to_be_bytes();
    let mut want = icmp6_message(
        VIP6,
        CLIENT6,
        64,
        [
            2,
            0,
            0,
            0,
            next_hop_mtu[0],
            next_hop_mtu[1],
            next_hop_mtu[2],
            next_hop_mtu[3],
        ],
        &sent[..128],
    );
    want[0..6].copy_from_slice(&CLIENT_MAC);
    want[6..12].copy_from_slice(&LB_MAC);
    ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");

    let mut big4 = Packet::tcp(80, 2001, 0x10);
    big4.payload = vec![7; mtu - 40 - 40 + 1];
    let sent = big4.ip_packet();
    let (verdict, out) = run(&mut dp, &big4.frame())?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let mut want = icmp_error(
        VIP,
        big4.src,
        [3, 4],
        [0, 0, next_hop_mtu[2], next_hop_mtu[3]],
        &sent[..64],
    );
    want[0..6].copy_from_slice(&CLIENT_MAC);
    want[6..12].copy_from_slice(&LB_MAC);
    ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");
    ensure!(dp.icmp_sent_of(IcmpCounter::TooBigSent)? == 2);
    ensure!(drops(&dp, DropReason::TooBig)? == 2);

    big6.payload.pop();
    big4.payload.pop();
    for frame in [big6.frame(), big4.frame()] {
        let (verdict, out) = run(&mut dp, &frame)?;
        ensure!(verdict == XDP_TX && out.len() == 14 + mtu && out[12..14] == [0x86, 0xdd]);
    }
    Ok(())
}

/// A router's "packet too big" about an ip6ip6 flow's reply reaches the flow's target
/// encapsulated like the flow's packets, the message unchanged inside.
#[test]
fn ipv6_errors_about_ip6ip6_replies_go_to_the_target_encapsulated() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(IPV6_IPIP)?;
    let request = Packet6::tcp(80, 3000, 0x02);
    run(&mut dp, &request.frame())?;
    // A router's message is at most 1280 bytes (RFC 4443), so it fits the tunnel.
    let reply = reply6(&request, 1280 - 48 - 60);
    let error = icmp6_message(
        "2001:db8:1::4".parse()?,
        VIP6,
        64,
        [2, 0, 0, 0, 0, 0, 0x05, 0x00],
        &reply.ip_packet(),
    );
    let (verdict, out) = run(&mut dp, &error)?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let (_, target) = expected_target6(&state, 0, &request);
    let inner = &error[14..];
    let mut want = ethernet(
        target.mac,
        LB_MAC,
        0x86dd,
        &outer6([0x60, 0, 0, 0], inner.len(), 41, 64, &target),
    );
    want.extend(inner);
    ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToTarget)? == 1);
    Ok(())
}

/// Port translation for IPv6 VIPs: a dsr group of IPv4-named hosts, an ipip group of an
/// IPv6-named one.
const IPV6_TRANSLATED: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: web6, address: '2001:db8:10::10', port: 80, protocol: tcp, target_group: web}
  - {name: game6, address: '2001:db8:10::10', port: 6800, protocol: tcp_udp, target_group: game}
target_groups:
  - {name: web, targets: [{address: 198.51.100.11, port: 30080}]}
  - name: game
    forwarding: ipip
    targets: [{address: '2001:db8:1::21', port: 18600}]
";

/// An IPv6 packet to a VIP whose target serves on another port reaches it on that port, past
/// any extension headers, its checksum updated so that it verifies; in dsr and in ip6ip6.
#[test]
fn ipv6_translated_ports_are_rewritten_with_valid_checksums() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(IPV6_TRANSLATED)?;
    let mut cases = vec![
        (Packet6::tcp(80, 1024, 0x02), 30080, false),
        (Packet6::tcp(6800, 2000, 0x10), 18600, true),
        (Packet6::udp(6800, 3000), 18600, true),
    ];
    for n in 1..=4 {
        let mut tcp = Packet6::tcp(80, 1100 + n as u16, 0x10);
        tcp.extensions = extension_headers(n);
        let mut udp = Packet6::udp(6800, 3100 + n as u16);
        udp.extensions = extension_headers(n);
        cases.extend([(tcp, 30080, false), (udp, 18600, true)]);
    }
    for (packet, port, ipip) in cases {
        ensure!(l4_checksum_ok(&packet.ip_packet()), "the test's own input");
        let (verdict, out) = run(&mut dp, &packet.frame())?;
        ensure!(verdict == XDP_TX, "{packet:?}: verdict {verdict}");
        let inner = if ipip {
            ensure!(out[20] == 41, "not ip6ip6: {out:02x?}");
            &out[54..]
        } else {
            &out[14..]
        };
        let want = Packet6 {
            dport: port,
            ..packet.clone()
        };
        ensure!(
            inner == want.ip_packet(),
            "{packet:?}\ngot  {inner:02x?}\nwant {:02x?}",
            want.ip_packet()
        );
        ensure!(
            l4_checksum_ok(inner),
            "{packet:?}: the checksum does not verify"
        );
    }
    Ok(())
}

/// Under port translation, a router's "packet too big" about a reply (which left from the
/// listener's port) reaches the target naming the target's own port, where its socket is;
/// the quoted TCP checksum and the ICMPv6 checksum still verify.
#[test]
fn ipv6_errors_under_port_translation_name_the_targets_port() -> Result<()> {
    let (mut dp, _, _) = dataplane_for(IPV6_TRANSLATED)?;
    let request = Packet6::tcp(80, 5000, 0x02);
    run(&mut dp, &request.frame())?;
    let reply = reply6(&request, 1000);
    let router: Ipv6Addr = "2001:db8:1::4".parse()?;
    let error = icmp6_message(
        router,
        VIP6,
        64,
        [2, 0, 0, 0, 0, 0, 0x05, 0x00],
        &reply.ip_packet(),
    );
    let (verdict, out) = run(&mut dp, &error)?;
    ensure!(verdict == XDP_TX, "verdict {verdict}");
    let translated = Packet6 {
        sport: 30080,
        ..reply.clone()
    };
    ensure!(
        out[62..] == translated.ip_packet()[..],
        "the quote: {:02x?}",
        &out[62..]
    );
    ensure!(l4_checksum_ok(&out[62..]), "the quoted checksum");
    let icmp = &out[54..];
    let pseudo = lb_tests::frames::pseudo_header6(router, VIP6, 58, icmp.len());
    ensure!(
        checksum(&[pseudo, icmp.to_vec()].concat()) == 0,
        "the ICMPv6 checksum"
    );
    Ok(())
}

/// nat for IPv6 VIPs: targets named by IPv6 address, on another port.
const NAT6: &str = "
settings: {maglev_table_size: 4099, connection_table_size: 4096, max_target_groups: 4}
listeners:
  - {name: web6, address: '2001:db8:10::10', port: 80, protocol: tcp, target_group: web}
  - {name: game6, address: '2001:db8:10::10', port: 6800, protocol: udp, target_group: game}
target_groups:
  - name: web
    forwarding: nat
    targets: [{address: '2001:db8:1::21', port: 30080}, {address: '2001:db8:1::22', port: 30080}]
  - name: game
    forwarding: nat
    targets: [{address: '2001:db8:1::21', port: 30080}]
";

#[test]
fn ipv6_nat_rewrites_requests_to_the_target_and_replies_back_to_the_vip() -> Result<()> {
    let routed = Routed::new()?;
    lb_tests::in_netns(&routed.0, nat6_both_ways)?
}

/// The IPv6 counterpart of `nat_both_ways`, past extension headers too; then ICMPv6 errors
/// about the flows, translated like them both ways.
fn nat6_both_ways() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(NAT6)?;
    let mut past_extensions = Packet6::tcp(80, 5002, 0x02);
    past_extensions.extensions = extension_headers(2);
    let cases = [
        (Packet6::tcp(80, 5000, 0x02), 0),
        (Packet6::udp(6800, 5001), 1),
        (past_extensions, 0),
    ];
    for (request, group) in cases {
        let (verdict, out) = run(&mut dp, &request.frame())?;
        ensure!(verdict == XDP_REDIRECT, "{request:?}: verdict {verdict}");
        let (_, target) = expected_target6(&state, group, &request);
        let addr = lb::maps::from_be6(target.addr6);
        let want = Packet6 {
            dst: addr,
            dport: 30080,
            ..request.clone()
        };
        ensure!(out[0..6] == mac_of(addr), "{:02x?}", &out[0..12]);
        ensure!(
            out[14..] == want.ip_packet()[..],
            "request\ngot  {:02x?}\nwant {:02x?}",
            &out[14..],
            want.ip_packet()
        );
        ensure!(l4_checksum_ok(&out[14..]), "the request's checksum");

        let reply = Packet6 {
            src: addr,
            dst: request.src,
            sport: 30080,
            dport: request.sport,
            tcp_flags: 0x12,
            extensions: Vec::new(),
            ..request.clone()
        };
        let (verdict, out) = run(&mut dp, &reply.frame())?;
        ensure!(verdict == XDP_REDIRECT, "reply verdict {verdict}");
        ensure!(out[0..6] == ROUTER_MAC, "{:02x?}", &out[0..12]);
        let want = Packet6 {
            src: VIP6,
            sport: request.dport,
            ..reply.clone()
        };
        ensure!(
            out[14..] == want.ip_packet()[..],
            "reply\ngot  {:02x?}\nwant {:02x?}",
            &out[14..],
            want.ip_packet()
        );
        ensure!(l4_checksum_ok(&out[14..]), "the reply's checksum");
    }

    // ICMPv6 errors, each checked whole: its checksum, and the quote as the host it goes to
    // sent the packet.
    let icmp_ok = |out: &[u8]| {
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&out[22..38]).unwrap());
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&out[38..54]).unwrap());
        let pseudo = lb_tests::frames::pseudo_header6(src, dst, 58, out.len() - 54);
        checksum(&[pseudo, out[54..].to_vec()].concat()) == 0
    };
    let request = Packet6::udp(6800, 5001);
    let (_, target) = expected_target6(&state, 1, &request);
    let addr = lb::maps::from_be6(target.addr6);
    // The target's port unreachable about the request it got: to the client, from the VIP,
    // about the request the client sent.
    let got = Packet6 {
        dst: addr,
        dport: 30080,
        ..request.clone()
    };
    let unreachable = icmp6_message(
        addr,
        request.src,
        64,
        [1, 4, 0, 0, 0, 0, 0, 0],
        &got.ip_packet(),
    );
    let (verdict, out) = run(&mut dp, &unreachable)?;
    ensure!(verdict == XDP_REDIRECT, "unreachable verdict {verdict}");
    ensure!(out[0..6] == ROUTER_MAC && out[22..38] == VIP6.octets());
    ensure!(
        out[62..] == request.ip_packet()[..],
        "quote {:02x?}",
        &out[62..]
    );
    ensure!(icmp_ok(&out), "the translated unreachable's checksum");
    // A router's packet too big about a reply, sent to the VIP: to the target, about the reply
    // it sent.
    let reply = reply6(&request, request.payload.len());
    let too_big = icmp6_message(
        ROUTER6,
        VIP6,
        64,
        [2, 0, 0, 0, 0, 0, 0x05, 0],
        &reply.ip_packet(),
    );
    let (verdict, out) = run(&mut dp, &too_big)?;
    ensure!(verdict == XDP_REDIRECT, "too big verdict {verdict}");
    ensure!(out[0..6] == mac_of(addr) && out[38..54] == addr.octets());
    let sent = Packet6 {
        src: addr,
        sport: 30080,
        ..reply.clone()
    };
    ensure!(
        out[62..] == sent.ip_packet()[..],
        "quote {:02x?}",
        &out[62..]
    );
    ensure!(icmp_ok(&out), "the translated packet too big's checksum");
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToClient)? == 1);
    ensure!(dp.icmp_sent_of(IcmpCounter::ErrorToTarget)? == 1);
    Ok(())
}

/// IPv6 nat flows end as IPv4's do, in `lb_nat6`: after a FIN each way, or at once on an RST;
/// a reply-shaped packet that belongs to no flow passes untouched.
#[test]
fn ipv6_nat_flows_end_after_a_fin_each_way_or_an_rst() -> Result<()> {
    let (mut dp, state, _) = dataplane_for(NAT6)?;
    let closing = |dp: &Dataplane, key: &lb_common::FlowKey6| {
        dp.flow(key)
            .is_some_and(|e| e.last_seen_ns & lb_common::FLOW_CLOSING != 0)
    };
    let reply = |request: &Packet6, addr: Ipv6Addr, flags: u8| Packet6 {
        src: addr,
        sport: 30080,
        tcp_flags: flags,
        ..reply6(request, 5)
    };
    // FIN from the client, then from the target: ended after the second.
    let syn = Packet6::tcp(80, 7000, 0x02);
    run(&mut dp, &syn.frame())?;
    let (_, target) = expected_target6(&state, 0, &syn);
    let addr = lb::maps::from_be6(target.addr6);
    let reverse = reply(&syn, addr, 0x10).key();
    ensure!(dp.flow(&reverse).is_some(), "no reverse entry");
    run(&mut dp, &Packet6::tcp(80, 7000, 0x11).frame())?;
    ensure!(!closing(&dp, &syn.key()), "one FIN ended the flow");
    run(&mut dp, &reply(&syn, addr, 0x11).frame())?;
    ensure!(
        closing(&dp, &syn.key()) && closing(&dp, &reverse),
        "FIN each way did not end it"
    );
    // An RST from the target ends another flow at once.
    let syn = Packet6::tcp(80, 7001, 0x02);
    run(&mut dp, &syn.frame())?;
    let (_, target) = expected_target6(&state, 0, &syn);
    let addr = lb::maps::from_be6(target.addr6);
    run(&mut dp, &reply(&syn, addr, 0x14).frame())?;
    ensure!(closing(&dp, &syn.key()), "an RST did not end the flow");
    // No flow: untouched.
    let stray = reply(&Packet6::tcp(80, 7999, 0x10), addr, 0x10).frame();
    ensure!(run(&mut dp, &stray)? == (XDP_PASS, stray.clone()));
    Ok(())
}
