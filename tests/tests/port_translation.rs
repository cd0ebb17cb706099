//! End to end: the L4 switch's example, with port translation, through lb in dsr, ipip and nat.
//! Real TCP and UDP clients and servers in network namespaces; needs root.
//!
//! Two VIPs: :80/tcp of the first goes to group 1 (t1, t2) on port 30080; :6800 tcp and udp
//! of the second to group 2 (t2, t3) on port 18600. The servers listen only on the target
//! ports, and the targets are prepared with `lb target -c` from the balancer's own file, their
//! offloads left on. A TCP connection completes, and a UDP reply reaches the client's
//! connected socket, only if the reply comes from VIP:listener-port.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Result, ensure};
use lb_tests::{
    Answers, CLIENT_ADDR6, Connection, IFACE, INTERNAL_IFACE, LB_ADDR6, Lab, VIP, VIP6,
    private_target_addr, target_addr, target_addr6, targets_yaml, tcp_clients, udp_clients,
};

const VIP2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// Per connection to :80: several megabytes, segmented by the target's TSO/GSO.
const BIG_REPLY: usize = 4 << 20;
const SMALL_REPLY: usize = 1200;

fn config_text(mode: &str, g2_port: u16, extra_listener: bool) -> String {
    config_for(mode, g2_port, extra_listener, target_addr)
}

/// The example's config with target `i` at `addr(i)`.
fn config_for(
    mode: &str,
    g2_port: u16,
    extra_listener: bool,
    addr: fn(usize) -> Ipv4Addr,
) -> String {
    let (t1, t2, t3) = (addr(0), addr(1), addr(2));
    let (extra, extra_group) = if extra_listener {
        (
            format!(
                "  - {{name: alt, address: {VIP}, port: 8080, protocol: tcp, target_group: g3}}\n"
            ),
            format!("  - name: g3\n    targets: [{{address: {t3}, port: 30080}}]\n"),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "listeners:
  - {{name: web, address: {VIP}, port: 80, protocol: tcp, target_group: g1}}
  - {{name: game, address: {VIP2}, port: 6800, protocol: tcp_udp, target_group: g2}}
{extra}target_groups:
  - name: g1
    forwarding: {mode}
    port: 30080
    targets: [{{address: {t1}}}, {{address: {t2}}}]
  - name: g2
    forwarding: {mode}
    targets: [{{address: {t2}, port: {g2_port}}}, {{address: {t3}, port: {g2_port}}}]
{extra_group}"
    )
}

/// `lb target -c` on every target; returns what each printed.
fn prepare(lab: &Lab, config: &Path) -> Result<Vec<String>> {
    let config = config.to_string_lossy();
    (1..=lab.targets)
        .map(|i| lab.lb(&format!("t{i}"), &["target", "-i", IFACE, "-c", &config]))
        .collect()
}

/// The example's groups answered: :80 by t1 or t2, :6800 by both t2 and t3, and t2 in both.
fn served_by_the_example_groups(web: &[Answers], tcp: &[Answers], udp: &[Answers]) -> Result<()> {
    let g1 = answered_within("web", web, &["t1", "t2"])?;
    let g2: BTreeSet<String> = answered_within("game tcp", tcp, &["t2", "t3"])?
        .union(&answered_within("game udp", udp, &["t2", "t3"])?)
        .cloned()
        .collect();
    ensure!(g2.len() == 2, "group 2 was served by {g2:?} only");
    ensure!(
        g1.contains("t2") && g2.contains("t2"),
        "t2 must serve both groups: {g1:?} {g2:?}"
    );
    Ok(())
}

/// Who answered: every flow talked to one target, and all of them are in `group`.
fn answered_within(kind: &str, answers: &[Answers], group: &[&str]) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for (i, a) in answers.iter().enumerate() {
        ensure!(
            a.iter().all(|n| n == &a[0] && group.contains(&n.as_str())),
            "{kind} flow {i} was answered by {a:?}, not one of {group:?}"
        );
        seen.insert(a[0].clone());
    }
    Ok(seen)
}

