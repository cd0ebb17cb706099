//! Hot reload and draining in the lab, with long-lived TCP connections. Needs root.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lb_tests::{Balancer, Connection, IFACE, Lab, VIP, target_addr, tcp_clients, udp_clients};

/// A web group (tcp :80, dsr) over targets `hosts` (0-based), checked every second.
fn config_text(hosts: &[usize], delay: &str) -> String {
    let targets: String = hosts
        .iter()
        .map(|&i| format!("      - {{address: {}, port: 80}}\n", target_addr(i)))
        .collect();
    format!(
        "listeners:
  - {{name: web, address: {VIP}, port: 80, protocol: tcp, target_group: web}}
target_groups:
  - name: web
    deregistration_delay: {delay}
    health_check: {{protocol: tcp, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}}
    targets:
{targets}"
    )
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    Ok(())
}

fn start(
    name: &str,
    targets: usize,
    hosts: &[usize],
    delay: &str,
) -> Result<(Lab, Balancer, PathBuf)> {
    let mut lab = Lab::new(name, targets)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 100)?;
    lab.start_udp_servers(VIP, 7777, 100)?;
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    write(&config, &config_text(hosts, delay))?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    for &i in hosts {
        balancer.wait_for_log(
            &[&format!("{}:80", target_addr(i)), "-> healthy"],
            Duration::from_secs(5),
        )?;
    }
    Ok((lab, balancer, config))
}

fn reload(lab: &Lab) -> Result<String> {
    lab.lb("lb", &["reload", "-i", IFACE])
}

/// New flows per target of the web group, from lb's /status.
fn target_new_flows(lab: &Lab) -> Result<HashMap<String, u64>> {
    let status = lab.status()?;
    let web = status
        .target_groups
        .iter()
        .find(|g| g.name == "web")
        .ok_or_else(|| anyhow::anyhow!("no web group"))?;
    Ok(web
        .targets
        .iter()
        .map(|t| (t.target.to_string(), t.traffic.new_flows))
        .collect())
}

/// Opens `n` connections and returns them with the target that answered each.
fn open(lab: &Lab, n: usize) -> Result<Vec<(Connection, String)>> {
    (0..n)
        .map(|_| {
            let mut c = Connection::open(lab, VIP, 80)?;
            let name = c.request()?;
            Ok((c, name))
        })
        .collect()
}

/// How many connections are still answered by the target that answered them first.
fn kept(connections: &mut [(Connection, String)]) -> Result<usize> {
    let mut kept = 0;
    for (c, first) in connections.iter_mut() {
        if c.request()? == *first {
            kept += 1;
        }
    }
    Ok(kept)
}

