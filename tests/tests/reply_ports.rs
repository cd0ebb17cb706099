//! The target host's `lb_reply_ports` (TC egress) on crafted frames, through BPF_PROG_TEST_RUN:
//! replies from a translated (VIP, target port, protocol) leave with the listener's port and a
//! checksum that verifies; everything else leaves untouched. Needs root.
//!
//! The map is filled by the controller's own code (`target::load_reply_ports`).

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{TestRun as _, TestRunOptions},
};
use lb::target::{ReplyPort, load_reply_ports, reply_ports_program};
use lb_common::{PROTO_TCP, PROTO_UDP};
use lb_tests::frames::{CLIENT, CLIENT6, Packet, Packet6, VIP, VIP6, l4_checksum_ok};

const TC_ACT_OK: u32 = 0;

fn translations() -> BTreeSet<ReplyPort> {
    [
        (VIP.into(), 30080, PROTO_TCP, 80),
        (VIP.into(), 18600, PROTO_TCP, 6800),
        (VIP.into(), 18600, PROTO_UDP, 6800),
        (VIP6.into(), 30080, PROTO_TCP, 8080),
        (VIP6.into(), 18600, PROTO_UDP, 6800),
    ]
    .into_iter()
    .map(|(vip, target_port, proto, listener_port)| ReplyPort {
        vip,
        target_port,
        proto,
        listener_port,
    })
    .collect()
}

/// A reply of the target to an IPv6 client: from VIP6:`sport`.
fn reply6(mut packet: Packet6, sport: u16) -> Packet6 {
    (packet.src, packet.dst) = (VIP6, CLIENT6);
    (packet.sport, packet.dport) = (sport, 40000);
    packet
}

/// A reply of the target to the client: from VIP:`sport`.
fn reply(mut packet: Packet, sport: u16) -> Packet {
    (packet.src, packet.dst) = (VIP, CLIENT);
    (packet.sport, packet.dport) = (sport, 40000);
    packet
}

fn run(ebpf: &mut Ebpf, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 64];
    let result = reply_ports_program(ebpf)?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

fn translated(ebpf: &Ebpf) -> Result<u64> {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("REPLY_STATS").context("REPLY_STATS")?)?;
    Ok(stats.get(&0, 0)?.iter().sum())
}

#[test]
fn replies_from_translated_ports_leave_from_the_listener_port() -> Result<()> {
    let mut ebpf = load_reply_ports(&translations())?;
    let mut no_checksum = reply(Packet::udp(0, 0), 18600);
    no_checksum.udp_checksum = false;
    let cases = [
        (reply(Packet::tcp(0, 0, 0x12), 30080), 80),
        (reply(Packet::tcp(0, 0, 0x10), 18600), 6800),
        (reply(Packet::udp(0, 0), 18600), 6800),
        (no_checksum, 6800),
    ];
    let mut frames: Vec<(Vec<u8>, Vec<u8>)> = cases
        .into_iter()
        .map(|(packet, port)| {
            let want = Packet {
                sport: port,
                ..packet.clone()
            };
            (packet.frame(), want.frame())
        })
        .collect();
    // IPv6: the listener port of the IPv6 VIP's listener, not the IPv4 one's.
    for (packet, port) in [
        (reply6(Packet6::tcp(0, 0, 0x12), 30080), 8080),
        (reply6(Packet6::udp(0, 0), 18600), 6800),
    ] {
        let want = Packet6 {
            sport: port,
            ..packet.clone()
        };
        frames.push((packet.frame(), want.frame()));
    }
    for (i, (frame, want)) in frames.into_iter().enumerate() {
        let (verdict, out) = run(&mut ebpf, &frame)?;
        ensure!(verdict == TC_ACT_OK, "verdict {verdict}");
        ensure!(out == want, "got  {out:02x?}\nwant {want:02x?}");
        ensure!(l4_checksum_ok(&out[14..]), "the checksum does not verify");
        ensure!(translated(&ebpf)? == i as u64 + 1);
    }
    Ok(())
}

#[test]
fn everything_else_leaves_untouched() -> Result<()> {
    let mut ebpf = load_reply_ports(&translations())?;
    let mut other_vip = reply(Packet::tcp(0, 0, 0x10), 30080);
    other_vip.src = Ipv4Addr::new(203, 0, 113, 11);
    let mut later_fragment = reply(Packet::udp(0, 0), 18600);
    later_fragment.frag_field = Some(0x0010);
    let mut icmp = reply(Packet::tcp(0, 0, 0x10), 30080).ip_packet();
    icmp[9] = 1;
    let mut frames = vec![
        reply(Packet::tcp(0, 0, 0x10), 30081).frame(), // another port
        reply(Packet::udp(0, 0), 30080).frame(),       // another protocol
        other_vip.frame(),
        later_fragment.frame(),
        lb_tests::frames::ethernet([2; 6], [3; 6], 0x0800, &icmp),
        lb_tests::frames::ethernet([2; 6], [3; 6], 0x86dd, &[0x60; 60]),
        reply6(Packet6::udp(0, 0), 30080).frame(), // a port translated for TCP only
    ];
    // Cut short before the checksum ends: nothing to translate, nothing to break. (The
    // kernel runs no skb program on an IPv4 frame without a whole IP header.)
    let whole = reply(Packet::tcp(0, 0, 0x10), 30080).frame();
    frames.extend((34..34 + 18).map(|len| whole[..len].to_vec()));
    for frame in frames {
        let (verdict, out) =
            run(&mut ebpf, &frame).with_context(|| format!("len {}", frame.len()))?;
        ensure!(verdict == TC_ACT_OK, "verdict {verdict}");
        ensure!(out == frame, "changed: {frame:02x?}");
    }
    ensure!(translated(&ebpf)? == 0);
    Ok(())
}
