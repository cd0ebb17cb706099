//! `lb.yaml`: parsing and validation.
//!
//! Two passes. serde (with `deny_unknown_fields`) turns the text into raw structs and reports
//! syntax, unknown-key and type errors with serde_yaml's location. Then validation checks the
//! meaning (names, references, addresses, ports) and reports every problem at once, each at the
//! line and column of the offending value, found through a position index of the document.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use crate::health::{CheckProtocol, HealthCheck, Matcher};
use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// Slots per Maglev table unless the config says otherwise (a prime, as Maglev needs).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;
pub const DEFAULT_CONNECTION_TABLE_SIZE: u32 = 262_144;
pub const DEFAULT_MAX_TARGET_GROUPS: u32 = 16;
/// Clients whose sticky target lb remembers, across all sticky listeners.
pub const DEFAULT_STICKINESS_TABLE_SIZE: u32 = 65_536;
/// Sources whose new flows' rate the data plane tracks, for listeners with a per-source limit.
pub const DEFAULT_RATE_LIMITED_SOURCES: u32 = 65_536;
/// The highest rate limit on new flows: beyond it, a limit is no limit.
const MAX_NEW_FLOWS_PER_SECOND: i64 = 100_000_000;
/// As an ALB's stickiness cookie: a client keeps its target a day after its last new flow.
pub const DEFAULT_STICKINESS_DURATION: Duration = Duration::from_secs(86_400);
const MAX_WEIGHT: u32 = 1000;
/// NLB's defaults: a TCP flow idle this long is forgotten (350 s), a UDP flow after 120 s.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(350);
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// NLB's default: a deregistered target drains for 300 s.
pub const DEFAULT_DEREGISTRATION_DELAY: Duration = Duration::from_secs(300);
/// Maglev spreads well only when the table is much larger than the number of targets.
const MIN_SLOTS_PER_TARGET: u64 = 10;

// ---------------------------------------------------------------------------------------------
// The validated configuration: what the rest of lb works with.

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub settings: Settings,
    /// Sources no listener accepts, whatever its allow-list says.
    /// Prefixes of both families.
    pub denied_sources: Vec<IpNet>,
    pub listeners: Vec<Listener>,
    pub target_groups: Vec<TargetGroup>,
    /// What is allowed but probably not meant (a group without targets), at its place in the
    /// file: `lb check` and `lb run` print these and go on.
    pub warnings: Vec<ConfigError>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub maglev_table_size: u32,
    pub hash_seed: u32,
    pub connection_table_size: u32,
    pub max_target_groups: u32,
    pub stickiness_table_size: u32,
    /// How many sources the per-source rate limits track at once.
    pub rate_limited_sources: u32,
    /// Whether the data plane answers echo requests to a VIP.
    pub answer_ping: bool,
    /// Whether any listener has an IPv6 VIP (not a setting of its own: from the listeners).
    /// Only then are the data plane's IPv6 tables sized as the settings say; without, they
    /// hold one entry, and cost an IPv4-only balancer no memory. Sized at start: the first
    /// IPv6 listener needs a restart.
    pub ipv6: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    /// The VIP, IPv4 or IPv6.
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub target_group: String,
    /// As configured; [`Listener::idle_timeout`] applies the per-protocol defaults.
    pub idle_timeout: Option<Duration>,
    /// The only sources it accepts; `None`: everyone.
    /// Of the VIP's family.
    pub allowed_sources: Option<Vec<IpNet>>,
    /// New flows per second it takes, in all and from each source address; `None`: no limit.
    pub max_new_flows_per_second: Option<u32>,
    pub max_new_flows_per_second_per_source: Option<u32>,
}