#[test]
fn reload_adding_a_target_keeps_established_flows_and_bad_reloads_change_nothing() -> Result<()> {
    let name = format!("lbr-add-{}", std::process::id() % 10000);
    let (lab, mut balancer, config) = start(&name, 4, &[0, 1, 2], "300s")?;
    let mut connections = open(&lab, 200)?;

    let counters_before = target_new_flows(&lab)?;
    // The reload adds t4, gives t1 a weight of 3 and adds a UDP listener with a group of its own.
    balancer.mark();
    let extended = format!(
        "{}  - name: game
    targets:
      - {{address: {}, port: 7777}}
      - {{address: {}, port: 7777}}
",
        config_text(&[0, 1, 2, 3], "300s").replace(
            &format!("address: {}, port: 80}}", target_addr(0)),
            &format!("address: {}, port: 80, weight: 3}}", target_addr(0)),
        ),
        target_addr(1),
        target_addr(2)
    )
    .replace(
        "target_groups:",
        &format!("  - {{name: game, address: {VIP}, port: 7777, protocol: udp, target_group: game}}\ntarget_groups:"),
    );
    write(&config, &extended)?;
    let said = reload(&lab)?;
    ensure!(
        said.contains("asked lb") && said.contains("2 listeners, 2 target groups, 6 targets"),
        "{said}"
    );
    balancer.wait_for_log(&["reloaded", "6 targets"], Duration::from_secs(5))?;
    balancer.wait_for_log(
        &[&format!("{}:80", target_addr(3)), "initial -> healthy"],
        Duration::from_secs(5),
    )?;

    // Counters of the targets the reload kept carry on from where they were.
    let counters_after = target_new_flows(&lab)?;
    for (target, before) in &counters_before {
        let after = counters_after.get(target).copied().unwrap_or(0);
        ensure!(
            *before > 0 && after >= *before,
            "{target}: {before} new flows before the reload, {after} after"
        );
    }
    let kept = kept(&mut connections)?;
    ensure!(
        kept * 100 >= connections.len() * 99,
        "only {kept} of {} flows kept their target",
        connections.len()
    );
    // New connections reach the new target.
    let (answers, _) = tcp_clients(&lab, VIP, 80, 120, 1)?;
    let on_t4 = answers.iter().filter(|a| a[0] == "t4").count();
    // Weights 3+1+1+1: t4's fair share is 20 of 120 (standard deviation about 4).
    ensure!(on_t4 >= 5, "t4 got {on_t4} of 120 new connections");
    // The new listener answers, from its group's targets.
    let (answers, _) = udp_clients(&lab, VIP, 7777, 20, 1)?;
    ensure!(
        answers.iter().all(|a| a[0] == "t2" || a[0] == "t3"),
        "{answers:?}"
    );

    // An invalid config: `lb reload` says why (as `lb check` does), and so does lb on SIGHUP;
    // nothing changes.
    write(
        &config,
        &extended.replace("port: 80, protocol", "port: 70000, protocol"),
    )?;
    let refused = reload(&lab).expect_err("lb reload accepted an invalid config");
    ensure!(
        refused
            .to_string()
            .contains(":2:46: port 70000 is out of range 1-65535"),
        "{refused}"
    );
    balancer.mark();
    // SAFETY: plain kill(2).
    unsafe { libc::kill(balancer.pid as i32, libc::SIGHUP) };
    let line = balancer.wait_for_log(&["reload refused"], Duration::from_secs(5))?;
    ensure!(line.contains("port 70000 is out of range"), "{line}");
    let still = self::kept(&mut connections)?;
    ensure!(
        still == kept,
        "an invalid reload moved flows: {still} kept, was {kept}"
    );

    // The first IPv6 listener: a valid config (`lb reload` checks it and asks), but the IPv6
    // tables of an lb started without one hold one entry: lb refuses it, saying why.
    write(
        &config,
        &extended.replace(
            "target_groups:",
            "  - {name: web6, address: '2001:db8:10::10', port: 80, protocol: tcp, target_group: web}\ntarget_groups:",
        ),
    )?;
    balancer.mark();
    reload(&lab)?;
    let line = balancer.wait_for_log(&["reload refused"], Duration::from_secs(5))?;
    ensure!(
        line.contains("the first listener with an IPv6 VIP needs a restart of lb"),
        "{line}"
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}

#[test]
fn draining_keeps_established_connections_and_takes_no_new_ones() -> Result<()> {
    let name = format!("lbr-drain-{}", std::process::id() % 10000);
    let delay = Duration::from_secs(4);
    let (lab, mut balancer, config) = start(&name, 3, &[0, 1, 2], "4s")?;
    let mut connections = open(&lab, 60)?;
    let mut on_t1: Vec<(Connection, String)> = Vec::new();
    for (c, first) in connections.drain(..) {
        if first == "t1" {
            on_t1.push((c, first));
        }
    }
    ensure!(on_t1.len() >= 5, "only {} connections on t1", on_t1.len());

    balancer.mark();
    write(&config, &config_text(&[1, 2], "4s"))?;
    reload(&lab)?;
    let t1 = format!("{}:80 in web", target_addr(0));
    balancer.wait_for_log(&[&t1, "healthy -> draining"], Duration::from_secs(5))?;
    let draining_since = Instant::now();

    // During the delay: established connections keep talking to t1; new ones avoid it.
    ensure!(
        kept(&mut on_t1)? == on_t1.len(),
        "a draining connection moved"
    );
    let share = lb_tests::share(&tcp_clients(&lab, VIP, 80, 60, 1)?.0);
    ensure!(
        !share.contains_key("t1"),
        "new connections reached the draining t1: {share:?}"
    );
    ensure!(
        kept(&mut on_t1)? == on_t1.len(),
        "a draining connection moved"
    );

    // After the delay: unused.
    balancer.wait_for_log(&[&t1, "draining -> unused"], delay + Duration::from_secs(3))?;
    ensure!(
        draining_since.elapsed() + Duration::from_millis(1100) >= delay,
        "unused after only {:?}",
        draining_since.elapsed()
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}
