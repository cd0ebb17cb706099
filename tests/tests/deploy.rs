//! What `deploy/` ships is checked by the tools that will read it: `lb check`, `promtool`,
//! `bird -p`, and the dashboard against the metric names lb exports.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, ensure};
use lb::metrics::{GroupStatus, ListenerStatus, Status, TargetStatus, Telemetry, Traffic};
use lb_tests::lb_binary;
use serde::Deserialize as _;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn run(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{command:?} failed: {said}");
    Ok(said)
}

#[test]
fn example_configs_pass_lb_check() -> Result<()> {
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(deploy("examples"))? {
        let path = entry?.path();
        let said = run(Command::new(lb_binary()).arg("check").arg("-c").arg(&path))?;
        ensure!(!said.contains("WARN"), "{}: {said}", path.display());
        checked.push(
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    checked.sort();
    ensure!(
        checked
            == [
                "game-udp.yaml",
                "l4-switch.yaml",
                "lb.yaml",
                "nlb-https.yaml",
                "web-tcp.yaml"
            ],
        "{checked:?}"
    );
    Ok(())
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() -> Result<()> {
    let said = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy("prometheus/lb-alerts.yml")))?;
    ensure!(said.contains("SUCCESS: 7 rules found"), "{said}");
    run(Command::new("promtool")
        .args(["check", "config"])
        .arg(deploy("prometheus/prometheus.yml")))?;
    // The rules' own unit tests: each alert fires on the series lb exports, as lb exports them.
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(deploy("prometheus/lb-alerts.test.yml")))?;
    Ok(())
}

/// Every metric name lb exports (histograms with their series suffixes).
fn exported_names() -> Result<BTreeSet<String>> {
    let traffic = Traffic {
        packets: 1,
        bytes: 1,
        new_flows: 1,
        active_flows: 1,
    };
    let status = Status {
        interfaces: vec!["eth0".into()],
        listeners: vec![ListenerStatus {
            name: "web".into(),
            address: "203.0.113.10:80".into(),
            protocol: "tcp".into(),
            target_group: "web".into(),
            traffic,
            refused_new_flows: [("listener_rate_limit".to_owned(), 1)].into(),
        }],
        target_groups: vec![GroupStatus {
            name: "web".into(),
            forwarding: "dsr".into(),
            algorithm: "maglev".into(),
            stickiness: None,
            fail_open: false,
            targets: vec![TargetStatus {
                target: "198.51.100.11:80".parse()?,
                state: "healthy".into(),
                weight: 1,
                traffic,
                active_connections: 1,
                mac: Some("02:00:c6:33:64:0b".into()),
            }],
        }],
        drops: [("malformed".to_owned(), 1)].into(),
        icmp: [("echo_reply".to_owned(), 1)].into(),
    };
    let telemetry = Telemetry::default();
    telemetry
        .probe_duration
        .with_label_values(&["web", "198.51.100.11:80"])
        .observe(0.01);
    telemetry.reloads.with_label_values(&["success"]).inc();
    let text = lb::metrics::render(&status, &telemetry)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect())
}

/// The `lb_*` identifiers in a PromQL expression.
fn lb_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("lb_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_dashboard_expression_names_an_exported_metric() -> Result<()> {
    let exported = exported_names()?;
    ensure!(
        exported.contains("lb_listener_packets_total")
            && exported.contains("lb_target_packets_total")
            && exported.contains("lb_health_check_duration_seconds_bucket")
    );
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(deploy(
        "grafana/lb-dashboard.json",
    ))?)?;
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            exprs.push(target["expr"].as_str().context("expr")?.to_owned());
        }
    }
    exprs.push(
        dashboard["templating"]["list"][1]["query"]
            .as_str()
            .context("variable")?
            .to_owned(),
    );
    ensure!(exprs.len() >= 10, "only {} expressions", exprs.len());
    for expr in &exprs {
        let names = lb_names(expr);
        ensure!(!names.is_empty(), "{expr} names no lb metric");
        for name in names {
            ensure!(
                exported.contains(&name),
                "{expr}: lb exports no {name} (it has {exported:?})"
            );
        }
    }
    Ok(())
}

#[test]
fn alert_rules_name_exported_metrics() -> Result<()> {
    let exported = exported_names()?;
    let rules: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(deploy(
        "prometheus/lb-alerts.yml",
    ))?)?;
    for rule in rules["groups"][0]["rules"].as_sequence().context("rules")? {
        let expr = rule["expr"].as_str().context("expr")?;
        for name in lb_names(expr) {
            ensure!(exported.contains(&name), "{expr}: lb exports no {name}");
        }
    }
    Ok(())
}

#[test]
fn bird_example_parses() -> Result<()> {
    run(Command::new("bird")
        .args(["-p", "-c"])
        .arg(deploy("bird/bird.conf")))?;
    Ok(())
}

#[test]
fn kubernetes_daemonset_runs_lb_with_what_it_needs() -> Result<()> {
    let text = std::fs::read_to_string(deploy("kubernetes/lb-daemonset.yaml"))?;
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(serde_yaml::Value::deserialize)
        .collect::<Result<_, _>>()?;
    let config_map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .context("ConfigMap")?;
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("DaemonSet")?;
    let spec = &daemonset["spec"]["template"]["spec"];
    ensure!(spec["hostNetwork"] == true);
    let container = &spec["containers"][0];
    let caps: Vec<&str> = container["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .context("capabilities")?
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for cap in ["BPF", "NET_ADMIN", "PERFMON"] {
        ensure!(caps.contains(&cap), "missing CAP_{cap}: {caps:?}");
    }
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_sequence()
        .context("mounts")?
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    ensure!(
        mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/run/lb"),
        "{mounts:?}"
    );
    // The config the pod runs passes lb check.
    let embedded = config_map["data"]["lb.yaml"].as_str().context("lb.yaml")?;
    let path = std::env::temp_dir().join(format!("lb-k8s-{}.yaml", std::process::id()));
    std::fs::write(&path, embedded)?;
    let checked = run(Command::new(lb_binary()).arg("check").arg("-c").arg(&path));
    std::fs::remove_file(&path)?;
    checked?;
    Ok(())
}

#[test]
fn container_file_copies_files_that_exist() -> Result<()> {
    let text = std::fs::read_to_string(deploy("Containerfile"))?;
    for line in text.lines().filter(|l| l.starts_with("COPY ")) {
        let source = line.split_whitespace().nth(1).context("COPY source")?;
        if source != "target/release/lb" {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(source);
            ensure!(path.exists(), "{line}: {} does not exist", path.display());
        }
    }
    Ok(())
}
