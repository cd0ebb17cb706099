//! The balancing algorithms in the lab, with real clients and servers: round robin's turns, a
//! retransmitted SYN, least connections across a reload, source-IP hashing and stickiness.
//! Needs root.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{Balancer, Connection, IFACE, Lab, VIP, share, target_addr, tcp_clients};

const CHECK: &str = "{protocol: tcp, port: 80, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}";

/// A target group `name` over the lab's targets `hosts` (0-based) with `weights`, serving on
/// `port`, with `extra` lines (algorithm, stickiness).
fn group(name: &str, port: u16, hosts: &[(usize, u32)], extra: &str) -> String {
    let targets: String = hosts
        .iter()
        .map(|&(i, w)| format!("      - {{address: {}, weight: {w}}}\n", target_addr(i)))
        .collect();
    format!(
        "  - name: {name}\n    port: {port}\n    health_check: {CHECK}\n{extra}    targets:\n{targets}"
    )
}

/// A listener on the VIP at `port` for group `name`, of the same name.
fn listener(name: &str, port: u16) -> String {
    format!(
        "  - {{name: {name}, address: {VIP}, port: {port}, protocol: tcp, target_group: {name}}}\n"
    )
}

fn write_config(lab: &str, listeners: &[String], groups: &[String]) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{lab}.yaml"));
    let text = format!(
        "listeners:\n{}target_groups:\n{}",
        listeners.concat(),
        groups.concat()
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Waits until lb reports each of `hosts` healthy in `group`, whose targets serve on `port`.
fn wait_healthy(balancer: &mut Balancer, group: &str, port: u16, hosts: &[usize]) -> Result<()> {
    for &i in hosts {
        let target = format!("{}:{port} in {group}", target_addr(i));
        balancer.wait_for_log(&[&target, "-> healthy"], Duration::from_secs(10))?;
    }
    Ok(())
}

/// Per target name (t1, t2, ...): how many `answers` it gave.
fn per_target(answers: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        *counts.entry(a.clone()).or_default() += 1;
    }
    counts
}

/// Whether `counts` of t1, t2, t3 are `want`, each within ±1.
fn about(counts: &BTreeMap<String, usize>, want: [usize; 3]) -> bool {
    ["t1", "t2", "t3"]
        .iter()
        .zip(want)
        .all(|(t, w)| counts.get(*t).copied().unwrap_or(0).abs_diff(w) <= 1)
}

/// Active connections of group `group`'s targets, by target name (t1, t2, ...).
fn active_connections(lab: &Lab, group: &str) -> Result<BTreeMap<String, u64>> {
    let status = lab.status()?;
    let g = status
        .target_groups
        .iter()
        .find(|g| g.name == group)
        .with_context(|| format!("no group {group} in /status"))?;
    Ok(g.targets
        .iter()
        .map(|t| {
            let host = match t.target.ip() {
                std::net::IpAddr::V4(a) => a.octets()[3] as usize - 10,
                std::net::IpAddr::V6(a) => a.octets()[15] as usize - 10,
            };
            (format!("t{host}"), t.active_connections)
        })
        .collect())
}

fn new_flows(lab: &Lab, group: &str) -> Result<u64> {
    let status = lab.status()?;
    Ok(status
        .target_groups
        .iter()
        .filter(|g| g.name == group)
        .flat_map(|g| &g.targets)
        .map(|t| t.traffic.new_flows)
        .sum())
}

#[test]
fn round_robin_gives_each_target_its_turn_and_a_retransmitted_syn_keeps_its_target() -> Result<()> {
    let name = "lbrr";
    let mut lab = Lab::new(name, 3)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 64)?;
    lab.start_tcp_servers(81, 64)?;
    let rr = "    algorithm: round_robin\n";
    let config = write_config(
        name,
        &[listener("equal", 80), listener("weighted", 81)],
        &[
            group("equal", 80, &[(0, 1), (1, 1), (2, 1)], rr),
            group("weighted", 81, &[(0, 2), (1, 1), (2, 1)], rr),
        ],
    )?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    wait_healthy(&mut balancer, "equal", 80, &[0, 1, 2])?;
    wait_healthy(&mut balancer, "weighted", 81, &[0, 1, 2])?;

    // 90 connections one after another: 30 each; with weights 2:1:1, 45, 22 and 23.
    let (answers, _) = tcp_clients(&lab, VIP, 80, 90, 1)?;
    let equal = share(&answers);
    ensure!(about(&equal, [30, 30, 30]), "equal weights: {equal:?}");
    let (answers, _) = tcp_clients(&lab, VIP, 81, 90, 1)?;
    let weighted = share(&answers);
    ensure!(
        about(&weighted, [45, 22, 23]) || about(&weighted, [45, 23, 22]),
        "weights 2:1:1: {weighted:?}"
    );

    // The client's kernel retransmits a SYN whose SYN-ACK was lost; round robin must not give
    // the retransmission the next turn. The first SYN-ACK is dropped at the client.
    let client = lab.ns("client");
    let nft = |script: &str| -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &client, "nft"])
            .args(script.split(' '))
            .output()?;
        ensure!(out.status.success(), "nft {script}: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    nft("add table inet lbtest")?;
    nft("add chain inet lbtest input { type filter hook input priority 0 ; }")?;
    nft("add rule inet lbtest input tcp sport 80 tcp flags & (syn|ack) == (syn|ack) counter drop")?;
    let before = new_flows(&lab, "equal")?;
    let lab_ref = &lab;
    let answered = std::thread::scope(|scope| -> Result<String> {
        let connecting = scope.spawn(move || -> Result<String> {
            let mut c = Connection::open(lab_ref, VIP, 80)?;
            c.request()
        });
        // Once one SYN-ACK has been dropped, let the next through (the kernel resends the SYN
        // after a second).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !nft("list chain inet lbtest input")?.contains("packets 1 ") {
            ensure!(Instant::now() < deadline, "no SYN-ACK reached the client");
            std::thread::sleep(Duration::from_millis(20));
        }
        nft("delete table inet lbtest")?;
        connecting
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?
    })?;
    let after = new_flows(&lab, "equal")?;
    ensure!(
        after == before + 1,
        "the SYN and its retransmission made {} new flows, not 1 (answered by {answered})",
        after - before
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}