impl Listener {
    /// Where it listens: VIP:port, an IPv6 VIP in brackets.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// How long a flow of IP protocol `proto` may be idle before it counts as a new flow.
    pub fn idle_timeout(&self, proto: u8) -> Duration {
        self.idle_timeout
            .unwrap_or(if proto == lb_common::PROTO_TCP {
                DEFAULT_TCP_IDLE_TIMEOUT
            } else {
                DEFAULT_UDP_IDLE_TIMEOUT
            })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetGroup {
    pub name: String,
    pub forwarding: Forwarding,
    pub algorithm: Algorithm,
    /// Source-IP stickiness: how long a client keeps its target after its last new flow.
    pub stickiness: Option<Duration>,
    pub targets: Vec<Target>,
    pub health_check: HealthCheck,
    pub deregistration_delay: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// IPv4 or IPv6. A dsr target serves VIPs of either family (its address names it for its
    /// MAC and its health check); ipip encapsulates in its address's family.
    pub address: IpAddr,
    /// Where the target serves: its own `port`, else its group's. The data plane translates a
    /// listener port that differs.
    pub port: u16,
    pub weight: u32,
}

impl Target {
    /// Where it serves: address:port, an IPv6 address in brackets.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    TcpUdp,
}

impl Protocol {
    /// The IP protocol numbers this listener answers.
    pub fn ip_protocols(self) -> &'static [u8] {
        match self {
            Self::Tcp => &[lb_common::PROTO_TCP],
            Self::Udp => &[lb_common::PROTO_UDP],
            Self::TcpUdp => &[lb_common::PROTO_TCP, lb_common::PROTO_UDP],
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// Layer-2 direct server return: only the destination MAC changes.
    #[default]
    Dsr,
    /// IP-in-IP to targets anywhere routable; they decapsulate and answer directly.
    Ipip,
    /// Destination NAT: targets see the client's address and answer through the balancer,
    /// which restores VIP and listener port.
    Nat,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Maglev => "maglev",
            Self::SourceIp => "source_ip",
            Self::RoundRobin => "round_robin",
            Self::LeastConnections => "least_connections",
        })
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dsr => "dsr",
            Self::Ipip => "ipip",
            Self::Nat => "nat",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Consistent hashing of the 5-tuple.
    #[default]
    Maglev,
    /// Consistent hashing of the client's address alone (the L4 switch's IP hash, IPVS sh).
    SourceIp,
    /// New flows take the targets in turn, smoothly weighted.
    RoundRobin,
    /// A new flow goes to the target with the fewest active connections per weight (IPVS wlc).
    LeastConnections,
}

/// What stickiness keys on: only the client's address, as NLB's.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum StickinessType {
    SourceIp,
}

impl Config {
    pub fn target_group(&self, name: &str) -> Option<&TargetGroup> {
        self.target_groups.iter().find(|g| g.name == name)
    }

    /// Whether an IPv6 listener forwards to group `group`.
    pub fn serves_ipv6(&self, group: &str) -> bool {
        self.listeners
            .iter()
            .any(|l| l.address.is_ipv6() && l.target_group == group)
    }

    /// Whether some listener of each family (IPv4, IPv6) forwards with nat: the balancer then
    /// routes that family, and looks for replies among its packets.
    pub fn nat_families(&self) -> [bool; 2] {
        let nat = |ipv6: bool| {
            self.listeners.iter().any(|l| {
                l.address.is_ipv6() == ipv6
                    && self
                        .target_group(&l.target_group)
                        .is_some_and(|g| g.forwarding == Forwarding::Nat)
            })
        };
        [nat(false), nat(true)]
    }

    /// Logs each warning: allowed, probably not meant.
    pub fn log_warnings(&self) {
        for w in &self.warnings {
            tracing::warn!("{w}");
        }
    }

    /// The one-line summary `lb check` prints.
    pub fn summary(&self) -> String {
        let targets: usize = self.target_groups.iter().map(|g| g.targets.len()).sum();
        format!(
            "{} listener{}, {} target group{}, {} target{}",
            self.listeners.len(),
            plural(self.listeners.len()),
            self.target_groups.len(),
            plural(self.target_groups.len()),
            targets,
            plural(targets),
        )
    }
}

/// `tcp` or `udp`, for an IP protocol number lb balances.
pub fn protocol_name(proto: u8) -> &'static str {
    if proto == lb_common::PROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// One problem in a config file, at a line and column (1-based) when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All the problems found in one file.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: None,
            column: None,
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    parse(path, &text)
}

/// Parses and validates config text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
        let location = e.location();
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: location.as_ref().map(|l| l.line()),
            column: location.as_ref().map(|l| l.column()),
            message: serde_message(&e),
        }])
    })?;
    let positions = Positions::index(text);
    let mut v = Validator {
        file: path,
        positions: &positions,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let mut config = v.config(raw);
    config.warnings = v.warnings;
    if v.errors.is_empty() {
        Ok(config)
    } else {
        v.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(v.errors))
    }
}

/// serde_yaml appends " at line L column C" to its messages; the location is printed in front.
fn serde_message(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message,
    }
}

