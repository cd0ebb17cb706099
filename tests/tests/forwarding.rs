//! End to end: real TCP and UDP clients and servers through lb in network namespaces, in both
//! forwarding modes, and path MTU discovery through the balancer. Needs root (CI runs as
//! root).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::{
    Answers, FAST_TCP_CHECK, IFACE, Lab, VIP, VIP6, in_netns, share, target_addr, target_addr6,
    targets_yaml, tcp_clients, udp_clients,
};

const TARGETS: usize = 3;
const FLOWS: usize = 300;
const REQUESTS: usize = 3;
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 7777;
/// Replies far larger than requests: if they crossed the balancer, its counters would show it.
const TCP_REPLY: usize = 2000;
const UDP_REPLY: usize = 1200;
/// A listener port that the targets serve on `TCP_PORT` (port translation).
const TRANSLATED_PORT: u16 = 8080;

fn write_config(lab_name: &str, mode: &str) -> Result<PathBuf> {
    let targets = |port: u16| -> String {
        (0..TARGETS)
            .map(|i| {
                format!(
                    "      - address: {}\n        port: {port}\n",
                    target_addr(i)
                )
            })
            .collect()
    };
    let text = format!(
        "listeners:
  - name: web
    address: {VIP}
    port: {TCP_PORT}
    protocol: tcp
    target_group: web
  - name: game
    address: {VIP}
    port: {UDP_PORT}
    protocol: udp
    target_group: game
target_groups:
  - name: web
    forwarding: {mode}
    targets:
{}  - name: game
    forwarding: {mode}
    targets:
{}",
        targets(TCP_PORT),
        targets(UDP_PORT)
    );
    let path = std::env::temp_dir().join(format!("{lab_name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Every flow talked to one target only; returns flows per target.
fn flows_per_target(kind: &str, answers: &[Answers]) -> Result<BTreeMap<String, usize>> {
    for (i, a) in answers.iter().enumerate() {
        ensure!(
            a.iter().all(|name| name == &a[0]),
            "{kind} flow {i} was answered by several targets: {a:?}"
        );
    }
    Ok(share(answers))
}

fn assert_fair(kind: &str, per_target: &BTreeMap<String, usize>) -> Result<()> {
    let fair = FLOWS as f64 / TARGETS as f64;
    for i in 0..TARGETS {
        let name = format!("t{}", i + 1);
        let got = per_target.get(&name).copied().unwrap_or(0) as f64;
        ensure!(
            (got - fair).abs() <= 0.35 * fair,
            "{kind}: {name} got {got} of {FLOWS} flows, outside ±35% of {fair:.0}: {per_target:?}"
        );
    }
    Ok(())
}

fn spreads_flows_and_replies_bypass_the_balancer(mode: &str) -> Result<()> {
    let name = format!("lbt-{mode}-{}", std::process::id() % 10000);
    let mut lab = Lab::new(&name, TARGETS)?;
    let config = write_config(&name, mode)?;

    // Before preparation a target is reported as not ready; after it, as ready.
    let target = |action: &'static str| {
        [
            "target",
            "-i",
            IFACE,
            "--mode",
            mode,
            "--vip",
            "203.0.113.10",
            action,
        ]
    };
    let check = target("--check");
    ensure!(
        lab.lb("t1", &check).is_err(),
        "`lb target --check` passed on an unprepared host"
    );
    lab.prepare_targets(mode, &[VIP])?;
    let report = lab.lb("t1", &check)?;
    ensure!(!report.contains("missing"), "after `lb target`: {report}");

    lab.start_tcp_servers(TCP_PORT, TCP_REPLY)?;
    lab.start_udp_servers(VIP, UDP_PORT, UDP_REPLY)?;
    let mut balancer = lab.start_balancer(&config, &[])?;

    let rx_before = lab.rx_bytes("lb")?;
    let (tcp, tcp_bytes) = tcp_clients(&lab, VIP, TCP_PORT, FLOWS, REQUESTS)?;
    let (udp, udp_bytes) = udp_clients(&lab, VIP, UDP_PORT, FLOWS, REQUESTS)?;
    let rx_delta = lab.rx_bytes("lb")? - rx_before;

    assert_fair("tcp", &flows_per_target("tcp", &tcp)?)?;
    assert_fair("udp", &flows_per_target("udp", &udp)?)?;
    let reply_bytes = tcp_bytes + udp_bytes;
    ensure!(
        reply_bytes >= (FLOWS * REQUESTS * (TCP_REPLY + UDP_REPLY)) as u64,
        "the client received only {reply_bytes} reply bytes"
    );
    // Only the requests cross the balancer: far fewer bytes than the replies the client got.
    ensure!(
        rx_delta * 2 < reply_bytes,
        "the balancer received {rx_delta} bytes while the client got {reply_bytes} reply bytes: replies are not bypassing it"
    );

    // SIGTERM detaches and leaves the interface as it was.
    ensure!(
        lab.xdp_attached("lb")?,
        "no XDP program on the balancer's interface"
    );
    let (status, log) = balancer.terminate(&mut lab)?;
    ensure!(status.success(), "lb exited with {status}: {log:?}");
    ensure!(
        !lab.xdp_attached("lb")?,
        "XDP program left attached after SIGTERM"
    );

    // `lb target --undo` reverts the preparation.
    let undo = target("--undo");
    lab.lb("t1", &undo)?;
    ensure!(
        lab.lb("t1", &check).is_err(),
        "`lb target --undo` left the host prepared"
    );
    if mode == "ipip" {
        ensure!(
            !lab.xdp_attached("t1")?,
            "`lb target --undo` left the decap program attached"
        );
    }
    let _ = std::fs::remove_file(config);
    Ok(())
}

#[test]
fn dsr_spreads_flows_and_replies_bypass_the_balancer() -> Result<()> {
    spreads_flows_and_replies_bypass_the_balancer("dsr")
}

#[test]
fn ipip_spreads_flows_and_replies_bypass_the_balancer() -> Result<()> {
    spreads_flows_and_replies_bypass_the_balancer("ipip")
}

/// Path MTU discovery through the balancer, both families. A client behind a router whose link
/// to it has a 1280-byte MTU downloads 4 MB from a DSR target over TCP, over IPv4 and over
/// IPv6. The target's 1500-byte segments stop at the router, whose "fragmentation needed" or
/// "packet too big" goes to their source, the VIP, so to the balancer: lb sends it on to the
/// flow's target, which lowers its path MTU and resends smaller. Without that the download
/// stalls: a build whose `icmp::to_target` dropped errors for dsr groups failed here with
/// "stalled after 0 bytes" (every full-size segment was lost).
#[test]
fn a_download_over_a_smaller_mtu_path_completes_because_lb_forwards_fragmentation_needed()
-> Result<()> {
    const DOWNLOAD: usize = 4_000_000;
    const PORT: u16 = 8000;
    let name = format!("lbt-pmtu-{}", std::process::id() % 10000);
    let mut lab = Lab::new(&name, 1)?;
    lab.add_far_client(1280)?;
    let vips = [IpAddr::V4(VIP), IpAddr::V6(VIP6)];
    lab.prepare_targets("dsr", &vips)?;
    lab.start_tcp_server(0, PORT, DOWNLOAD)?;
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "listeners:
  - {{name: files, address: {VIP}, port: {PORT}, protocol: tcp, target_group: files}}
  - {{name: files6, address: '{VIP6}', port: {PORT}, protocol: tcp, target_group: files}}
target_groups:
  - name: files
    targets: [{{address: {}, port: {PORT}}}]
",
            target_addr(0)
        ),
    )?;
    let _balancer = lab.start_balancer(&config, &[])?;

    let sent_on = || -> Result<u64> {
        let status = lab.status()?;
        Ok(status.icmp.get("error_to_target").copied().unwrap_or(0))
    };
    for vip in vips {
        let before = sent_on()?;
        let received = in_netns(&lab.ns("far"), move || -> Result<usize> {
            let addr = SocketAddr::new(vip, PORT);
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            // A stalled download shows as a read that times out.
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut writer = stream.try_clone()?;
            writeln!(writer, "download")?;
            let mut line = Vec::with_capacity(DOWNLOAD);
            let read = BufReader::new(stream).read_until(b'\n', &mut line);
            read.with_context(|| format!("{vip}: stalled after {} bytes", line.len()))?;
            Ok(line.len())
        })??;
        ensure!(
            received == DOWNLOAD,
            "{vip}: received {received} of {DOWNLOAD} bytes"
        );
        ensure!(
            sent_on()? > before,
            "{vip}: no ICMP error went to the target"
        );
    }
    let _ = std::fs::remove_file(config);
    Ok(())
}

