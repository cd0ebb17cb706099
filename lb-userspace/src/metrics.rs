//! What lb tells about itself: one [`Status`] document, built on request from the registry and
//! the maps (per-CPU counters are summed at that moment, so nothing polls or drifts), served as
//! JSON to `lb status` and as Prometheus metrics.
//!
//! Counters of a listener or target live in map slots indexed by their ids, which reloads keep,
//! so they survive any reload that keeps the listener or target.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::Result;
use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    health::TargetState,
    lifecycle,
    maps::{Dataplane, MapState},
};

/// Everything `lb status` shows and `/metrics` exports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interfaces: Vec<String>,
    pub listeners: Vec<ListenerStatus>,
    pub target_groups: Vec<GroupStatus>,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// ICMP messages the data plane sent, by kind (`lb_common::IcmpCounter`).
    #[serde(default)]
    pub icmp: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub protocol: String,
    pub target_group: String,
    pub traffic: Traffic,
    /// New flows its rate limits refused, by drop reason (`listener_rate_limit`,
    /// `source_rate_limit`); empty for a listener without limits.
    #[serde(default)]
    pub refused_new_flows: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub forwarding: String,
    #[serde(default)]
    pub algorithm: String,
    /// Source-IP stickiness's duration, as the config writes it.
    #[serde(default)]
    pub stickiness: Option<String>,
    /// No target is healthy: new flows go to every registered target.
    pub fail_open: bool,
    pub targets: Vec<TargetStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub target: SocketAddr,
    pub state: String,
    pub weight: u32,
    pub traffic: Traffic,
    /// Flows the clients have not ended, as the data plane counts them: what least
    /// connections compares.
    #[serde(default)]
    pub active_connections: u64,
    /// The MAC its frames go to (its own, or its gateway's); none while the kernel does not
    /// know it, when the target takes no new flows.
    #[serde(default)]
    pub mac: Option<String>,
}

/// Counters since the listener or target appeared, and flows seen within their idle timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub active_flows: u64,
}

impl Status {
    pub fn collect(
        interfaces: &[String],
        config: &Config,
        registry: &lifecycle::Registry,
        state: &MapState,
        dataplane: &Dataplane,
    ) -> Result<Self> {
        let active = dataplane.active_flows(state);
        let traffic = |counters: lb_common::Counters, active: u64| Traffic {
            packets: counters.packets,
            bytes: counters.bytes,
            new_flows: counters.new_flows,
            active_flows: active,
        };
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let Some(id) = registry.listener_id(&l.name) else {
                continue;
            };
            listeners.push(ListenerStatus {
                name: l.name.clone(),
                address: l.endpoint().to_string(),
                protocol: format!("{:?}", l.protocol)
                    .to_lowercase()
                    .replace("tcpudp", "tcp_udp"),
                target_group: l.target_group.clone(),
                traffic: traffic(
                    dataplane.listener_counters(id)?,
                    active.listeners.get(&id).copied().unwrap_or(0),
                ),
                refused_new_flows: if l.max_new_flows_per_second.is_some()
                    || l.max_new_flows_per_second_per_source.is_some()
                {
                    dataplane
                        .refused_new_flows(id)?
                        .into_iter()
                        .map(|(reason, n)| (reason.name().to_owned(), n))
                        .collect()
                } else {
                    BTreeMap::new()
                },
            });
        }
        let mut target_groups = Vec::new();
        for g in &config.target_groups {
            let mut targets = Vec::new();
            for (key, entry) in registry.targets().filter(|(k, _)| k.group == g.name) {
                targets.push(TargetStatus {
                    target: key.addr,
                    state: entry.state().name().to_owned(),
                    weight: entry.weight,
                    traffic: traffic(
                        dataplane.target_counters(entry.id)?,
                        active.targets.get(&entry.id).copied().unwrap_or(0),
                    ),
                    active_connections: dataplane.active_connections(entry.id),
                    mac: state
                        .targets
                        .get(&entry.id)
                        .map(|t| t.mac)
                        .filter(|mac| *mac != crate::maps::UNRESOLVED_MAC)
                        .map(|mac| crate::net::format_mac(&mac)),
                });
            }
            target_groups.push(GroupStatus {
                name: g.name.clone(),
                forwarding: g.forwarding.to_string(),
                algorithm: g.algorithm.to_string(),
                stickiness: g.stickiness.map(crate::config::show),
                fail_open: registry.fails_open(&g.name),
                targets,
            });
        }
        let drops = dataplane
            .drops()?
            .into_iter()
            .map(|(reason, n)| (reason.name().to_owned(), n))
            .collect();
        Ok(Status {
            interfaces: interfaces.to_vec(),
            listeners,
            target_groups,
            drops,
            icmp: dataplane
                .icmp_sent()?
                .into_iter()
                .map(|(kind, n)| (kind.name().to_owned(), n))
                .collect(),
        })
    }
}

