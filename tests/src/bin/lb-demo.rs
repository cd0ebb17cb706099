//! `cargo xtask demo`: lb on a lab of network namespaces, with an embedded config.
//!
//! Builds the lab, prepares the targets with `lb target`, starts `lb run`, sends TCP connections
//! and UDP flows from the client and shows which target answered each, then cleans up (also on
//! Ctrl-C). Nothing leaves this machine: the lab has no route out.

use std::{
    collections::BTreeMap,
    io::Write as _,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;
use lb_tests::{IFACE, Lab, VIP, tcp_clients, udp_clients};

const CONFIG: &str = "\
listeners:
  - name: web
    address: 203.0.113.10
    port: 80
    protocol: tcp
    target_group: web
  - name: game
    address: 203.0.113.10
    port: 7777
    protocol: udp
    target_group: game
target_groups:
  - name: web
    forwarding: dsr
    targets:
      - {address: 198.51.100.11, port: 80}
      - {address: 198.51.100.12, port: 80}
      - {address: 198.51.100.13, port: 80}
  - name: game
    forwarding: dsr
    targets:
      - {address: 198.51.100.11, port: 7777}
      - {address: 198.51.100.12, port: 7777}
      - {address: 198.51.100.13, port: 7777}
";

const FLOWS: usize = 120;
const SHOWN: usize = 6;

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
    println!("lb demo: a client, a balancer and 3 targets in network namespaces on one bridge.");
    println!(
        "         Clients reach the VIP {VIP} through the balancer; targets answer them directly.\n"
    );

    step("building the lab (namespaces lbdemo-*)");
    let mut lab = Lab::new("lbdemo", 3)?;
    done();

    step("preparing the targets: lb target --mode dsr --vip 203.0.113.10");
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
    for line in &balancer.log {
        println!("    lb | {}", strip_log_prefix(line));
    }

    let rx_before = lab.rx_bytes("lb")?;
    let mut tcp: BTreeMap<String, usize> = BTreeMap::new();
    let mut udp: BTreeMap<String, usize> = BTreeMap::new();
    let mut reply_bytes = 0;
    println!(
        "\nTraffic ({FLOWS} TCP connections to :80 and {FLOWS} UDP flows to :7777, 3 requests each):"
    );
    for i in 0..FLOWS {
        if INTERRUPTED.load(Ordering::Relaxed) {
            break;
        }
        let (t, tb) = tcp_clients(&lab, VIP, 80, 1, 3)?;
        let (u, ub) = udp_clients(&lab, VIP, 7777, 1, 3)?;
        reply_bytes += tb + ub;
        *tcp.entry(t[0][0].clone()).or_default() += 1;
        *udp.entry(u[0][0].clone()).or_default() += 1;
        if i < SHOWN {
            println!(
                "  tcp connection {:>3} answered by {}   udp flow {:>3} answered by {}",
                i + 1,
                t[0].join(","),
                i + 1,
                u[0].join(",")
            );
        } else {
            print!("\r  ... {:>3}/{FLOWS} connections and flows done", i + 1);
            let _ = std::io::stdout().flush();
        }
    }
    let rx_delta = lab.rx_bytes("lb")? - rx_before;
    println!("\n\nWho served how much:");
    println!(
        "  {:<8} {:>16} {:>10}",
        "target", "tcp connections", "udp flows"
    );
    for i in 0..lab.targets {
        let name = format!("t{}", i + 1);
        println!(
            "  {:<8} {:>16} {:>10}",
            name,
            tcp.get(&name).unwrap_or(&0),
            udp.get(&name).unwrap_or(&0)
        );
    }
    println!(
        "\nDirect server return: the client got {} KiB of replies; the balancer's interface received only {} KiB.",
        reply_bytes / 1024,
        rx_delta / 1024
    );

    step("stopping lb (SIGTERM detaches XDP) and removing the lab");
    balancer.terminate(&mut lab)?;
    drop(lab);
    let _ = std::fs::remove_file(config);
    done();
    Ok(())
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