/// A dual-stack config, written for lab `name`: an IPv4 and an IPv6 listener for TCP (the
/// IPv6 one on `tcp6_port`) and for UDP, each pair on one group (`group`: its settings, as
/// YAML flow-mapping entries) of the lab's targets, `address(i)` each, serving on `TCP_PORT`
/// and `UDP_PORT`.
fn dual_stack_config(
    name: &str,
    tcp6_port: u16,
    group: &str,
    address: impl Fn(usize) -> String,
) -> Result<PathBuf> {
    let targets = |port: u16| targets_yaml(TARGETS, port, &address);
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        format!(
            "listeners:
  - {{name: web, address: {VIP}, port: {TCP_PORT}, protocol: tcp, target_group: web}}
  - {{name: web6, address: '{VIP6}', port: {tcp6_port}, protocol: tcp, target_group: web}}
  - {{name: game, address: {VIP}, port: {UDP_PORT}, protocol: udp, target_group: game}}
  - {{name: game6, address: '{VIP6}', port: {UDP_PORT}, protocol: udp, target_group: game}}
target_groups:
  - {{name: web, {group}targets: [{}]}}
  - {{name: game, {group}targets: [{}]}}
",
            targets(TCP_PORT),
            targets(UDP_PORT)
        ),
    )?;
    Ok(config)
}