/// Metrics that live across scrapes: observed as things happen, not read from maps.
#[derive(Clone)]
pub struct Telemetry {
    pub probe_duration: HistogramVec,
    pub reloads: IntCounterVec,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            probe_duration: HistogramVec::new(
                HistogramOpts::new(
                    "lb_health_check_duration_seconds",
                    "Time a health check probe took, failed ones included.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
                &["target_group", "target"],
            )
            .expect("valid metric"),
            reloads: {
                let reloads = IntCounterVec::new(
                    Opts::new(
                        "lb_config_reloads_total",
                        "Configuration reloads, by result.",
                    ),
                    &["result"],
                )
                .expect("valid metric");
                // Every result exists from the start, at 0: an alert on the increase of a
                // series that appears only with its first failure never fires.
                for result in RELOAD_RESULTS {
                    reloads.with_label_values(&[result]);
                }
                reloads
            },
        }
    }
}

/// The results of a reload, as `lb_config_reloads_total` labels them.
pub const RELOAD_SUCCESS: &str = "success";
pub const RELOAD_FAILURE: &str = "failure";
const RELOAD_RESULTS: [&str; 2] = [RELOAD_SUCCESS, RELOAD_FAILURE];

/// The traffic counters of one level (listeners or targets): a family of each, so that every
/// family sums to a total that means something.
struct TrafficFamilies {
    packets: IntCounterVec,
    bytes: IntCounterVec,
    new_flows: IntCounterVec,
    active: IntGaugeVec,
}

impl TrafficFamilies {
    /// `lb_<level>_packets_total` and the rest, labelled `labels`, registered in `registry`.
    fn new(registry: &Registry, level: &str, labels: &[&str]) -> Result<Self> {
        let counter = |what: &str, help: &str| {
            register_counter(
                registry,
                &format!("lb_{level}_{what}_total"),
                &format!("{help}, per {level}."),
                labels,
            )
        };
        Ok(TrafficFamilies {
            packets: counter("packets", "Packets forwarded")?,
            bytes: counter("bytes", "Bytes forwarded (as received)")?,
            new_flows: counter("new_flows", "Flows that took a fresh target pick")?,
            active: register_gauge(
                registry,
                &format!("lb_{level}_active_flows"),
                &format!("Flows seen within their listener's idle timeout, per {level}."),
                labels,
            )?,
        })
    }

    fn record(&self, labels: &[&str], t: &Traffic) {
        self.packets.with_label_values(labels).inc_by(t.packets);
        self.bytes.with_label_values(labels).inc_by(t.bytes);
        self.new_flows.with_label_values(labels).inc_by(t.new_flows);
        self.active
            .with_label_values(labels)
            .set(t.active_flows as i64);
    }
}