fn serves_the_l4_switch_example(mode: &str) -> Result<()> {
    let name = format!("lbp-{mode}-{}", std::process::id() % 10000);
    let mut lab = Lab::new(&name, 3)?;
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(&config, config_text(mode, 18600, false))?;
    prepare(&lab, &config)?;
    for i in 1..=3 {
        lab.enable_offloads(&format!("t{i}"))?;
    }
    for i in [0, 1] {
        lab.start_tcp_server(i, 30080, BIG_REPLY)?;
    }
    for i in [1, 2] {
        lab.start_tcp_server(i, 18600, SMALL_REPLY)?;
        lab.start_udp_server(i, VIP2, 18600, SMALL_REPLY)?;
    }
    let mut balancer = lab.start_balancer(&config, &[])?;

    let rx_before = lab.rx_bytes("lb")?;
    let (web, web_bytes) = tcp_clients(&lab, VIP, 80, 16, 1)?;
    let (tcp, tcp_bytes) = tcp_clients(&lab, VIP2, 6800, 60, 3)?;
    let (udp, udp_bytes) = udp_clients(&lab, VIP2, 6800, 60, 3)?;
    let rx_delta = lab.rx_bytes("lb")? - rx_before;

    ensure!(
        web_bytes >= 16 * BIG_REPLY as u64,
        "only {web_bytes} bytes from :80"
    );
    served_by_the_example_groups(&web, &tcp, &udp)?;
    // Only requests cross the balancer; the replies go straight to the client.
    let replies = web_bytes + tcp_bytes + udp_bytes;
    ensure!(
        rx_delta * 2 < replies,
        "the balancer received {rx_delta} bytes for {replies} reply bytes: replies pass through it"
    );

    if mode == "dsr" {
        reload_adds_and_changes_a_mapping(&mut lab, &mut balancer, &config)?;
    }
    let (status, log) = balancer.terminate(&mut lab)?;
    ensure!(status.success(), "lb exited with {status}: {log:?}");
    let _ = std::fs::remove_file(config);
    Ok(())
}

/// Group 2 moves to port 18601 and a new listener :8080 goes to t3's 30080: `lb target -c`
/// converges on each target, `lb reload` applies the file, and a connection to :80 that was
/// open across both keeps its target.
fn reload_adds_and_changes_a_mapping(
    lab: &mut Lab,
    balancer: &mut lb_tests::Balancer,
    config: &Path,
) -> Result<()> {
    let mut open = Connection::open(lab, VIP, 80)?;
    let first = open.request()?;
    for i in [1, 2] {
        lab.start_tcp_server(i, 18601, SMALL_REPLY)?;
        lab.start_udp_server(i, VIP2, 18601, SMALL_REPLY)?;
    }
    lab.start_tcp_server(2, 30080, SMALL_REPLY)?;
    std::fs::write(config, config_text("dsr", 18601, true))?;
    let printed = prepare(lab, config)?;
    ensure!(
        printed[1].contains("set     reply ports") && printed[2].contains("set     reply ports"),
        "t2 did not converge: {}",
        printed[1]
    );
    // --check compares each host with the file, the reply-port map's contents included.
    for i in 1..=3 {
        let check = lab.lb(
            &format!("t{i}"),
            &[
                "target",
                "-i",
                IFACE,
                "-c",
                &config.to_string_lossy(),
                "--check",
            ],
        )?;
        ensure!(
            !check.contains("missing") && !check.contains("extra"),
            "{check}"
        );
    }
    balancer.mark();
    lab.lb("lb", &["reload", "-i", IFACE])?;
    balancer.wait_for_log(&["reloaded"], Duration::from_secs(10))?;
    // New connections can only be served on the new port.
    for i in [1, 2] {
        lab.stop_tcp_server(i, 18600);
    }
    let (tcp, _) = tcp_clients(lab, VIP2, 6800, 20, 1)?;
    answered_within("game tcp after the reload", &tcp, &["t2", "t3"])?;
    let (udp, _) = udp_clients(lab, VIP2, 6800, 20, 1)?;
    answered_within("game udp after the reload", &udp, &["t2", "t3"])?;
    let (alt, _) = tcp_clients(lab, VIP, 8080, 5, 1)?;
    answered_within("alt", &alt, &["t3"])?;
    ensure!(open.request()? == first, "the open connection to :80 moved");
    Ok(())
}

