//! Health checks in the lab: a dead target stops getting new flows within
//! `unhealthy_threshold × interval + timeout` (plus slack) and gets them again after
//! `healthy_threshold` passes; HTTP checks with a non-matching status; fail open. Needs root.

use std::{collections::BTreeMap, time::Duration, time::Instant};

use anyhow::{Result, ensure};
use lb_tests::{Balancer, Lab, VIP, share, target_addr, tcp_clients, udp_clients};

const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
const HEALTHY_THRESHOLD: u32 = 2;
const UNHEALTHY_THRESHOLD: u32 = 2;
/// Probes are jittered by ±10% and the first one lands anywhere in the first interval.
const SLACK: Duration = Duration::from_millis(1500);

fn detection_bound() -> Duration {
    INTERVAL * UNHEALTHY_THRESHOLD + TIMEOUT + SLACK
}

fn recovery_bound() -> Duration {
    INTERVAL * HEALTHY_THRESHOLD + TIMEOUT + SLACK
}

/// The serving lab with `check` (a few YAML keys) for the web group and the fast TCP check on
/// port 80 for the game group, and lb running on it with every target healthy.
fn start(name: &str, check: &str) -> Result<(Lab, Balancer)> {
    let web = format!(
        "{{{check}, interval: 1s, timeout: 500ms, healthy_threshold: {HEALTHY_THRESHOLD}, unhealthy_threshold: {UNHEALTHY_THRESHOLD}}}"
    );
    let (mut lab, config) = lb_tests::serving_lab(name, &web, lb_tests::FAST_TCP_CHECK)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    balancer.wait_all_healthy(3, recovery_bound() + INTERVAL)?;
    Ok((lab, balancer))
}

fn tcp_share(lab: &Lab, connections: usize) -> Result<BTreeMap<String, usize>> {
    Ok(share(&tcp_clients(lab, VIP, 80, connections, 1)?.0))
}

fn udp_share(lab: &Lab, flows: usize) -> Result<BTreeMap<String, usize>> {
    Ok(share(&udp_clients(lab, VIP, 7777, flows, 1)?.0))
}

#[test]
fn tcp_check_takes_a_dead_target_out_and_brings_it_back() -> Result<()> {
    let (mut lab, mut balancer) = start(
        &format!("lbh-tcp-{}", std::process::id() % 10000),
        "protocol: tcp",
    )?;
    balancer.mark();
    let killed = Instant::now();
    lab.stop_tcp_server(0, 80);
    let t1 = format!("{}:80 in web", target_addr(0));
    balancer.wait_for_log(&[&t1, "healthy -> unhealthy"], detection_bound())?;
    eprintln!(
        "t1 out after {:?} (bound {:?})",
        killed.elapsed(),
        detection_bound()
    );
    // Every new connection now succeeds, on t2 or t3: none is sent to the dead t1.
    let share = tcp_share(&lab, 90)?;
    ensure!(!share.contains_key("t1"), "{share:?}");
    ensure!(
        share.contains_key("t2") && share.contains_key("t3"),
        "{share:?}"
    );

    balancer.mark();
    let revived = Instant::now();
    lab.start_tcp_server(0, 80, 100)?;
    balancer.wait_for_log(&[&t1, "unhealthy -> healthy"], recovery_bound())?;
    eprintln!(
        "t1 back after {:?} (bound {:?})",
        revived.elapsed(),
        recovery_bound()
    );
    let share = tcp_share(&lab, 150)?;
    ensure!(
        share.get("t1").copied().unwrap_or(0) >= 25,
        "t1 gets new flows again: {share:?}"
    );
    Ok(())
}

#[test]
fn http_check_with_a_non_matching_status_takes_the_target_out() -> Result<()> {
    let check = "protocol: http, path: /health, matcher: \"200-299\"";
    let (lab, mut balancer) = start(&format!("lbh-http-{}", std::process::id() % 10000), check)?;
    balancer.mark();
    lab.set_http_status(1, 503);
    let t2 = format!("{}:80 in web", target_addr(1));
    let line = balancer.wait_for_log(&[&t2, "healthy -> unhealthy"], detection_bound())?;
    ensure!(line.contains("HTTP status 503 does not match"), "{line}");
    // The server itself still answers: only the check keeps t2 out.
    let share = tcp_share(&lab, 90)?;
    ensure!(!share.contains_key("t2"), "{share:?}");
    balancer.mark();
    lab.set_http_status(1, 204);
    balancer.wait_for_log(&[&t2, "unhealthy -> healthy"], recovery_bound())?;
    Ok(())
}

#[test]
fn all_down_fails_open_and_the_first_one_back_takes_everything() -> Result<()> {
    let (mut lab, mut balancer) = start(
        &format!("lbh-open-{}", std::process::id() % 10000),
        "protocol: tcp",
    )?;
    // The game group is checked on the TCP port: with every TCP server down it has no healthy
    // target, while its UDP service still answers.
    balancer.mark();
    for i in 0..3 {
        lab.stop_tcp_server(i, 80);
    }
    balancer.wait_for_log(
        &["target group game has no healthy target", "failing open"],
        detection_bound(),
    )?;
    let share = udp_share(&lab, 90)?;
    for t in ["t1", "t2", "t3"] {
        ensure!(
            share.get(t).copied().unwrap_or(0) >= 15,
            "fail open spreads over all: {share:?}"
        );
    }
    balancer.mark();
    lab.start_tcp_server(1, 80, 100)?;
    balancer.wait_for_log(
        &[
            &format!("{}:7777 in game", target_addr(1)),
            "unhealthy -> healthy",
        ],
        recovery_bound(),
    )?;
    let share = udp_share(&lab, 60)?;
    ensure!(
        share.get("t2") == Some(&60),
        "only the healthy one takes new flows: {share:?}"
    );
    Ok(())
}
