//! lb in an environment it does not own: other lbs on the same host, users without
//! privileges. Needs root.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Result, ensure};
use lb_tests::{
    FAST_TCP_CHECK, LB_ADDR, Lab, VIP, VIP6, in_netns, lb_binary, serving_lab, share, tcp_clients,
};

/// The share of 30 connections through `lab`'s balancer, each target answering.
fn answered(lab: &Lab) -> Result<usize> {
    let (answers, _) = tcp_clients(lab, VIP, 80, 30, 1)?;
    Ok(share(&answers).values().sum())
}

/// Two lbs on `eth0` in two network namespaces, started as the README says (`nsenter --net`,
/// the host's BPF filesystem): each attaches to its own interface, pins in its own directory,
/// and forwards its own clients' traffic; stopping one leaves the other forwarding. Given the
/// other's pin directory, one refuses to start.
#[test]
fn two_lbs_on_eth0_in_two_namespaces_each_forward_their_own_traffic() -> Result<()> {
    let (mut first, first_config) = serving_lab("lbnsa", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let (mut second, second_config) = serving_lab("lbnsb", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let mut a = first.start_balancer(&first_config, &[])?;
    // Given the first one's pin directory, the second refuses to adopt what is not its own.
    let shared = first.pin_dir();
    let refused = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", second.ns("lb")))
        .arg(lb_binary())
        .args(["run", "-c"])
        .arg(&second_config)
        .args(["-i", "eth0", "--pin-dir"])
        .arg(&shared)
        .output()?;
    let said = String::from_utf8_lossy(&refused.stderr);
    let want = format!(
        "lb: the XDP link pinned at {} is not the program attached to eth0: the pins in {} belong to another lb; give this one its own --pin-dir",
        shared.join("link-eth0").display(),
        shared.display()
    );
    ensure!(
        refused.status.code() == Some(1) && said.lines().last() == Some(want.as_str()),
        "{said}"
    );
    let mut b = second.start_balancer(&second_config, &[])?;
    for (balancer, lab) in [(&mut a, &first), (&mut b, &second)] {
        let line = balancer.wait_for_log(&["forwarding on"], Duration::from_secs(1))?;
        ensure!(
            line.contains("XDP)") && !line.contains("adopted"),
            "{}: {line}",
            lab.ns("lb")
        );
    }
    for (balancer, lab) in [(&mut a, &first), (&mut b, &second)] {
        ensure!(
            lab.pin_dir().join("link-eth0").exists(),
            "no link pinned in {}",
            lab.pin_dir().display()
        );
        balancer.wait_all_healthy(3, Duration::from_secs(10))?;
    }
    ensure!(first.pin_dir() != second.pin_dir());
    ensure!(answered(&first)? == 30, "the first lab's clients");
    ensure!(answered(&second)? == 30, "the second lab's clients");

    let (status, _) = a.terminate(&mut first)?;
    ensure!(status.success(), "the first lb exited with {status}");
    ensure!(
        second.pin_dir().join("link-eth0").exists(),
        "stopping the first lb removed the second's pins"
    );
    ensure!(
        answered(&second)? == 30,
        "the second lab after the first lb stopped"
    );
    let (status, _) = b.terminate(&mut second)?;
    ensure!(status.success(), "the second lb exited with {status}");
    let netns_dir = second.pin_dir().parent().map(|d| d.to_owned());
    ensure!(
        netns_dir.as_ref().is_some_and(|d| !d.exists()),
        "pins left in {netns_dir:?}"
    );
    Ok(())
}

/// `request` to the admin endpoint of `lab`'s lb, from inside its namespace; the answer.
fn admin(lab: &Lab, request: &'static str) -> Result<String> {
    in_netns(&lab.ns("lb"), move || -> Result<String> {
        let mut stream = TcpStream::connect("127.0.0.1:9617")?;
        stream.write_all(request.as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })?
}

/// What a local user without privileges can do with a running lb: read its status and
/// metrics; not reload it, not start another, and nothing through the admin endpoint but
/// read, which other hosts cannot reach at all.
#[test]
fn an_unprivileged_user_reads_status_and_metrics_and_changes_nothing() -> Result<()> {
    let (mut lab, config) = serving_lab("lbuser", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    balancer.wait_all_healthy(3, Duration::from_secs(10))?;
    let as_nobody = |args: &[&str]| -> Result<Output> {
        Ok(Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", lab.ns("lb")))
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .arg(lb_binary())
            .args(args)
            .output()?)
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();

    let status = as_nobody(&["status", "-i", "eth0"])?;
    ensure!(
        status.status.success() && text(&status.stdout).contains("198.51.100.11:80"),
        "lb status as nobody: {status:?}"
    );
    let reload = as_nobody(&["reload", "-i", "eth0"])?;
    ensure!(
        reload.status.code() == Some(1)
            && text(&reload.stderr)
                == format!(
                    "lb: lb (pid {}) runs as another user: only root, or that user, may reload it",
                    balancer.pid
                ),
        "lb reload as nobody: {reload:?}"
    );
    let config = config.display().to_string();
    let run = as_nobody(&["run", "-c", &config, "-i", "eth0"])?;
    ensure!(
        run.status.code() == Some(1)
            && text(&run.stderr)
                == "lb: lb run needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; this process lacks CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON",
        "lb run as nobody: {run:?}"
    );

    // The endpoint answers GET /metrics and /status, nothing else.
    let metrics = admin(&lab, "GET /metrics HTTP/1.0\r\n\r\n")?;
    ensure!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("lb_listener_packets_total"));
    for request in [
        "POST /status HTTP/1.0\r\n\r\n",
        "PUT /metrics HTTP/1.0\r\n\r\n",
        "GET /reload HTTP/1.0\r\n\r\n",
    ] {
        let answer = admin(&lab, request)?;
        ensure!(answer.starts_with("HTTP/1.1 404"), "{request:?}: {answer}");
    }
    // Only on loopback: the client, one hop away, cannot connect.
    let from_client = in_netns(&lab.ns("client"), || {
        TcpStream::connect_timeout(&SocketAddr::from((LB_ADDR, 9617)), Duration::from_secs(1))
    })?;
    ensure!(
        from_client
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the admin endpoint from another host: {from_client:?}"
    );
    // Nothing changed: no reload was tried, and lb forwards.
    let metrics = admin(&lab, "GET /metrics HTTP/1.0\r\n\r\n")?;
    for result in ["success", "failure"] {
        let line = format!("lb_config_reloads_total{{result=\"{result}\"}} 0");
        ensure!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
    ensure!(answered(&lab)? == 30);
    Ok(())
}

/// Runs `ip` with `args`; fails unless it succeeds.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output()?;
    ensure!(out.status.success(), "ip {args:?}: {out:?}");
    Ok(())
}

/// Whether the client's connections reach every target again within `timeout`, asking every
/// 200 ms.
fn all_answer_within(lab: &Lab, timeout: Duration) -> Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok((answers, _)) = tcp_clients(lab, VIP, 80, 30, 1)
            && share(&answers).len() == lab.targets
        {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(false)
}

/// A target replaced by a host with the same address and another MAC, which announces
/// nothing: lb's health check finds it gone, lb has the kernel ask for its MAC afresh, and it
/// takes traffic again within seconds, without a reload; status and metrics show the MAC.
#[test]
fn a_target_whose_mac_changes_gets_traffic_again_without_a_reload() -> Result<()> {
    let (mut lab, config) = serving_lab("lbmac", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    balancer.wait_all_healthy(3, Duration::from_secs(10))?;
    ensure!(all_answer_within(&lab, Duration::from_secs(1))?);
    let new_mac = "02:00:00:00:aa:01";
    balancer.mark();
    let changed = std::time::Instant::now();
    ip(&[
        "-n",
        &lab.target_ns(0),
        "link",
        "set",
        "eth0",
        "address",
        new_mac,
    ])?;
    balancer.wait_for_log(
        &["198.51.100.11 on eth0 is at 02:00:00:00:aa:01"],
        Duration::from_secs(15),
    )?;
    ensure!(
        all_answer_within(&lab, Duration::from_secs(10))?,
        "t1 does not answer through lb"
    );
    let took = changed.elapsed();
    ensure!(took < Duration::from_secs(15), "back after {took:?}");
    let status = lab.status()?;
    let t1 = status
        .target_groups
        .iter()
        .flat_map(|g| &g.targets)
        .find(|t| t.target.ip() == std::net::Ipv4Addr::new(198, 51, 100, 11))
        .map(|t| t.mac.clone());
    balancer.mark();
    ensure!(
        t1 == Some(Some(new_mac.to_owned())),
        "status shows {t1:?}; lb said:\n{}",
        balancer.log.join("\n")
    );
    let metrics = admin(&lab, "GET /metrics HTTP/1.0\r\n\r\n")?;
    ensure!(metrics.contains(
        "lb_target_next_hop_resolved{target=\"198.51.100.11:80\",target_group=\"web\"} 1"
    ));
    ensure!(metrics.contains("lb_config_reloads_total{result=\"success\"} 0"));
    Ok(())
}

/// lb's interface going down and up: lb says so and forwards again once it is up; removed:
/// lb says so in one sentence, removes its pins and exits 1.
#[test]
fn an_interface_that_goes_down_and_up_or_away_is_followed() -> Result<()> {
    let (mut lab, config) = serving_lab("lblink", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    balancer.wait_all_healthy(3, Duration::from_secs(10))?;
    let lb_ns = lab.ns("lb");
    ip(&["-n", &lb_ns, "link", "set", "eth0", "down"])?;
    balancer.wait_for_log(&["eth0 is down"], Duration::from_secs(5))?;
    ip(&["-n", &lb_ns, "link", "set", "eth0", "up"])?;
    balancer.wait_for_log(&["eth0 is up again"], Duration::from_secs(5))?;
    ensure!(
        all_answer_within(&lab, Duration::from_secs(10))?,
        "lb does not forward after eth0 came back"
    );

    ip(&["-n", &lb_ns, "link", "del", "eth0"])?;
    let (status, lines) = balancer.wait_exit(&mut lab, Duration::from_secs(10))?;
    ensure!(
        status.code() == Some(1),
        "lb exited with {status}: {lines:?}"
    );
    ensure!(
        lines.last().is_some_and(|l| l
            == "lb: interface eth0 was removed: lb detached and stopped; start it again once the interface is back"),
        "{lines:?}"
    );
    let netns_dir = lab.pin_dir().parent().map(|d| d.to_owned());
    ensure!(
        netns_dir.as_ref().is_some_and(|d| !d.exists()),
        "pins left in {netns_dir:?}"
    );
    Ok(())
}

/// A reload that adds a target nobody answers ARP for is done at once (nothing waits for the
/// reply); the target is shown without a MAC in `lb status` and the metrics, and takes no
/// flows. When a host takes its address, lb learns the MAC and the target joins.
#[test]
fn a_target_without_a_mac_is_shown_and_joins_once_it_answers() -> Result<()> {
    let (mut lab, config) = serving_lab("lbarp", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    balancer.wait_all_healthy(3, Duration::from_secs(10))?;
    let absent = "198.51.100.14";
    let text = std::fs::read_to_string(&config)?.replacen(
        "  - name: game",
        &format!("      - {{address: {absent}, port: 80}}\n  - name: game"),
        1,
    );
    std::fs::write(&config, text)?;
    balancer.mark();
    let asked = std::time::Instant::now();
    lab.lb("lb", &["reload", "-i", "eth0"])?;
    balancer.wait_for_log(&["reloaded"], Duration::from_secs(5))?;
    // Including `lb reload` itself; waiting for the ARP reply would take 3 s.
    let took = asked.elapsed();
    ensure!(
        took < Duration::from_millis(2500),
        "the reload took {took:?}"
    );

    let status = lab.status()?;
    let row = status
        .target_groups
        .iter()
        .flat_map(|g| &g.targets)
        .find(|t| t.target.to_string() == format!("{absent}:80"))
        .cloned();
    ensure!(
        row.as_ref().is_some_and(|t| t.mac.is_none()),
        "status: {row:?}"
    );
    let metrics = admin(&lab, "GET /metrics HTTP/1.0\r\n\r\n")?;
    let unresolved =
        format!("lb_target_next_hop_resolved{{target=\"{absent}:80\",target_group=\"web\"}} 0");
    ensure!(metrics.contains(&unresolved), "no {unresolved}");
    let (answers, _) = tcp_clients(&lab, VIP, 80, 30, 1)?;
    ensure!(share(&answers).values().sum::<usize>() == 30);

    // A host takes the address: within seconds lb has its MAC, and its check passes.
    ip(&[
        "-n",
        &lab.target_ns(2),
        "addr",
        "add",
        &format!("{absent}/24"),
        "dev",
        "eth0",
    ])?;
    balancer.wait_for_log(
        &[&format!("{absent} on eth0 is at")],
        Duration::from_secs(5),
    )?;
    balancer.wait_for_log(
        &[&format!("{absent}:80 in web"), "-> healthy"],
        Duration::from_secs(10),
    )?;
    let status = lab.status()?;
    ensure!(
        status
            .target_groups
            .iter()
            .flat_map(|g| &g.targets)
            .all(|t| t.mac.is_some())
    );
    Ok(())
}

/// `ping VIP` and `ping -6 VIP6` from a client: the balancer answers (no host holds either
/// VIP), and counts it.
#[test]
fn ping_of_a_vip_is_answered_by_the_balancer() -> Result<()> {
    let (mut lab, config) = serving_lab("lbping", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    lab.enable_ipv6()?;
    let text = std::fs::read_to_string(&config)?.replace(
        "target_groups:",
        &format!("  - {{name: web6, address: '{VIP6}', port: 80, protocol: tcp, target_group: web}}\ntarget_groups:"),
    );
    std::fs::write(&config, text)?;
    let _balancer = lab.start_balancer(&config, &[])?;
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        lab.ping(vip, 3)?;
    }
    let metrics = admin(&lab, "GET /metrics HTTP/1.0\r\n\r\n")?;
    ensure!(
        metrics.contains("lb_icmp_sent_total{kind=\"echo_reply\"} 6"),
        "{metrics}"
    );
    Ok(())
}
