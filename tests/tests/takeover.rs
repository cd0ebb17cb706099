//! Hitless restart: a second `lb run` takes over from the running one, and after `kill -9` the
//! data plane keeps forwarding until the next `lb run` adopts it, while TCP connections and a
//! counted UDP stream run through. Needs root.

use std::time::Duration;

use anyhow::{Result, ensure};
use lb_tests::{Connection, UdpStream, VIP, VIP6, tcp_clients};

const CONNECTIONS: usize = 60;
/// Each of 8 flows sends a datagram every 2 ms: about 4000 datagrams a second.
const UDP_FLOWS: usize = 8;
const UDP_EVERY: Duration = Duration::from_millis(2);

/// Every connection is still answered, by the target that answered it first.
fn all_kept(connections: &mut [(Connection, String)], when: &str) -> Result<()> {
    for (i, (c, first)) in connections.iter_mut().enumerate() {
        let now = c
            .request()
            .map_err(|e| anyhow::anyhow!("{when}: connection {i} broke: {e}"))?;
        ensure!(
            now == *first,
            "{when}: connection {i} moved from {first} to {now}"
        );
    }
    Ok(())
}

fn report_loss(when: &str, (sent, received): (u64, u64)) -> Result<()> {
    let lost = sent.saturating_sub(received);
    eprintln!("{when}: {sent} datagrams sent, {received} answered, {lost} lost");
    ensure!(sent > 500, "{when}: the stream sent only {sent} datagrams");
    ensure!(
        lost * 1000 <= sent,
        "{when}: {lost} of {sent} datagrams lost (more than 0.1%)"
    );
    Ok(())
}

#[test]
fn takeover_and_kill_9_lose_no_flow() -> Result<()> {
    let name = format!("lbt-takeover-{}", std::process::id() % 10000);
    let (mut lab, config) =
        lb_tests::serving_lab(&name, lb_tests::FAST_TCP_CHECK, lb_tests::FAST_TCP_CHECK)?;
    // An IPv6 listener too: IPv6 (and IPv4's ICMP) run in programs the balancer hands frames
    // to, which must outlive the lb that loaded them.
    lab.enable_ipv6()?;
    lab.prepare_targets("dsr", &[VIP6])?;
    let text = std::fs::read_to_string(&config)?.replace(
        "target_groups:",
        &format!("  - {{name: web6, address: '{VIP6}', port: 80, protocol: tcp, target_group: web}}\ntarget_groups:"),
    );
    std::fs::write(&config, text)?;

    let mut first = lab.start_balancer(&config, &[])?;
    first.wait_all_healthy(3, Duration::from_secs(5))?;
    let (answers, _) = tcp_clients(&lab, VIP6, 80, 5, 1)?;
    ensure!(answers.len() == 5, "IPv6 connections");
    let mut connections = (0..CONNECTIONS)
        .map(|_| {
            let mut c = Connection::open(&lab, VIP, 80)?;
            let name = c.request()?;
            Ok((c, name))
        })
        .collect::<Result<Vec<_>>>()?;

    // A second lb takes over while traffic runs.
    let stream = UdpStream::start(&lab, VIP, 7777, UDP_FLOWS, UDP_EVERY)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut second = lab.start_balancer(&config, &[])?;
    let ready = second.log.last().cloned().unwrap_or_default();
    ensure!(
        ready.contains(&format!("took over from pid {}", first.pid)),
        "{ready}"
    );
    let (status, said) = first.wait_exit(&mut lab, Duration::from_secs(5))?;
    ensure!(
        status.success(),
        "the first lb exited with {status}: {said:?}"
    );
    ensure!(
        said.iter().any(|l| l.contains("exiting without detaching")),
        "{said:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    report_loss("takeover", stream.stop())?;
    ensure!(lab.xdp_attached("lb")?, "no XDP program after the takeover");
    all_kept(&mut connections, "after the takeover")?;
    // No fail-open glitch: the second lb knew every target was healthy.
    ensure!(
        !second.log.iter().any(|l| l.contains("initial")),
        "target states were not carried over: {:?}",
        second.log
    );

    // kill -9: the data plane keeps forwarding on its own.
    let stream = UdpStream::start(&lab, VIP, 7777, UDP_FLOWS, UDP_EVERY)?;
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(second.pid as i32, libc::SIGKILL) };
    second.wait_exit(&mut lab, Duration::from_secs(5))?;
    all_kept(&mut connections, "with no controller")?;
    let (answers, _) = tcp_clients(&lab, VIP, 80, 30, 1)?;
    ensure!(answers.len() == 30, "new connections with no controller");
    let (answers, _) = tcp_clients(&lab, VIP6, 80, 10, 1)?;
    ensure!(
        answers.len() == 10,
        "new IPv6 connections with no controller"
    );
    lab.ping(VIP, 1)?;

    // The next lb adopts it.
    let mut third = lab.start_balancer(&config, &[])?;
    let ready = third.log.last().cloned().unwrap_or_default();
    ensure!(ready.contains("adopted the data plane"), "{ready}");
    std::thread::sleep(Duration::from_millis(300));
    report_loss("kill -9 and adoption", stream.stop())?;
    all_kept(&mut connections, "after the adoption")?;

    // SIGTERM on the only instance still detaches and leaves nothing behind.
    drop(connections);
    let (status, said) = third.terminate(&mut lab)?;
    ensure!(status.success(), "{said:?}");
    ensure!(!lab.xdp_attached("lb")?, "XDP left attached");
    let leftovers: Vec<_> = std::fs::read_dir(lab.pin_dir())
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(leftovers.is_empty(), "pins left behind: {leftovers:?}");
    let _ = std::fs::remove_file(config);
    Ok(())
}