#[test]
fn dsr_translates_ports_and_reloads_mappings() -> Result<()> {
    serves_the_l4_switch_example("dsr")
}

#[test]
fn ipip_translates_ports() -> Result<()> {
    serves_the_l4_switch_example("ipip")
}

/// nat, one-armed: the targets share the client's network, and their way back to the client
/// is the balancer (a route on each target), which translates the replies.
#[test]
fn nat_translates_addresses_and_ports_both_ways_on_one_interface() -> Result<()> {
    nat_serves_the_l4_switch_example(false)
}

/// nat, two-armed (`lb run -i eth0 -i eth1`): the targets are on a private network that only
/// the balancer reaches, their default route through it; requests and replies cross from one
/// interface to the other by XDP redirect.
#[test]
fn nat_translates_between_two_interfaces() -> Result<()> {
    nat_serves_the_l4_switch_example(true)
}

/// The example in nat. The servers bind their own addresses: in nat no target has the VIP.
fn nat_serves_the_l4_switch_example(two_armed: bool) -> Result<()> {
    let name = format!("lbp-nat{}-{}", two_armed as u8, std::process::id() % 10000);
    let (mut lab, addr, lb_args, target_side): (_, fn(usize) -> Ipv4Addr, &[&str], &str) =
        if two_armed {
            (
                Lab::two_armed(&name, 3)?,
                private_target_addr,
                &["-i", INTERNAL_IFACE],
                INTERNAL_IFACE,
            )
        } else {
            (Lab::new(&name, 3)?, target_addr, &[], IFACE)
        };
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(&config, config_for("nat", 18600, false, addr))?;
    for (i, said) in prepare(&lab, &config)?.iter().enumerate() {
        ensure!(
            said.starts_with("nat: ") && !said.contains("set "),
            "t{}: {said}",
            i + 1
        );
    }
    if !two_armed {
        for i in 0..3 {
            let ns = lab.target_ns(i);
            let status = std::process::Command::new("ip")
                .args([
                    "-n",
                    &ns,
                    "route",
                    "add",
                    "198.51.100.2/32",
                    "via",
                    "198.51.100.3",
                ])
                .status()?;
            ensure!(status.success(), "route on t{}", i + 1);
        }
    }
    // The targets' offloads stay off here: their replies cross the balancer's XDP program, and
    // veth hands it a checksum that only a NIC would have completed.
    for i in [0, 1] {
        lab.start_tcp_server(i, 30080, 256 << 10)?;
    }
    for i in [1, 2] {
        lab.start_tcp_server(i, 18600, SMALL_REPLY)?;
        lab.start_udp_server(i, addr(i), 18600, SMALL_REPLY)?;
    }
    if two_armed {
        // Without the internal interface, lb cannot reach the targets: it says so and stops.
        let refused = lab
            .start_balancer(&config, &[])
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        ensure!(
            refused.contains(
                "target 192.0.2.11 of group g1 is reached through eth1, which is not one of lb's interfaces (eth0)"
            ),
            "lb run -i eth0 with targets behind eth1: {refused}"
        );
    }
    let mut balancer = lab.start_balancer(&config, lb_args)?;

    let rx_before = lab.rx_bytes_on("lb", target_side)?;
    let (web, web_bytes) = tcp_clients(&lab, VIP, 80, 8, 1)?;
    let (tcp, tcp_bytes) = tcp_clients(&lab, VIP2, 6800, 40, 2)?;
    let (udp, udp_bytes) = udp_clients(&lab, VIP2, 6800, 40, 2)?;
    let rx_delta = lab.rx_bytes_on("lb", target_side)? - rx_before;

    served_by_the_example_groups(&web, &tcp, &udp)?;
    // In nat the replies pass through the balancer.
    let replies = web_bytes + tcp_bytes + udp_bytes;
    ensure!(
        rx_delta >= replies,
        "the balancer received {rx_delta} bytes on {target_side} for {replies} reply bytes: replies bypass it"
    );

    // With nothing listening, the target's port unreachable comes back through the balancer,
    // translated: the client's connected socket learns that its VIP:port refuses.
    for i in [1, 2] {
        lab.stop_udp_server(i, 18600);
    }
    refused_at_the_client(&lab, VIP2.into(), 6800)?;

    let (status, log) = balancer.terminate(&mut lab)?;
    ensure!(status.success(), "lb exited with {status}: {log:?}");
    let _ = std::fs::remove_file(config);
    Ok(())
}