// ---------------------------------------------------------------------------------------------
// The file as written. Numbers are read wide so that range errors get a message of lb's own.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    settings: RawSettings,
    #[serde(default)]
    denied_sources: Vec<String>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    target_groups: Vec<RawTargetGroup>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    maglev_table_size: Option<i64>,
    hash_seed: Option<i64>,
    connection_table_size: Option<i64>,
    max_target_groups: Option<i64>,
    stickiness_table_size: Option<i64>,
    rate_limited_sources: Option<i64>,
    answer_ping: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    address: String,
    port: i64,
    protocol: Protocol,
    target_group: String,
    idle_timeout: Option<String>,
    allowed_sources: Option<Vec<String>>,
    max_new_flows_per_second: Option<i64>,
    max_new_flows_per_second_per_source: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetGroup {
    name: String,
    #[serde(default)]
    forwarding: Forwarding,
    #[serde(default)]
    algorithm: Algorithm,
    stickiness: Option<RawStickiness>,
    /// The targets' port where a target names none, as in an NLB target group.
    port: Option<i64>,
    #[serde(default)]
    targets: Vec<RawTarget>,
    health_check: Option<RawHealthCheck>,
    deregistration_delay: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStickiness {
    /// One type so far: read so that serde refuses any other.
    #[serde(rename = "type")]
    _kind: StickinessType,
    duration: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    protocol: Option<CheckProtocol>,
    /// `traffic-port` or a number.
    port: Option<serde_yaml::Value>,
    path: Option<String>,
    matcher: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    healthy_threshold: Option<i64>,
    unhealthy_threshold: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    address: String,
    port: Option<i64>,
    weight: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Validator<'a> {
    file: &'a Path,
    positions: &'a Positions,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Validator<'_> {
    fn at(&self, at: &str, message: String) -> ConfigError {
        let marker = self.positions.get(at);
        ConfigError {
            file: self.file.to_owned(),
            line: marker.map(|m| m.0),
            column: marker.map(|m| m.1),
            message,
        }
    }

    fn error(&mut self, at: &str, message: String) {
        let error = self.at(at, message);
        self.errors.push(error);
    }

    fn warning(&mut self, at: &str, message: String) {
        let warning = self.at(at, message);
        self.warnings.push(warning);
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let settings = self.settings(&raw.settings);
        if raw.listeners.is_empty() {
            self.error(
                "",
                "no listeners: add at least one under `listeners:`".into(),
            );
        }
        if raw.target_groups.is_empty() {
            self.error(
                "",
                "no target groups: add at least one under `target_groups:`".into(),
            );
        }

        let mut groups = Vec::new();
        let mut group_names = HashSet::new();
        for (i, g) in raw.target_groups.iter().enumerate() {
            let at = format!("target_groups[{i}]");
            self.name(&format!("{at}.name"), &g.name, "target group");
            if !group_names.insert(g.name.as_str()) {
                self.error(
                    &format!("{at}.name"),
                    format!("duplicate target group name `{}`", g.name),
                );
            }
            groups.push(self.target_group(&at, g));
        }
        if let Some(s) = &settings {
            for (i, g) in groups.iter().enumerate() {
                if g.targets.len() as u64 * MIN_SLOTS_PER_TARGET > s.maglev_table_size as u64 {
                    self.error(
                        &format!("target_groups[{i}].targets"),
                        format!(
                            "target group `{}` has {} targets: settings.maglev_table_size ({}) must be at least {MIN_SLOTS_PER_TARGET} times that for an even spread",
                            g.name,
                            g.targets.len(),
                            s.maglev_table_size
                        ),
                    );
                }
            }
        }
        let total: usize = groups.iter().map(|g| g.targets.len()).sum();
        if total > lb_common::MAX_TARGETS as usize {
            self.error(
                "target_groups",
                format!(
                    "{total} targets in all, more than the {} lb supports",
                    lb_common::MAX_TARGETS
                ),
            );
        }
        if let Some(max) = settings.as_ref().map(|s| s.max_target_groups)
            && groups.len() as u64 > max as u64
        {
            self.error(
                "target_groups",
                format!(
                    "{} target groups, more than settings.max_target_groups ({max})",
                    groups.len()
                ),
            );
        }

        let mut listeners = Vec::new();
        let mut listener_names = HashSet::new();
        let mut bound: HashMap<(IpAddr, u16, u8), String> = HashMap::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            self.name(&format!("{at}.name"), &l.name, "listener");
            if !listener_names.insert(l.name.as_str()) {
                self.error(
                    &format!("{at}.name"),
                    format!("duplicate listener name `{}`", l.name),
                );
            }
            let address = self.vip(&format!("{at}.address"), &l.address);
            let port = self.port(&format!("{at}.port"), l.port);
            let group = groups.iter().find(|g| g.name == l.target_group);
            if group.is_none() {
                let known: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
                self.error(
                    &format!("{at}.target_group"),
                    format!(
                        "unknown target group `{}` (defined: {})",
                        l.target_group,
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            let (Some(address), Some(port)) = (address, port) else {
                continue;
            };
            for &proto in l.protocol.ip_protocols() {
                if let Some(other) = bound.insert((address, port, proto), l.name.clone()) {
                    self.error(
                        &format!("{at}.port"),
                        format!(
                            "listener `{}` uses {}/{} already taken by listener `{other}`",
                            l.name,
                            SocketAddr::new(address, port),
                            protocol_name(proto),
                        ),
                    );
                }
            }
            let idle_timeout = l.idle_timeout.as_deref().and_then(|text| {
                self.duration(
                    &format!("{at}.idle_timeout"),
                    text,
                    "idle_timeout",
                    Duration::from_secs(1)..=Duration::from_secs(6000),
                )
            });
            let allowed_sources = l.allowed_sources.as_ref().map(|list| {
                if list.is_empty() {
                    self.error(
                        &format!("{at}.allowed_sources"),
                        "allowed_sources is empty, which would refuse everyone: list the sources to allow, or leave it out to allow everyone".into(),
                    );
                }
                let nets = self.sources(&format!("{at}.allowed_sources"), list);
                for (k, net) in nets.iter().enumerate() {
                    if net.network().is_ipv6() != address.is_ipv6() {
                        self.error(
                            &format!("{at}.allowed_sources[{k}]"),
                            format!(
                                "`{net}` is {}, but listener `{}` has an {} VIP: its clients never come from there",
                                family(net.network()),
                                l.name,
                                family(address)
                            ),
                        );
                    }
                }
                nets
            });
            if let Some(g) = group {
                self.families_match(&at, &l.name, address, g);
            }
            let [max_new_flows_per_second, max_new_flows_per_second_per_source] = [
                ("max_new_flows_per_second", l.max_new_flows_per_second),
                (
                    "max_new_flows_per_second_per_source",
                    l.max_new_flows_per_second_per_source,
                ),
            ]
            .map(|(field, limit)| {
                let limit = limit?;
                if !(1..=MAX_NEW_FLOWS_PER_SECOND).contains(&limit) {
                    self.error(
                        &format!("{at}.{field}"),
                        format!("{field} {limit} must be between 1 and {MAX_NEW_FLOWS_PER_SECOND} (leave it out for no limit)"),
                    );
                    return None;
                }
                Some(limit as u32)
            });
            listeners.push(Listener {
                name: l.name.clone(),
                address,
                port,
                protocol: l.protocol,
                target_group: l.target_group.clone(),
                idle_timeout,
                allowed_sources,
                max_new_flows_per_second,
                max_new_flows_per_second_per_source,
            });
        }

        self.reply_ports_unambiguous(&listeners, &groups);
        let denied_sources = self.sources("denied_sources", &raw.denied_sources);
        let allowed: usize = listeners
            .iter()
            .filter_map(|l| l.allowed_sources.as_ref())
            .map(Vec::len)
            .sum();
        for (what, count, at) in [
            ("allowed_sources of all listeners", allowed, "listeners"),
            ("denied_sources", denied_sources.len(), "denied_sources"),
        ] {
            if count > lb_common::MAX_SOURCE_PREFIXES as usize {
                self.error(
                    at,
                    format!(
                        "{count} prefixes in {what}: lb holds at most {}",
                        lb_common::MAX_SOURCE_PREFIXES
                    ),
                );
            }
        }
        let ipv6 = listeners.iter().any(|l| l.address.is_ipv6());
        Config {
            warnings: Vec::new(),
            denied_sources,
            settings: Settings {
                ipv6,
                ..settings.unwrap_or(Settings {
                    maglev_table_size: DEFAULT_MAGLEV_TABLE_SIZE,
                    hash_seed: 0,
                    connection_table_size: DEFAULT_CONNECTION_TABLE_SIZE,
                    max_target_groups: DEFAULT_MAX_TARGET_GROUPS,
                    stickiness_table_size: DEFAULT_STICKINESS_TABLE_SIZE,
                    rate_limited_sources: DEFAULT_RATE_LIMITED_SOURCES,
                    answer_ping: true,
                    ipv6,
                })
            },
            listeners,
            target_groups: groups,
        }
    }

    fn settings(&mut self, raw: &RawSettings) -> Option<Settings> {
        let before = self.errors.len();
        let size = raw
            .maglev_table_size
            .unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE as i64);
        if !(3..=16_777_259).contains(&size) || !is_prime(size as u64) {
            self.error(
                "settings.maglev_table_size",
                format!("maglev_table_size {size} must be a prime between 3 and 16777259 (65537 is the default)"),
            );
        }
        let seed = raw.hash_seed.unwrap_or(0);
        if !(0..=u32::MAX as i64).contains(&seed) {
            self.error(
                "settings.hash_seed",
                format!("hash_seed {seed} must be between 0 and {}", u32::MAX),
            );
        }
        let conns = self.setting(
            "connection_table_size",
            raw.connection_table_size,
            DEFAULT_CONNECTION_TABLE_SIZE,
            1024..=100_000_000,
        );
        let groups = self.setting(
            "max_target_groups",
            raw.max_target_groups,
            DEFAULT_MAX_TARGET_GROUPS,
            1..=4096,
        );
        if (1..=4096).contains(&groups)
            && (groups as u64) * 2 * (size.max(0) as u64) > u32::MAX as u64
        {
            self.error(
                "settings.max_target_groups",
                format!(
                    "max_target_groups × 2 × maglev_table_size ({groups} × 2 × {size}) exceeds the 2^32 slots a map can hold"
                ),
            );
        }
        let sticky = self.setting(
            "stickiness_table_size",
            raw.stickiness_table_size,
            DEFAULT_STICKINESS_TABLE_SIZE,
            1024..=10_000_000,
        );
        let sources = self.setting(
            "rate_limited_sources",
            raw.rate_limited_sources,
            DEFAULT_RATE_LIMITED_SOURCES,
            1024..=10_000_000,
        );
        (self.errors.len() == before).then_some(Settings {
            maglev_table_size: size as u32,
            hash_seed: seed as u32,
            connection_table_size: conns as u32,
            max_target_groups: groups as u32,
            stickiness_table_size: sticky as u32,
            rate_limited_sources: sources as u32,
            answer_ping: raw.answer_ping.unwrap_or(true),
            ipv6: false,
        })
    }

    /// `settings.<name>` as given, or `default`; an error unless it is within `range`.
    fn setting(
        &mut self,
        name: &str,
        value: Option<i64>,
        default: u32,
        range: std::ops::RangeInclusive<i64>,
    ) -> i64 {
        let value = value.unwrap_or(default as i64);
        if !range.contains(&value) {
            self.error(
                &format!("settings.{name}"),
                format!(
                    "{name} {value} must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            );
        }
        value
    }

    fn target_group(&mut self, at: &str, g: &RawTargetGroup) -> TargetGroup {
        if g.targets.is_empty() {
            self.warning(
                &format!("{at}.name"),
                format!(
                    "target group `{}` has no targets: its listeners drop their traffic (counted as no_target)",
                    g.name
                ),
            );
        }
        let default_port = g.port.and_then(|p| self.port(&format!("{at}.port"), p));
        let mut targets = Vec::new();
        let mut seen = HashSet::new();
        for (j, t) in g.targets.iter().enumerate() {
            let at = format!("{at}.targets[{j}]");
            let address = self.target_address(&format!("{at}.address"), &t.address);
            let port = match t.port {
                Some(p) => self.port(&format!("{at}.port"), p),
                None if g.port.is_some() => default_port,
                None => {
                    self.error(
                        &format!("{at}.address"),
                        format!(
                            "target {} has no port: give it one, or give target group `{}` a default `port`",
                            t.address, g.name
                        ),
                    );
                    None
                }
            };
            let weight = t.weight.unwrap_or(1);
            if !(1..=MAX_WEIGHT as i64).contains(&weight) {
                self.error(
                    &format!("{at}.weight"),
                    format!("weight {weight} must be between 1 and {MAX_WEIGHT}"),
                );
            }
            let (Some(address), Some(port)) = (address, port) else {
                continue;
            };
            if !seen.insert((address, port)) {
                self.error(
                    &format!("{at}.address"),
                    format!(
                        "target {} appears twice in target group `{}`",
                        SocketAddr::new(address, port),
                        g.name
                    ),
                );
            }
            targets.push(Target {
                address,
                port,
                weight: weight.clamp(1, MAX_WEIGHT as i64) as u32,
            });
        }
        let deregistration_delay = match &g.deregistration_delay {
            Some(text) => self
                .duration(
                    &format!("{at}.deregistration_delay"),
                    text,
                    "deregistration_delay",
                    Duration::ZERO..=Duration::from_secs(3600),
                )
                .unwrap_or(DEFAULT_DEREGISTRATION_DELAY),
            None => DEFAULT_DEREGISTRATION_DELAY,
        };
        let stickiness = g.stickiness.as_ref().map(|sticky| match &sticky.duration {
            Some(text) => self
                .duration(
                    &format!("{at}.stickiness.duration"),
                    text,
                    "stickiness duration",
                    Duration::from_secs(1)..=Duration::from_secs(7 * 86_400),
                )
                .unwrap_or(DEFAULT_STICKINESS_DURATION),
            None => DEFAULT_STICKINESS_DURATION,
        });
        let raw_check = RawHealthCheck::default();
        let health_check = self.health_check(
            &format!("{at}.health_check"),
            g.health_check.as_ref().unwrap_or(&raw_check),
        );
        TargetGroup {
            name: g.name.clone(),
            forwarding: g.forwarding,
            algorithm: g.algorithm,
            stickiness,
            targets,
            health_check,
            deregistration_delay,
        }
    }

    /// NLB's defaults and limits; the timeout defaults to 10 s, or half the interval if shorter.
    fn health_check(&mut self, at: &str, raw: &RawHealthCheck) -> HealthCheck {
        let defaults = HealthCheck::default();
        let protocol = raw.protocol.unwrap_or(defaults.protocol);
        let port = match &raw.port {
            None => None,
            Some(serde_yaml::Value::String(s)) if s == "traffic-port" => None,
            Some(serde_yaml::Value::Number(n)) => {
                n.as_i64().and_then(|p| self.port(&format!("{at}.port"), p))
            }
            Some(_) => {
                self.error(
                    &format!("{at}.port"),
                    "health check port must be `traffic-port` or a number".into(),
                );
                None
            }
        };
        if protocol == CheckProtocol::Tcp {
            for (key, given) in [
                ("path", raw.path.is_some()),
                ("matcher", raw.matcher.is_some()),
            ] {
                if given {
                    self.error(
                        &format!("{at}.{key}"),
                        format!("{key} applies to http and https health checks only"),
                    );
                }
            }
        }
        let path = raw.path.clone().unwrap_or(defaults.path);
        if !path.starts_with('/') || !path.chars().all(|c| c.is_ascii_graphic()) {
            self.error(
                &format!("{at}.path"),
                format!("health check path `{path}` must start with '/' and have no spaces"),
            );
        }
        let matcher = match raw.matcher.as_deref().map(Matcher::parse) {
            None => defaults.matcher,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                self.error(&format!("{at}.matcher"), format!("matcher: {e}"));
                defaults.matcher
            }
        };
        let interval = raw
            .interval
            .as_deref()
            .and_then(|t| {
                self.duration(
                    &format!("{at}.interval"),
                    t,
                    "interval",
                    Duration::from_secs(1)..=Duration::from_secs(300),
                )
            })
            .unwrap_or(defaults.interval);
        let timeout = match raw.timeout.as_deref() {
            Some(t) => self
                .duration(
                    &format!("{at}.timeout"),
                    t,
                    "timeout",
                    Duration::from_millis(100)..=Duration::from_secs(120),
                )
                .unwrap_or(defaults.timeout),
            None => defaults.timeout.min(interval / 2),
        };
        if timeout >= interval {
            self.error(
                &format!("{at}.timeout"),
                format!(
                    "timeout ({}) must be shorter than interval ({})",
                    show(timeout),
                    show(interval)
                ),
            );
        }
        let mut threshold = |key: &str, value: Option<i64>, default: u32| -> u32 {
            match value {
                None => default,
                Some(v) if (2..=10).contains(&v) => v as u32,
                Some(v) => {
                    self.error(
                        &format!("{at}.{key}"),
                        format!("{key} {v} must be between 2 and 10"),
                    );
                    default
                }
            }
        };
        let healthy_threshold = threshold(
            "healthy_threshold",
            raw.healthy_threshold,
            defaults.healthy_threshold,
        );
        let unhealthy_threshold = threshold(
            "unhealthy_threshold",
            raw.unhealthy_threshold,
            defaults.unhealthy_threshold,
        );
        HealthCheck {
            protocol,
            port,
            path,
            matcher,
            interval,
            timeout,
            healthy_threshold,
            unhealthy_threshold,
        }
    }

    fn duration(
        &mut self,
        at: &str,
        text: &str,
        what: &str,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Option<Duration> {
        match parse_duration(text) {
            Ok(d) if range.contains(&d) => Some(d),
            Ok(_) => {
                self.error(
                    at,
                    format!(
                        "{what} {text} must be between {} and {}",
                        show(*range.start()),
                        show(*range.end())
                    ),
                );
                None
            }
            Err(e) => {
                self.error(at, format!("{what}: {e}"));
                None
            }
        }
    }

    /// A target answers from the VIP, and in dsr and ipip its host turns the target port of
    /// each reply back into the listener's port, knowing only (VIP, target port, protocol). So
    /// on one host, two listeners of a VIP may not share a target port: the host could not
    /// tell which listener port to answer from.
    fn reply_ports_unambiguous(&mut self, listeners: &[Listener], groups: &[TargetGroup]) {
        // Positions follow the file's indices, which the validated lists keep only when nothing
        // was dropped from them for an error.
        if !self.errors.is_empty() {
            return;
        }
        let mut answered: HashMap<(IpAddr, IpAddr, u16, u8), &Listener> = HashMap::new();
        for l in listeners {
            // In nat, the balancer itself restores each reply's port, from the flow.
            let Some(gi) = groups
                .iter()
                .position(|g| g.name == l.target_group && g.forwarding != Forwarding::Nat)
            else {
                continue;
            };
            for (j, t) in groups[gi].targets.iter().enumerate() {
                for &proto in l.protocol.ip_protocols() {
                    let key = (l.address, t.address, t.port, proto);
                    match answered.get(&key) {
                        Some(other) if other.port != l.port => {
                            let message = format!(
                                "target {}/{} serves listeners `{}` ({}) and `{}` ({}): its host could not tell which port to answer from; give it another port in one of the groups",
                                t.endpoint(),
                                protocol_name(proto),
                                other.name,
                                other.endpoint(),
                                l.name,
                                l.endpoint(),
                            );
                            self.error(&format!("target_groups[{gi}].targets[{j}].port"), message);
                        }
                        _ => {
                            answered.insert(key, l);
                        }
                    }
                }
            }
        }
    }

    fn name(&mut self, at: &str, name: &str, what: &str) {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            self.error(
                at,
                format!("{what} name `{name}` must be 1-64 characters of letters, digits, '-', '_' or '.'"),
            );
        }
    }

    /// A VIP: a unicast address of either family that routes beyond one host and one link:
    /// loopback and link-local addresses (IPv6's scoped ones among them) are refused, and so
    /// are IPv4-mapped IPv6 ones (an IPv4 VIP in disguise).
    fn vip(&mut self, at: &str, text: &str) -> Option<IpAddr> {
        if text.contains('%') {
            self.error(
                at,
                format!("VIP `{text}` is scoped to one interface (%zone): a VIP must be a global address, the same on every link"),
            );
            return None;
        }
        self.address(at, text, "VIP", |address| match address {
            IpAddr::V4(a) if a.is_loopback() => Some("it is a loopback address (127.0.0.0/8)"),
            IpAddr::V4(a) if a.is_link_local() => Some(
                "it is link-local (169.254.0.0/16), valid on one link only: a VIP must be routable",
            ),
            IpAddr::V6(a) if a.is_loopback() => Some("it is the loopback address"),
            IpAddr::V6(a) if a.is_unicast_link_local() => Some(
                "it is link-local (fe80::/10), valid on one link only: a VIP must be a global address",
            ),
            _ => None,
        })
    }

    /// A target's address: a unicast address of either family, global (a link-local IPv6
    /// address would need its interface named).
    fn target_address(&mut self, at: &str, text: &str) -> Option<IpAddr> {
        self.address(at, text, "target address", |address| match address {
            IpAddr::V6(a) if a.is_loopback() => Some("it must be a unicast address"),
            IpAddr::V6(a) if a.is_unicast_link_local() => Some(
                "it is link-local (fe80::/10), which names no host without an interface: use the target's global address",
            ),
            _ => None,
        })
    }

    /// An address (`what`: "VIP" or "target address") at `at`: a unicast one, not an
    /// IPv4-mapped IPv6 one (an IPv4 address in disguise), and not one that `refused` gives a
    /// reason against.
    fn address(
        &mut self,
        at: &str,
        text: &str,
        what: &str,
        refused: impl Fn(IpAddr) -> Option<&'static str>,
    ) -> Option<IpAddr> {
        let Ok(address) = text.parse::<IpAddr>() else {
            self.error(at, format!("`{text}` is not an IP address"));
            return None;
        };
        let refusal = match address {
            IpAddr::V4(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => {
                Some("it must be a unicast address")
            }
            IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => {
                Some("it must be a unicast address")
            }
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
                Some("it is an IPv4-mapped address: write the IPv4 address as it is")
            }
            _ => refused(address),
        };
        if let Some(why) = refusal {
            self.error(at, format!("{what} {address} cannot be used: {why}"));
            return None;
        }
        Some(address)
    }

    /// Whether listener `listener` (VIP `address`) can reach each target of its group in the
    /// group's mode. dsr rewrites only MACs, so any target serves any VIP. ipip encapsulates
    /// in the target's family: IPv4 in IPv4 or in IPv6, IPv6 in IPv6 (an IPv6 packet in IPv4,
    /// which Katran does not do either, would need a target host with an IPv4 address for what
    /// IPv6 could carry as well). nat rewrites addresses, so it keeps the family: no NAT64.
    fn families_match(&mut self, at: &str, listener: &str, address: IpAddr, group: &TargetGroup) {
        let refused = |t: &Target| match group.forwarding {
            Forwarding::Dsr => false,
            Forwarding::Ipip => address.is_ipv6() && t.address.is_ipv4(),
            Forwarding::Nat => address.is_ipv6() != t.address.is_ipv6(),
        };
        if let Some(t) = group.targets.iter().find(|t| refused(t)) {
            let why = if group.forwarding == Forwarding::Ipip {
                "ipip carries an IPv6 packet in IPv6 only: give the group IPv6 target addresses, or use dsr"
            } else {
                "nat keeps the address family (no NAT64): give the group targets of the VIP's family"
            };
            self.error(
                &format!("{at}.target_group"),
                format!(
                    "listener `{listener}` has an {} VIP, and target {} of its group `{}` ({}) is {}: {why}",
                    family(address),
                    t.endpoint(),
                    group.name,
                    group.forwarding,
                    family(t.address),
                ),
            );
        }
    }

    /// Source prefixes at `at`: `198.51.100.0/24`, or an address alone for itself.
    fn sources(&mut self, at: &str, list: &[String]) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, text) in list.iter().enumerate() {
            let at = format!("{at}[{i}]");
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) if net.trunc() != net => self.error(
                    &at,
                    format!(
                        "`{text}` has bits set past its prefix length: write {}",
                        net.trunc()
                    ),
                ),
                Ok(net) => nets.push(net),
                Err(_) => self.error(
                    &at,
                    format!(
                        "`{text}` is not a prefix like 198.51.100.0/24 or 2001:db8::/32, or an address"
                    ),
                ),
            }
        }
        nets
    }

    fn port(&mut self, at: &str, port: i64) -> Option<u16> {
        if (1..=65535).contains(&port) {
            Some(port as u16)
        } else {
            self.error(at, format!("port {port} is out of range 1-65535"));
            None
        }
    }
}

