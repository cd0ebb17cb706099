//! lb in an environment it does not own: other lbs on the same host. Needs root.

use std::time::Duration;

use anyhow::{Result, ensure};
use lb_tests::{FAST_TCP_CHECK, Lab, VIP, serving_lab, share, tcp_clients};

/// The share of 30 connections through `lab`'s balancer, each target answering.
fn answered(lab: &Lab) -> Result<usize> {
    let (answers, _) = tcp_clients(lab, VIP, 80, 30, 1)?;
    Ok(share(&answers).values().sum())
}

/// Two lbs on `eth0` in two network namespaces, started as the README says (`nsenter --net`,
/// the host's BPF filesystem): each attaches to its own interface, pins in its own directory,
/// and forwards its own clients' traffic; stopping one leaves the other forwarding.
#[test]
fn two_lbs_on_eth0_in_two_namespaces_each_forward_their_own_traffic() -> Result<()> {
    let (mut first, first_config) = serving_lab("lbnsa", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let (mut second, second_config) = serving_lab("lbnsb", FAST_TCP_CHECK, FAST_TCP_CHECK)?;
    let mut a = first.start_balancer(&first_config, &[])?;
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