/// Clients of both families at once, through `dual_stack_config`'s listeners (each VIP with
/// its TCP port): every target serves its share of each, and the replies reach the clients
/// without crossing the balancer. Returns the flows per listener.
fn clients_of_both_families(lab: &Lab, vips: [(IpAddr, u16); 2]) -> Result<usize> {
    let rx_before = lab.rx_bytes("lb")?;
    let flows = FLOWS / 2;
    let mut reply_bytes = 0;
    for (vip, tcp_port) in vips {
        let (tcp, tcp_bytes) = tcp_clients(lab, vip, tcp_port, flows, REQUESTS)?;
        let (udp, udp_bytes) = udp_clients(lab, vip, UDP_PORT, flows, REQUESTS)?;
        for (kind, answers) in [("tcp", &tcp), ("udp", &udp)] {
            let per_target = flows_per_target(kind, answers)?;
            ensure!(
                per_target.len() == TARGETS && per_target.values().all(|&n| n >= flows / 6),
                "{vip} {kind}: {per_target:?}"
            );
        }
        reply_bytes += tcp_bytes + udp_bytes;
    }
    let rx_delta = lab.rx_bytes("lb")? - rx_before;
    ensure!(
        reply_bytes >= (2 * flows * REQUESTS * (TCP_REPLY + UDP_REPLY)) as u64,
        "the clients received only {reply_bytes} reply bytes"
    );
    ensure!(
        rx_delta * 2 < reply_bytes,
        "the balancer received {rx_delta} bytes while the clients got {reply_bytes}: replies are not bypassing it"
    );
    Ok(flows)
}

