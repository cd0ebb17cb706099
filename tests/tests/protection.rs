//! Protection in the lab: source allow-lists and the deny-list, with real clients on several
//! addresses; a SYN flood from random sources against held connections. Needs root.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{Connection, IFACE, Lab, VIP, target_addr};

const CHECK: &str = "{protocol: tcp, port: 80, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}";

fn config_text(allowed: Option<&str>) -> String {
    let allowed = allowed.map_or(String::new(), |a| format!("    allowed_sources: {a}\n"));
    format!(
        "denied_sources: [198.51.100.101/32]
listeners:
  - name: web
    address: {VIP}
    port: 80
    protocol: tcp
    target_group: web
{allowed}target_groups:
  - name: web
    port: 80
    health_check: {CHECK}
    targets: [{{address: {}}}, {{address: {}}}]
",
        target_addr(0),
        target_addr(1)
    )
}

#[test]
fn only_allowed_sources_connect_and_a_reload_changes_the_lists_without_cutting_flows() -> Result<()>
{
    let name = "lbsrc";
    let mut lab = Lab::new(name, 2)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 64)?;
    // .100 and .101 are in the allowed /31, and .101 is denied; .102 is outside.
    let clients = lab.add_client_addresses(3)?;
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(&config, config_text(Some("[198.51.100.100/31]")))?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    for i in 0..2 {
        let target = format!("{}:80 in web", target_addr(i));
        balancer.wait_for_log(&[&target, "-> healthy"], Duration::from_secs(10))?;
    }
    let connects = |source| {
        Connection::connect(&lab, source, VIP, 80, Duration::from_millis(700))
            .and_then(|mut c| c.request().map(|_| c))
            .ok()
    };
    let mut held = connects(Some(clients[0]))
        .ok_or_else(|| anyhow::anyhow!("an allowed client was refused"))?;
    let first = held.request()?;
    for source in [Some(clients[1]), Some(clients[2]), None] {
        ensure!(connects(source).is_none(), "{source:?} connected");
    }
    let refused = lab
        .status()?
        .drops
        .get("denied_source")
        .copied()
        .unwrap_or(0);
    ensure!(refused >= 3, "{refused} packets counted as denied_source");

    // Without the allow-list, .102 and the first address connect; .101 stays denied; the held
    // connection never noticed.
    std::fs::write(&config, config_text(None))?;
    balancer.mark();
    lab.lb("lb", &["reload", "-i", IFACE])?;
    balancer.wait_for_log(&["reloaded"], Duration::from_secs(5))?;
    ensure!(
        held.request()? == first,
        "the held connection moved or broke"
    );
    for source in [Some(clients[2]), None] {
        ensure!(
            connects(source).is_some(),
            "{source:?} refused after the reload"
        );
    }
    ensure!(
        connects(Some(clients[1])).is_none(),
        "a denied source connected"
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}

/// The flood test's health check: patient, so that a probe lost in the flood does not take a
/// target out (which would move its connections for another reason than the one tested).
const FLOOD_CHECK: &str = "{protocol: tcp, port: 80, interval: 1s, timeout: 900ms, healthy_threshold: 2, unhealthy_threshold: 10}";

/// The flood test's config: round robin over the lab's first `targets` targets, and a
/// connection table small enough for a flood to turn over hundreds of times.
fn flood_config(targets: usize) -> String {
    let targets: String = (0..targets)
        .map(|i| format!("      - {{address: {}}}\n", target_addr(i)))
        .collect();
    format!(
        "settings: {{connection_table_size: 1024}}
listeners:
  - {{name: web, address: {VIP}, port: 80, protocol: tcp, target_group: web}}
target_groups:
  - name: web
    port: 80
    algorithm: round_robin
    health_check: {FLOOD_CHECK}
    targets:
{targets}"
    )
}

/// hping3 flooding the VIP with SYNs from random sources, stopped when dropped.
struct Flood(Child);

impl Flood {
    fn start(lab: &Lab, seconds: u32) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("client"), "timeout"])
            .arg(seconds.to_string())
            .args(["hping3", "-q", "-S", "--flood", "--rand-source", "-p", "80"])
            .arg(VIP.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting hping3")?;
        Ok(Flood(child))
    }

    fn running(&mut self) -> Result<bool> {
        Ok(self.0.try_wait()?.is_none())
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn new_flows(lab: &Lab) -> Result<u64> {
    let status = lab.status()?;
    let web = status.listeners.iter().find(|l| l.name == "web");
    Ok(web.context("no listener web in /status")?.traffic.new_flows)
}

/// A SYN flood from random sources at hping3's full rate for 20 s, during which a reload adds
/// a target: 100 idle established connections all keep their targets (none is reset). With
/// round robin, a connection whose entry a flood evicted would be given the next turn, another
/// target, which resets it; built with `LB_TEST_NO_FLOOD_GUARD=1`, lb fails this test so.
#[test]
fn a_syn_flood_from_random_sources_with_a_reload_resets_no_established_connection() -> Result<()> {
    let name = "lbflood";
    let mut lab = Lab::new(name, 3)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 64)?;
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(&config, flood_config(2))?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    for i in 0..2 {
        let target = format!("{}:80 in web", target_addr(i));
        balancer.wait_for_log(&[&target, "-> healthy"], Duration::from_secs(10))?;
    }
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut c = Connection::open(&lab, VIP, 80)?;
        let target = c.request()?;
        held.push((c, target));
    }

    let before = new_flows(&lab)?;
    let started = Instant::now();
    let mut flood = Flood::start(&lab, 20)?;
    // Mid-flood: once it has turned the table over 20 times, a third target is added.
    while new_flows(&lab)? < before + 20 * 1024 {
        ensure!(flood.running()?, "hping3 ended early");
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "no flood reached lb"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&config, flood_config(3))?;
    balancer.mark();
    lab.lb("lb", &["reload", "-i", IFACE])?;
    balancer.wait_for_log(&["reloaded"], Duration::from_secs(10))?;
    let third = format!("{}:80 in web", target_addr(2));
    balancer.wait_for_log(&[&third, "-> healthy"], Duration::from_secs(10))?;
    ensure!(
        flood.running()?,
        "the flood ended before the reload was done"
    );
    while flood.running()? {
        ensure!(
            started.elapsed() < Duration::from_secs(40),
            "hping3 outlived its timeout"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let flooded = new_flows(&lab)? - before;
    ensure!(
        flooded > 100 * 1024,
        "only {flooded} new flows in 20 s: too few to turn the table over"
    );

    let mut lost = Vec::new();
    for (i, (c, target)) in held.iter_mut().enumerate() {
        match c.request() {
            Ok(now) if now == *target => {}
            Ok(now) => lost.push(format!("{i}: {target} -> {now}")),
            Err(e) => lost.push(format!("{i} (on {target}): {e}")),
        }
    }
    if !lost.is_empty() {
        bail!(
            "{} of 100 connections lost after {flooded} flood flows: {lost:?}",
            lost.len()
        );
    }
    // The third target takes new flows.
    let mut fresh = Vec::new();
    for _ in 0..3 {
        fresh.push(Connection::open(&lab, VIP, 80)?.request()?);
    }
    ensure!(
        fresh.iter().any(|t| t == "t3"),
        "new flows after the flood: {fresh:?}"
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}