/// "IPv4" or "IPv6".
fn family(address: IpAddr) -> &'static str {
    if address.is_ipv6() { "IPv6" } else { "IPv4" }
}

/// "500ms", "30s", "5m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 30s, 5m or 1h"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        "" => return Err(format!("`{text}` needs a unit: {text}s, {text}ms, ...")),
        _ => {
            return Err(format!(
                "`{text}` is not a duration like 500ms, 30s, 5m or 1h"
            ));
        }
    })
}

/// A duration as the config writes it.
pub fn show(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.is_zero() {
        format!("{}ms", d.as_millis())
    } else if d.as_secs().is_multiple_of(86_400) {
        format!("{}d", d.as_secs() / 86_400)
    } else if d.as_secs().is_multiple_of(3600) {
        format!("{}h", d.as_secs() / 3600)
    } else {
        format!("{}s", d.as_secs())
    }
}

fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

// ---------------------------------------------------------------------------------------------
// Where each value stands in the file.

/// Line and column (1-based) of every node, by path: `listeners[0].port`, `settings`, `` (root).
struct Positions(HashMap<String, (usize, usize)>);

impl Positions {
    fn index(text: &str) -> Self {
        let mut indexer = Indexer::default();
        // A syntax error was already reported by serde; a partial index is all we need here.
        let _ = Parser::new_from_str(text).load(&mut indexer, false);
        Positions(indexer.positions)
    }