/// Dual stack through one dsr group: an IPv4 and an IPv6 listener each for TCP :80 and UDP
/// :7777, real clients of both families at once, the same targets (dual-stack hosts named by
/// their IPv4 addresses, the IPv6 VIP on lo by `lb target`) answering each directly.
#[test]
fn ipv4_and_ipv6_clients_share_a_dual_stack_dsr_group() -> Result<()> {
    let name = format!("lbt-dual-{}", std::process::id() % 10000);
    let mut lab = Lab::new(&name, TARGETS)?;
    lab.enable_ipv6()?;
    let vips = [IpAddr::V4(VIP), IpAddr::V6(VIP6)];
    lab.prepare_targets("dsr", &vips)?;
    lab.start_tcp_servers(TCP_PORT, TCP_REPLY)?;
    for vip in vips {
        lab.start_udp_servers(vip, UDP_PORT, UDP_REPLY)?;
    }
    let config = dual_stack_config(&name, TCP_PORT, "", |i| target_addr(i).to_string())?;
    let _balancer = lab.start_balancer(&config, &[])?;

    let flows = clients_of_both_families(&lab, [(vips[0], TCP_PORT), (vips[1], TCP_PORT)])?;
    let status = lab.status()?;
    let web6 = status
        .listeners
        .iter()
        .find(|l| l.name == "web6")
        .context("web6 in lb status")?;
    ensure!(web6.address == format!("[{VIP6}]:{TCP_PORT}"), "{web6:?}");
    ensure!(web6.traffic.new_flows >= flows as u64, "{web6:?}");
    let _ = std::fs::remove_file(config);
    Ok(())
}

/// ipip to targets named by their IPv6 addresses: IPv6 clients' packets travel as ip6ip6, IPv4
/// clients' as IPv4-in-IPv6, through one group. `lb target -c` finds each host's targets by
/// its IPv6 address and installs the decap for both, and the reply-port translation of the
/// IPv6 TCP listener (:8080, served on :80); health checks go over IPv6, next hops by
/// neighbour discovery; replies go straight to the clients.
#[test]
fn ipv4_and_ipv6_clients_reach_ipv6_targets_through_ipip() -> Result<()> {
    let name = format!("lbt-ip6ip6-{}", std::process::id() % 10000);
    let mut lab = Lab::new(&name, TARGETS)?;
    lab.enable_ipv6()?;
    let vips = [IpAddr::V4(VIP), IpAddr::V6(VIP6)];
    let config = dual_stack_config(
        &name,
        TRANSLATED_PORT,
        &format!("forwarding: ipip, health_check: {FAST_TCP_CHECK}, "),
        |i| format!("'{}'", target_addr6(i)),
    )?;
    let path = config.to_string_lossy();
    for i in 1..=TARGETS {
        let said = lab.lb(&format!("t{i}"), &["target", "-i", IFACE, "-c", &path])?;
        ensure!(
            said.contains("decap")
                && said.contains(&format!(
                    "[{VIP6}]:{TCP_PORT}/tcp answers as :{TRANSLATED_PORT}"
                )),
            "t{i}: {said}"
        );
    }
    lab.start_tcp_servers(TCP_PORT, TCP_REPLY)?;
    for vip in vips {
        lab.start_udp_servers(vip, UDP_PORT, UDP_REPLY)?;
    }
    let mut balancer = lab.start_balancer(&config, &[])?;
    for (group, port) in [("web", TCP_PORT), ("game", UDP_PORT)] {
        for i in 0..TARGETS {
            let target = format!("[{}]:{port} in {group}", target_addr6(i));
            balancer.wait_for_log(&[&target, "-> healthy"], Duration::from_secs(10))?;
        }
    }

    clients_of_both_families(&lab, [(vips[0], TCP_PORT), (vips[1], TRANSLATED_PORT)])?;
    let status = lab.status()?;
    let web = status
        .target_groups
        .iter()
        .find(|g| g.name == "web")
        .context("web in lb status")?;
    ensure!(
        web.targets
            .iter()
            .all(|t| t.target.is_ipv6() && t.state == "healthy"),
        "{web:?}"
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}
