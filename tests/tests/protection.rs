//! Protection in the lab: source allow-lists and the deny-list, with real clients on several
//! addresses. Needs root.

use std::time::Duration;

use anyhow::{Result, ensure};
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