    /// The position of `path`, or of its nearest ancestor that exists in the file.
    fn get(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some(p) = self.0.get(path) {
                return Some(*p);
            }
            if path.is_empty() {
                return None;
            }
            path = &path[..path.rfind(['.', '[']).unwrap_or(0)];
        }
    }
}

#[derive(Default)]
struct Indexer {
    positions: HashMap<String, (usize, usize)>,
    /// Open collections: the path of each, and for a mapping whether a key is expected next,
    /// for a sequence the index of the next item.
    stack: Vec<Frame>,
    /// The key just read, waiting for its value.
    key: Option<String>,
}

enum Frame {
    Mapping { path: String, expect_key: bool },
    Sequence { path: String, next: usize },
}

impl Indexer {
    /// The path of the node that starts now, and advances the parent's state past it.
    fn child_path(&mut self) -> String {
        match self.stack.last_mut() {
            None => String::new(),
            Some(Frame::Mapping { path, expect_key }) => {
                *expect_key = true;
                let key = self.key.take().unwrap_or_default();
                if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                }
            }
            Some(Frame::Sequence { path, next }) => {
                *next += 1;
                format!("{path}[{}]", *next - 1)
            }
        }
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let position = (mark.line(), mark.col() + 1);
        match event {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Mapping { expect_key, .. }) = self.stack.last_mut()
                    && *expect_key
                {
                    *expect_key = false;
                    self.key = Some(value);
                    return;
                }
                let path = self.child_path();
                self.positions.insert(path, position);
            }
            Event::MappingStart(..) => {
                let path = self.child_path();
                self.positions.insert(path.clone(), position);
                self.stack.push(Frame::Mapping {
                    path,
                    expect_key: true,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.child_path();
                self.positions.insert(path.clone(), position);
                self.stack.push(Frame::Sequence { path, next: 0 });
            }
            Event::Alias(_) => {
                let path = self.child_path();
                self.positions.insert(path, position);
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