/// A counter family `name`, registered in `registry`.
fn register_counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// A gauge family `name`, registered in `registry`.
fn register_gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// The Prometheus text exposition of `status` and `telemetry`.
pub fn render(status: &Status, telemetry: &Telemetry) -> Result<String> {
    let registry = Registry::new();
    let counter = |name, help, labels: &[&str]| register_counter(&registry, name, help, labels);
    let gauge = |name, help, labels: &[&str]| register_gauge(&registry, name, help, labels);
    let listeners = TrafficFamilies::new(&registry, "listener", &["listener", "target_group"])?;
    let targets = TrafficFamilies::new(&registry, "target", &["target_group", "target"])?;
    let listener_info = gauge(
        "lb_listener_info",
        "Always 1; the labels say where the listener listens.",
        &["listener", "address", "protocol", "target_group"],
    )?;
    let drops = counter(
        "lb_dropped_packets_total",
        "Packets to a VIP that were dropped, by reason.",
        &["reason"],
    )?;
    let icmp = counter(
        "lb_icmp_sent_total",
        "ICMP messages the data plane sent, by kind: echo_reply (settings.answer_ping), too_big_sent (fragmentation needed for a packet too big to encapsulate), error_to_target (an error about a reply, forwarded to the flow's target), error_to_client (an error about a NAT request, forwarded to its client).",
        &["kind"],
    )?;
    let refused = counter(
        "lb_listener_refused_new_flows_total",
        "New flows the listener's rate limits dropped, by limit (listener_rate_limit, source_rate_limit); only for listeners with limits.",
        &["listener", "target_group", "reason"],
    )?;
    let healthy = gauge(
        "lb_target_healthy",
        "1 if the target is healthy, else 0.",
        &["target_group", "target"],
    )?;
    let state = gauge(
        "lb_target_state",
        "1 for the target's current state, 0 for the others.",
        &["target_group", "target", "state"],
    )?;
    let healthy_n = gauge(
        "lb_healthy_targets",
        "Healthy targets in the group.",
        &["target_group"],
    )?;
    let unhealthy_n = gauge(
        "lb_unhealthy_targets",
        "Unhealthy targets in the group.",
        &["target_group"],
    )?;
    let connections = gauge(
        "lb_target_active_connections",
        "Connections the clients have not ended (TCP: no FIN or RST yet; UDP: not idle), per target: what least connections compares.",
        &["target_group", "target"],
    )?;
    let resolved = gauge(
        "lb_target_next_hop_resolved",
        "1 if the MAC the target's frames go to is known, else 0 (it then takes no new flows).",
        &["target_group", "target"],
    )?;
    let fail_open = gauge(
        "lb_target_group_fail_open",
        "1 while the group has no healthy target and sends new flows to all.",
        &["target_group"],
    )?;
    let build = gauge(
        "lb_build_info",
        "Always 1; the labels say which lb runs.",
        &["version"],
    )?;
    registry.register(Box::new(telemetry.probe_duration.clone()))?;
    registry.register(Box::new(telemetry.reloads.clone()))?;

    for l in &status.listeners {
        listeners.record(&[&l.name, &l.target_group], &l.traffic);
        for (reason, n) in &l.refused_new_flows {
            refused
                .with_label_values(&[&l.name, &l.target_group, reason])
                .inc_by(*n);
        }
        listener_info
            .with_label_values(&[&l.name, &l.address, &l.protocol, &l.target_group])
            .set(1);
    }
    for g in &status.target_groups {
        let count =
            |s: TargetState| g.targets.iter().filter(|t| t.state == s.name()).count() as i64;
        healthy_n
            .with_label_values(&[&g.name])
            .set(count(TargetState::Healthy));
        unhealthy_n
            .with_label_values(&[&g.name])
            .set(count(TargetState::Unhealthy));
        fail_open
            .with_label_values(&[&g.name])
            .set(g.fail_open as i64);
        for t in &g.targets {
            let target = t.target.to_string();
            targets.record(&[&g.name, &target], &t.traffic);
            connections
                .with_label_values(&[&g.name, &target])
                .set(t.active_connections as i64);
            resolved
                .with_label_values(&[&g.name, &target])
                .set(t.mac.is_some() as i64);
            healthy
                .with_label_values(&[&g.name, &target])
                .set((t.state == TargetState::Healthy.name()) as i64);
            for s in TargetState::ALL {
                state
                    .with_label_values(&[&g.name, &target, s.name()])
                    .set((t.state == s.name()) as i64);
            }
        }
    }
    for (reason, n) in &status.drops {
        drops.with_label_values(&[reason]).inc_by(*n);
    }
    for (kind, n) in &status.icmp {
        icmp.with_label_values(&[kind]).inc_by(*n);
    }
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// Packets/s and bytes/s between two samples, by listener name and by `group/target`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub listeners: BTreeMap<String, Rate>,
    pub targets: BTreeMap<String, Rate>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
}

