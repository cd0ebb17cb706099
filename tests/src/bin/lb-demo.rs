//! `cargo xtask demo`: lb on a lab of network namespaces, with an embedded config.
//!
//! Builds the lab, prepares the targets with `lb target`, starts `lb run`, sends TCP connections
//! and UDP flows and shows which target answered, shows `lb status`, then takes targets down to
//! show the health check at work (a dead target removed, fail open when none is left, recovery),
//! and cleans up, also on Ctrl-C. Nothing leaves this machine: the lab has no route out.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use lb_tests::{Balancer, IFACE, Lab, VIP, share, tcp_clients, udp_clients};

const CONFIG: &str = "\
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}
  - {name: game, address: 203.0.113.10, port: 7777, protocol: udp, target_group: game}
target_groups:
  - name: web
    forwarding: dsr
    health_check: {protocol: tcp, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}
    targets:
      - {address: 198.51.100.11, port: 80}
      - {address: 198.51.100.12, port: 80}
      - {address: 198.51.100.13, port: 80}
  - name: game
    forwarding: dsr
    # UDP game servers are checked on their TCP port 80.
    health_check: {protocol: tcp, port: 80, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}
    targets:
      - {address: 198.51.100.11, port: 7777}
      - {address: 198.51.100.12, port: 7777}
      - {address: 198.51.100.13, port: 7777}
";

const FLOWS: usize = 150;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
    println!(
        "lb demo: a client, a balancer and 3 targets (t1, t2, t3) in network namespaces on one bridge."
    );
    println!(
        "Clients reach the VIP {VIP} through the balancer; the targets answer them directly.\n"
    );

    step("building the lab (namespaces lbdemo-*)");
    let mut lab = Lab::new("lbdemo", 3)?;
    done();
    step("preparing the targets: lb target -i eth0 --mode dsr --vip 203.0.113.10");
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 4000)?;
    lab.start_udp_servers(VIP, 7777, 1400)?;
    done();
    let config = std::env::temp_dir().join("lb-demo.yaml");
    std::fs::write(&config, CONFIG)?;
    step(&format!(
        "starting: lb run -c {} -i {IFACE}",
        config.display()
    ));
    let mut balancer = lab.start_balancer(&config, &[])?;
    done();
    show_log(&balancer.log);
    let result = demo(&mut lab, &mut balancer);

    step("stopping lb (SIGTERM detaches XDP) and removing the lab");
    balancer.terminate(&mut lab)?;
    drop(lab);
    let _ = std::fs::remove_file(config);
    done();
    match result {
        Err(e) if INTERRUPTED.load(Ordering::Relaxed) => {
            println!("interrupted ({e:#}); everything is cleaned up");
            Ok(())
        }
        other => other,
    }
}

fn demo(lab: &mut Lab, balancer: &mut Balancer) -> Result<()> {
    wait_for(
        balancer,
        &["198.51.100.13:80 in web", "-> healthy"],
        "the health checks pass",
    )?;
    println!(
        "\n1. Traffic: {FLOWS} TCP connections to :80 and {FLOWS} UDP flows to :7777, 3 requests each."
    );
    let rx_before = lab.rx_bytes("lb")?;
    let (tcp, udp, reply_bytes) = traffic(lab, FLOWS)?;
    let rx_delta = lab.rx_bytes("lb")? - rx_before;
    print_shares(&tcp, &udp);
    println!(
        "   Direct server return: the client received {} KiB of replies, the balancer only {} KiB of requests.",
        reply_bytes / 1024,
        rx_delta / 1024
    );

    println!("\n2. What `lb status` shows on the balancer:\n");
    for line in lab.lb("lb", &["status"])?.lines() {
        println!(
            "{}",
            if line.is_empty() {
                String::new()
            } else {
                format!("   {line}")
            }
        );
    }

    println!("\n3. t2's TCP server stops. Health checks (every 1 s, 2 failures) take t2 out:");
    balancer.mark();
    let stopped = Instant::now();
    lab.stop_tcp_server(1, 80);
    wait_for(
        balancer,
        &["198.51.100.12:80 in web", "-> unhealthy"],
        "t2 is marked unhealthy",
    )?;
    println!("   t2 out after {:.1} s", stopped.elapsed().as_secs_f64());
    let (tcp, _, _) = traffic(lab, 60)?;
    print_shares(&tcp, &BTreeMap::new());

    println!(
        "\n4. All TCP servers stop: no target of `game` passes its check, so it fails open (like NLB):"
    );
    balancer.mark();
    lab.stop_tcp_server(0, 80);
    lab.stop_tcp_server(2, 80);
    wait_for(
        balancer,
        &["target group game has no healthy target"],
        "game fails open",
    )?;
    let (udp, _) = udp_clients(lab, VIP, 7777, 60, 1)?;
    print_shares(&BTreeMap::new(), &share(&udp));

    println!(
        "\n5. t3's TCP server comes back: it passes 2 checks and takes every new flow of `game`:"
    );
    balancer.mark();
    lab.start_tcp_server(2, 80, 4000)?;
    wait_for(
        balancer,
        &["198.51.100.13:7777 in game", "-> healthy"],
        "t3 is healthy again",
    )?;
    let (udp, _) = udp_clients(lab, VIP, 7777, 60, 1)?;
    print_shares(&BTreeMap::new(), &share(&udp));
    println!();
    Ok(())
}

type Shares = BTreeMap<String, usize>;

/// Sends `flows` TCP connections and UDP flows with a progress line; returns who served them.
fn traffic(lab: &Lab, flows: usize) -> Result<(Shares, Shares, u64)> {
    let (mut tcp, mut udp, mut bytes) = (Shares::new(), Shares::new(), 0);
    let terminal = std::io::stdout().is_terminal();
    for i in 0..flows {
        if INTERRUPTED.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let (t, tb) = tcp_clients(lab, VIP, 80, 1, 3)?;
        let (u, ub) = udp_clients(lab, VIP, 7777, 1, 3)?;
        bytes += tb + ub;
        *tcp.entry(t[0][0].clone()).or_default() += 1;
        *udp.entry(u[0][0].clone()).or_default() += 1;
        if terminal {
            print!("\r   {:>4}/{flows} connections and flows", i + 1);
            let _ = std::io::stdout().flush();
        }
    }
    if terminal {
        println!();
    }
    Ok((tcp, udp, bytes))
}

fn print_shares(tcp: &Shares, udp: &Shares) {
    println!(
        "   {:<8} {:>16} {:>10}",
        "target", "tcp connections", "udp flows"
    );
    for name in ["t1", "t2", "t3"] {
        let cell = |s: &Shares| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.get(name).unwrap_or(&0).to_string()
            }
        };
        println!("   {:<8} {:>16} {:>10}", name, cell(tcp), cell(udp));
    }
}

fn wait_for(balancer: &mut Balancer, parts: &[&str], what: &str) -> Result<()> {
    let line = balancer.wait_for_log(parts, Duration::from_secs(10))?;
    println!("   lb | {}   ({what})", strip_log_prefix(&line));
    Ok(())
}

fn show_log(lines: &[String]) {
    for line in lines {
        println!("   lb | {}", strip_log_prefix(line));
    }
}

fn step(what: &str) {
    print!("==> {what} ... ");
    let _ = std::io::stdout().flush();
}

fn done() {
    println!("ok");
}

/// tracing's timestamp and level are noise in the demo.
fn strip_log_prefix(line: &str) -> &str {
    line.find(" INFO ")
        .or_else(|| line.find(" WARN "))
        .map_or(line, |i| line[i + 6..].trim_start())
}