/// The settings of a one-listener config (the defaults).
fn settings() -> Result<lb::config::Settings> {
    let (config, _) = lb_tests::frames::registered(
        "listeners:\n  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}\n\
         target_groups:\n  - name: web\n    targets:\n      - {address: 198.51.100.11, port: 80}\n",
    )?;
    Ok(config.settings)
}

/// What `Dataplane::load` says about the maps that `prepare` leaves in a fresh pin directory.
fn load_over_pins(prepare: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<String> {
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/lb-test-layout-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<String> {
        prepare(&dir)?;
        match lb::maps::Dataplane::load(&settings()?, Some(&dir)) {
            Ok(_) => anyhow::bail!("adopted maps of another layout"),
            Err(e) => Ok(e.to_string()),
        }
    })();
    let _ = lb::maps::Dataplane::unpin(&dir);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// Maps pinned by an lb whose maps differ in size (here, another program's map pinned as
/// `FLOWS`) are refused with a sentence that says what to do, before anything is attached.
#[test]
fn maps_of_another_size_are_not_taken_over() -> Result<()> {
    let message = load_over_pins(|dir| {
        let mut lab = aya::Ebpf::load(lb::LAB_OBJECT)?;
        let Some(aya::maps::Map::PerCpuArray(data)) = lab.map_mut("SUNK") else {
            anyhow::bail!("SUNK is not a per-CPU array");
        };
        data.pin(dir.join("FLOWS"))?;
        Ok(())
    })?;
    ensure!(
        message.contains("map FLOWS differs") && message.contains("stop the running lb"),
        "{message}"
    );
    Ok(())
}

/// Maps of the same sizes but another meaning (another `MAP_LAYOUT`) are refused too.
#[test]
fn maps_of_another_layout_version_are_not_taken_over() -> Result<()> {
    let message = load_over_pins(|dir| {
        drop(lb::maps::Dataplane::load(&settings()?, Some(dir))?);
        let pinned = aya::maps::MapData::from_pin(dir.join("FLOW_TABLE"))?;
        let mut table: aya::maps::Array<_, lb_common::FlowTable> =
            aya::maps::Array::try_from(aya::maps::Map::Array(pinned))?;
        let mut shape = table.get(&0, 0)?;
        shape.layout = lb_common::MAP_LAYOUT + 1;
        table.set(0, shape, 0)?;
        Ok(())
    })?;
    ensure!(
        message.contains("layout") && message.contains("stop the running lb"),
        "{message}"
    );
    Ok(())
}