impl Rates {
    pub fn between(before: &Status, now: &Status, seconds: f64) -> Self {
        let rate = |a: Option<&Traffic>, b: &Traffic| {
            let a = a.copied().unwrap_or_default();
            Rate {
                packets_per_second: b.packets.saturating_sub(a.packets) as f64 / seconds,
                bytes_per_second: b.bytes.saturating_sub(a.bytes) as f64 / seconds,
            }
        };
        let mut rates = Rates::default();
        for l in &now.listeners {
            let old = before
                .listeners
                .iter()
                .find(|o| o.name == l.name)
                .map(|o| &o.traffic);
            rates
                .listeners
                .insert(l.name.clone(), rate(old, &l.traffic));
        }
        for g in &now.target_groups {
            for t in &g.targets {
                let old = before
                    .target_groups
                    .iter()
                    .find(|o| o.name == g.name)
                    .and_then(|o| o.targets.iter().find(|o| o.target == t.target))
                    .map(|o| &o.traffic);
                rates
                    .targets
                    .insert(format!("{}/{}", g.name, t.target), rate(old, &t.traffic));
            }
        }
        rates
    }
}

/// `lb status` as aligned tables.
pub fn table(status: &Status, rates: &Rates) -> String {
    let mut out = String::new();
    let mut rows = vec![row(&[
        "LISTENER",
        "ADDRESS",
        "PROTOCOL",
        "TARGET GROUP",
        "ACTIVE FLOWS",
        "PACKETS/S",
        "BYTES/S",
    ])];
    for l in &status.listeners {
        let r = rates.listeners.get(&l.name).copied().unwrap_or_default();
        rows.push(vec![
            l.name.clone(),
            l.address.clone(),
            l.protocol.clone(),
            l.target_group.clone(),
            l.traffic.active_flows.to_string(),
            format!("{:.1}", r.packets_per_second),
            human_bytes(r.bytes_per_second),
        ]);
    }
    out += &aligned(&rows);
    for g in &status.target_groups {
        let healthy = g
            .targets
            .iter()
            .filter(|t| t.state == TargetState::Healthy.name())
            .count();
        let sticky = g
            .stickiness
            .as_ref()
            .map_or(String::new(), |d| format!(", sticky {d}"));
        out += &format!(
            "\nTARGET GROUP {} ({}, {}{sticky}): {healthy} of {} targets healthy{}\n",
            g.name,
            g.forwarding,
            g.algorithm,
            g.targets.len(),
            if g.fail_open {
                ", FAILING OPEN to all registered targets"
            } else {
                ""
            }
        );
        let mut rows = vec![row(&[
            "TARGET",
            "STATE",
            "WEIGHT",
            "ACTIVE FLOWS",
            "CONNECTIONS",
            "PACKETS/S",
            "BYTES/S",
            "NEW FLOWS",
        ])];
        for t in &g.targets {
            let r = rates
                .targets
                .get(&format!("{}/{}", g.name, t.target))
                .copied()
                .unwrap_or_default();
            rows.push(vec![
                t.target.to_string(),
                if t.mac.is_some() {
                    t.state.clone()
                } else {
                    format!("{} (no MAC)", t.state)
                },
                t.weight.to_string(),
                t.traffic.active_flows.to_string(),
                t.active_connections.to_string(),
                format!("{:.1}", r.packets_per_second),
                human_bytes(r.bytes_per_second),
                t.traffic.new_flows.to_string(),
            ]);
        }
        out += &aligned(&rows);
    }
    let drops: Vec<String> = status
        .drops
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    out += &format!("\nDROPPED PACKETS: {}\n", drops.join(", "));
    let icmp: Vec<String> = status
        .icmp
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    out += &format!("ICMP SENT: {}\n", icmp.join(", "));
    out
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Columns padded to their widest cell, numbers (all but the first column) right-aligned.
fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let numeric =
                    s.chars().next().is_some_and(|ch| ch.is_ascii_digit()) && !s.contains(':');
                if numeric {
                    format!("{s:>w$}", w = widths[c])
                } else {
                    format!("{s:<w$}", w = widths[c])
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

fn human_bytes(per_second: f64) -> String {
    match per_second {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(packets: u64) -> Status {
        Status {
            interfaces: vec!["eth0".into()],
            listeners: vec![ListenerStatus {
                name: "web".into(),
                address: "203.0.113.10:80".into(),
                protocol: "tcp".into(),
                target_group: "web".into(),
                traffic: Traffic {
                    packets,
                    bytes: packets * 100,
                    new_flows: 3,
                    active_flows: 2,
                },
                refused_new_flows: [("listener_rate_limit".into(), 7)].into(),
            }],
            target_groups: vec![GroupStatus {
                name: "web".into(),
                forwarding: "dsr".into(),
                algorithm: "least_connections".into(),
                stickiness: Some("1h".into()),
                fail_open: false,
                targets: vec![
                    TargetStatus {
                        target: "198.51.100.11:80".parse().unwrap(),
                        state: "healthy".into(),
                        weight: 1,
                        traffic: Traffic {
                            packets,
                            bytes: packets * 100,
                            new_flows: 3,
                            active_flows: 2,
                        },
                        active_connections: 1,
                        mac: Some("02:00:c6:33:64:0b".into()),
                    },
                    TargetStatus {
                        target: "198.51.100.12:80".parse().unwrap(),
                        state: "unhealthy".into(),
                        weight: 2,
                        traffic: Traffic::default(),
                        active_connections: 0,
                        mac: Some("02:00:c6:33:64:0b".into()),
                    },
                ],
            }],
            drops: [("no_listener".to_owned(), 4)].into(),
            icmp: [("echo_reply".to_owned(), 2)].into(),
        }
    }

    #[test]
    fn rates_come_from_two_samples() {
        let rates = Rates::between(&status(100), &status(300), 2.0);
        assert_eq!(rates.listeners["web"].packets_per_second, 100.0);
        assert_eq!(
            rates.targets["web/198.51.100.11:80"].bytes_per_second,
            10_000.0
        );
        assert_eq!(
            rates.targets["web/198.51.100.12:80"].packets_per_second,
            0.0
        );
    }

    #[test]
    fn table_is_aligned() {
        let now = status(300);
        let text = table(&now, &Rates::between(&status(100), &now, 2.0));
        let expected = "\
LISTENER  ADDRESS          PROTOCOL  TARGET GROUP  ACTIVE FLOWS  PACKETS/S  BYTES/S
web       203.0.113.10:80  tcp       web                      2      100.0  10.0 kB

TARGET GROUP web (dsr, least_connections, sticky 1h): 1 of 2 targets healthy
TARGET            STATE      WEIGHT  ACTIVE FLOWS  CONNECTIONS  PACKETS/S  BYTES/S  NEW FLOWS
198.51.100.11:80  healthy         1             2            1      100.0  10.0 kB          3
198.51.100.12:80  unhealthy       2             0            0        0.0      0 B          0

DROPPED PACKETS: no_listener 4
ICMP SENT: echo_reply 2
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn metrics_use_prometheus_names() {
        let text = render(&status(5), &Telemetry::default()).unwrap();
        for line in [
            "lb_listener_packets_total{listener=\"web\",target_group=\"web\"} 5",
            "lb_target_packets_total{target=\"198.51.100.11:80\",target_group=\"web\"} 5",
            "lb_listener_active_flows{listener=\"web\",target_group=\"web\"} 2",
            "lb_target_active_flows{target=\"198.51.100.11:80\",target_group=\"web\"} 2",
            "lb_target_active_connections{target=\"198.51.100.11:80\",target_group=\"web\"} 1",
            "lb_listener_info{address=\"203.0.113.10:80\",listener=\"web\",protocol=\"tcp\",target_group=\"web\"} 1",
            "lb_config_reloads_total{result=\"failure\"} 0",
            "lb_config_reloads_total{result=\"success\"} 0",
            "lb_target_healthy{target=\"198.51.100.12:80\",target_group=\"web\"} 0",
            "lb_target_state{state=\"unhealthy\",target=\"198.51.100.12:80\",target_group=\"web\"} 1",
            "lb_healthy_targets{target_group=\"web\"} 1",
            "lb_dropped_packets_total{reason=\"no_listener\"} 4",
            "lb_icmp_sent_total{kind=\"echo_reply\"} 2",
            "lb_listener_refused_new_flows_total{listener=\"web\",reason=\"listener_rate_limit\",target_group=\"web\"} 7",
            "lb_build_info{version=",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
