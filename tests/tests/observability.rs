//! Metrics and `lb status` against a lab instance, with Debian's real Prometheus scraping it.
//! Needs root, prometheus and promtool.

use std::{
    io::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb::metrics::Status;
use lb_tests::{Lab, VIP, in_netns, tcp_clients, udp_clients};

const ADMIN: &str = "127.0.0.1:9617";
const PROMETHEUS: &str = "127.0.0.1:9090";

/// `GET path` from `addr` inside the balancer's namespace.
fn get(lab: &Lab, addr: &str, path: &str) -> Result<String> {
    let addr: SocketAddr = addr.parse()?;
    let path = path.to_owned();
    in_netns(&lab.ns("lb"), move || lb::admin::get(addr, &path))?
}

/// A Prometheus server in the balancer's namespace, scraping lb every second.
struct Prometheus {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(lab: &Lab, name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{name}-prometheus"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: lb\n    static_configs:\n      - targets: ['{ADMIN}']\n"
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("lb"), "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus (installed by cargo xtask setup)")?;
        let prometheus = Prometheus { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while get(lab, PROMETHEUS, "/-/ready").is_err() {
            ensure!(Instant::now() < deadline, "prometheus did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    /// The value of an instant query that returns one series, if it does.
    fn value(&self, lab: &Lab, query: &str) -> Result<Option<f64>> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = get(lab, PROMETHEUS, &format!("/api/v1/query?query={encoded}"))?;
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let result = &answer["data"]["result"];
        match result.as_array().map(Vec::len) {
            Some(0) => Ok(None),
            Some(1) => Ok(result[0]["value"][1].as_str().and_then(|v| v.parse().ok())),
            _ => bail!("{query}: unexpected answer {body}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_sees_traffic_per_target_and_lb_status_shows_it() -> Result<()> {
    let name = format!("lbo-{}", std::process::id() % 10000);
    let (mut lab, config) =
        lb_tests::serving_lab(&name, lb_tests::FAST_TCP_CHECK, lb_tests::FAST_TCP_CHECK)?;
    let mut balancer = lab.start_balancer(&config, &[])?;
    balancer.wait_all_healthy(3, Duration::from_secs(5))?;
    let prometheus = Prometheus::start(&lab, &name)?;

    tcp_clients(&lab, VIP, 80, 60, 2)?;
    udp_clients(&lab, VIP, 7777, 60, 2)?;
    let status: Status = serde_json::from_str(&get(&lab, ADMIN, "/status")?)?;

    // lb's own view: every new flow counted once per listener and once per target.
    for (listener, flows) in [("web", 60), ("game", 60)] {
        let l = status
            .listeners
            .iter()
            .find(|l| l.name == listener)
            .context("listener")?;
        ensure!(l.traffic.new_flows == flows, "{listener}: {:?}", l.traffic);
        let group = status
            .target_groups
            .iter()
            .find(|g| g.name == listener)
            .context("group")?;
        let per_target: u64 = group.targets.iter().map(|t| t.traffic.new_flows).sum();
        ensure!(
            per_target == flows,
            "{listener}: targets count {per_target} new flows"
        );
        ensure!(
            group
                .targets
                .iter()
                .all(|t| t.traffic.new_flows > 0 && t.state == "healthy"),
            "{group:?}"
        );
    }
    // UDP flows stay active for the listener's idle timeout (120 s).
    let game = status
        .listeners
        .iter()
        .find(|l| l.name == "game")
        .context("game")?;
    ensure!(game.traffic.active_flows == 60, "{:?}", game.traffic);

    // Prometheus, scraping every second, sees the same per-target numbers.
    let deadline = Instant::now() + Duration::from_secs(15);
    for group in &status.target_groups {
        for t in &group.targets {
            let query = format!(
                "lb_target_new_flows_total{{target_group=\"{}\",target=\"{}\"}}",
                group.name, t.target
            );
            loop {
                let seen = prometheus.value(&lab, &query)?;
                if seen == Some(t.traffic.new_flows as f64) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{query}: prometheus has {seen:?}, lb {}",
                    t.traffic.new_flows
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let healthy = prometheus.value(&lab, "lb_healthy_targets{target_group=\"web\"}")?;
    ensure!(healthy == Some(3.0), "lb_healthy_targets: {healthy:?}");
    // Each level is a family of its own, so a sum over one counts every flow once.
    for query in [
        "sum(lb_listener_new_flows_total)",
        "sum(lb_target_new_flows_total)",
    ] {
        let seen = prometheus.value(&lab, query)?;
        ensure!(seen == Some(120.0), "{query}: {seen:?}");
    }
    // Known label sets exist from the start: no reload happened, and the failures are at 0.
    let failures = prometheus.value(&lab, "lb_config_reloads_total{result=\"failure\"}")?;
    ensure!(failures == Some(0.0), "reload failures: {failures:?}");

    // The exposition passes promtool's lint.
    let text = get(&lab, ADMIN, "/metrics")?;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    promtool
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = promtool.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // lb status reads the same instance, as a table and as JSON.
    let table = lab.lb("lb", &["status"])?;
    for expected in [
        "LISTENER",
        "web",
        "game",
        "TARGET GROUP web (dsr, maglev): 3 of 3 targets healthy",
    ] {
        ensure!(table.contains(expected), "lb status:\n{table}");
    }
    ensure!(
        table.lines().filter(|l| l.contains(" healthy ")).count() == 6,
        "lb status:\n{table}"
    );
    let json: serde_json::Value = serde_json::from_str(&lab.lb("lb", &["status", "--json"])?)?;
    ensure!(
        json["status"]["target_groups"][1]["targets"]
            .as_array()
            .map(Vec::len)
            == Some(3),
        "{json}"
    );
    ensure!(
        json["rates"]["listeners"]["web"]["packets_per_second"].is_number(),
        "{json}"
    );
    let _ = std::fs::remove_file(config);
    Ok(())
}

#[test]
fn lb_status_without_an_instance_says_so() -> Result<()> {
    let lab = Lab::new(&format!("lbo-none-{}", std::process::id() % 10000), 1)?;
    let err = lab.lb("lb", &["status"]).expect_err("lb status without lb");
    ensure!(
        err.to_string()
            .contains("lb: no lb is running (in this network namespace)"),
        "{err}"
    );
    Ok(())
}