#[test]
fn least_connections_fills_a_new_target_and_counts_return_to_zero() -> Result<()> {
    let name = "lblc";
    let mut lab = Lab::new(name, 3)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 64)?;
    let lc = "    algorithm: least_connections\n";
    let write = |hosts: &[(usize, u32)]| {
        write_config(
            name,
            &[listener("game", 80)],
            &[group("game", 80, hosts, lc)],
        )
    };
    let config = write(&[(0, 1), (1, 1)])?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    wait_healthy(&mut balancer, "game", 80, &[0, 1])?;

    let open = |n: usize| -> Result<Vec<(Connection, String)>> {
        (0..n)
            .map(|_| {
                let mut c = Connection::open(&lab, VIP, 80)?;
                let by = c.request()?;
                Ok((c, by))
            })
            .collect()
    };
    let mut held = open(60)?;
    let first: Vec<String> = held.iter().map(|(_, by)| by.clone()).collect();
    let counts = per_target(&first);
    ensure!(
        counts.get("t1") == Some(&30) && counts.get("t2") == Some(&30),
        "60 held connections over t1 and t2: {counts:?}"
    );
    let active = active_connections(&lab, "game")?;
    ensure!(
        active.get("t1") == Some(&30) && active.get("t2") == Some(&30),
        "lb counts {active:?}"
    );

    write(&[(0, 1), (1, 1), (2, 1)])?;
    balancer.mark();
    lab.lb("lb", &["reload", "-i", IFACE])?;
    wait_healthy(&mut balancer, "game", 80, &[2])?;
    let more = open(30)?;
    let to_t3 = more.iter().filter(|(_, by)| by == "t3").count();
    ensure!(to_t3 >= 27, "t3 got {to_t3} of 30 new connections");
    held.extend(more);
    // Every held connection still answers from its target.
    for (c, by) in &mut held {
        ensure!(c.request()? == *by, "a held connection moved");
    }

    // Each close sends the client's FIN: every count returns to 0.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let active = active_connections(&lab, "game")?;
        if active.values().all(|&n| n == 0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("after every connection closed, lb still counts {active:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(config);
    Ok(())
}

#[test]
fn source_ip_keeps_clients_together_and_stickiness_keeps_them_across_a_reload() -> Result<()> {
    let name = "lbsip";
    let mut lab = Lab::new(name, 4)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 64)?;
    lab.start_tcp_servers(81, 64)?;
    const STICKY_FOR: Duration = Duration::from_secs(10);
    let write = |hosts: &[(usize, u32)]| {
        write_config(
            name,
            &[listener("hashed", 80), listener("sticky", 81)],
            &[
                group("hashed", 80, hosts, "    algorithm: source_ip\n"),
                group(
                    "sticky",
                    81,
                    hosts,
                    &format!(
                        "    stickiness: {{type: source_ip, duration: {}s}}\n",
                        STICKY_FOR.as_secs()
                    ),
                ),
            ],
        )
    };
    let config = write(&[(0, 1), (1, 1), (2, 1)])?;
    let clients = lab.add_client_addresses(30)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    wait_healthy(&mut balancer, "hashed", 80, &[0, 1, 2])?;
    wait_healthy(&mut balancer, "sticky", 81, &[0, 1, 2])?;

    // Who answers `n` connections from each client, which must all be the same one.
    let one_target_each = |port: u16, n: usize| -> Result<Vec<String>> {
        clients
            .iter()
            .map(|&client| {
                let answers: Vec<String> = (0..n)
                    .map(|_| Connection::open_from(&lab, Some(client), VIP, port)?.request())
                    .collect::<Result<_>>()?;
                ensure!(
                    answers.iter().all(|a| *a == answers[0]),
                    "the connections of {client} to port {port} went to {answers:?}"
                );
                Ok(answers[0].clone())
            })
            .collect()
    };
    // Stickiness over Maglev: without it, three connections of a client would mostly spread.
    let sticky = one_target_each(81, 3)?;
    let hashed = one_target_each(80, 2)?;

    // A reload adds t4: stickiness keeps every client where it was; source_ip moves about a
    // quarter of them (consistent hashing), not all.
    write(&[(0, 1), (1, 1), (2, 1), (3, 1)])?;
    balancer.mark();
    lab.lb("lb", &["reload", "-i", IFACE])?;
    wait_healthy(&mut balancer, "sticky", 81, &[3])?;
    wait_healthy(&mut balancer, "hashed", 80, &[3])?;
    let kept = one_target_each(81, 1)?;
    ensure!(
        kept == sticky,
        "sticky clients moved: {sticky:?} -> {kept:?}"
    );
    let sticky_since = Instant::now();
    let rehashed = one_target_each(80, 1)?;
    let moved = hashed.iter().zip(&rehashed).filter(|(a, b)| a != b).count();
    ensure!(
        (1..=15).contains(&moved),
        "adding a fourth target moved {moved} of 30 source_ip clients"
    );

    // Quiet for longer than the duration: their next flows follow Maglev, and some reach t4.
    let expired = sticky_since + STICKY_FOR + Duration::from_millis(500);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let after = one_target_each(81, 1)?;
    ensure!(
        after.iter().any(|t| t == "t4"),
        "no client reached the new target after stickiness ended: {after:?}"
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}