/// A datagram from the client's connected UDP socket to `vip`:`port`, where nothing listens:
/// the socket learns that it is refused (ECONNREFUSED) from the target's port unreachable,
/// which only reaches it translated.
fn refused_at_the_client(lab: &Lab, vip: IpAddr, port: u16) -> Result<()> {
    let refused = lb_tests::in_netns(&lab.ns("client"), move || -> Result<std::io::ErrorKind> {
        let any = if vip.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let socket = std::net::UdpSocket::bind(any)?;
        socket.connect((vip, port))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send(b"anyone?")?;
        Ok(match socket.recv(&mut [0u8; 64]) {
            Ok(_) => std::io::ErrorKind::Other,
            Err(e) => e.kind(),
        })
    })??;
    ensure!(
        refused == std::io::ErrorKind::ConnectionRefused,
        "the client saw {refused:?}, not a refusal"
    );
    Ok(())
}

/// nat over IPv6, one-armed: targets named by IPv6 address, serving on their own ports, their
/// way back to the client the balancer (a route on each target), which translates the replies
/// to VIP:listener-port; and a target's port unreachable reaches the client translated, so its
/// connected socket learns that the VIP's port refuses.
#[test]
fn nat_translates_ipv6_both_ways() -> Result<()> {
    let name = format!("lbp-nat6-{}", std::process::id() % 10000);
    let mut lab = Lab::new(&name, 3)?;
    lab.enable_ipv6()?;
    let targets = |port: u16| targets_yaml(3, port, |i| format!("'{}'", target_addr6(i)));
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "listeners:
  - {{name: web6, address: '{VIP6}', port: 80, protocol: tcp, target_group: web}}
  - {{name: game6, address: '{VIP6}', port: 6800, protocol: udp, target_group: game}}
target_groups:
  - {{name: web, forwarding: nat, targets: [{}]}}
  - {{name: game, forwarding: nat, targets: [{}]}}
",
            targets(30080),
            targets(18600)
        ),
    )?;
    for i in 0..3 {
        let ns = lab.target_ns(i);
        let status = std::process::Command::new("ip")
            .args(["-n", &ns, "-6", "route", "add"])
            .args([&format!("{CLIENT_ADDR6}/128"), "via", &LB_ADDR6.to_string()])
            .status()?;
        ensure!(status.success(), "route on t{}", i + 1);
        lab.start_tcp_server(i, 30080, SMALL_REPLY)?;
        lab.start_udp_server(i, target_addr6(i), 18600, SMALL_REPLY)?;
    }
    let mut balancer = lab.start_balancer(&config, &[])?;

    let rx_before = lab.rx_bytes("lb")?;
    let (web, web_bytes) = tcp_clients(&lab, VIP6, 80, 30, 2)?;
    let (game, game_bytes) = udp_clients(&lab, VIP6, 6800, 30, 2)?;
    let rx_delta = lab.rx_bytes("lb")? - rx_before;
    for (kind, answers) in [("tcp", &web), ("udp", &game)] {
        let served: BTreeSet<&String> = answers.iter().flatten().collect();
        ensure!(served.len() == 3, "{kind}: served by {served:?}");
    }
    // In nat the replies pass through the balancer.
    let replies = web_bytes + game_bytes;
    ensure!(
        rx_delta >= replies,
        "the balancer received {rx_delta} bytes for {replies} reply bytes: replies bypass it"
    );

    for i in 0..3 {
        lab.stop_udp_server(i, 18600);
    }
    refused_at_the_client(&lab, VIP6.into(), 6800)?;
    let (status, log) = balancer.terminate(&mut lab)?;
    ensure!(status.success(), "lb exited with {status}: {log:?}");
    let _ = std::fs::remove_file(config);
    Ok(())
}
