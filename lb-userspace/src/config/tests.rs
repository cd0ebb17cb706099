use super::*;

const VALID: &str = "\
listeners:
  - name: web
    address: 203.0.113.10
    port: 80
    protocol: tcp
    target_group: web
target_groups:
  - name: web
    forwarding: dsr
    algorithm: maglev
    targets:
      - address: 198.51.100.11
        port: 80
      - address: 198.51.100.12
        port: 80
        weight: 3
";

fn errors(text: &str) -> Vec<String> {
    match parse(Path::new("lb.yaml"), text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

/// Asserts that `text` is refused with exactly one error, at `line:column`, containing `message`.
#[track_caller]
fn refused(text: &str, line: usize, column: usize, message: &str) {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let want = format!("lb.yaml:{line}:{column}: ");
    assert!(
        errors[0].starts_with(&want) && errors[0].contains(message),
        "got {:?}, want {want}...{message}",
        errors[0]
    );
}

#[test]
fn valid_config_parses_with_defaults() {
    let config = parse(Path::new("lb.yaml"), VALID).unwrap();
    assert_eq!(config.listeners.len(), 1);
    let l = &config.listeners[0];
    assert_eq!(
        (l.address, l.port, l.protocol),
        (IpAddr::from([203, 0, 113, 10]), 80, Protocol::Tcp)
    );
    let g = &config.target_groups[0];
    assert_eq!(g.forwarding, Forwarding::Dsr);
    assert_eq!(g.targets[0].weight, 1);
    assert_eq!(g.targets[1].weight, 3);
    assert_eq!(config.settings.maglev_table_size, DEFAULT_MAGLEV_TABLE_SIZE);
    assert_eq!(config.summary(), "1 listener, 1 target group, 2 targets");
}

#[test]
fn forwarding_and_algorithm_default_to_dsr_and_maglev() {
    let text = VALID
        .replace("    forwarding: dsr\n", "")
        .replace("    algorithm: maglev\n", "");
    let config = parse(Path::new("lb.yaml"), &text).unwrap();
    assert_eq!(config.target_groups[0].forwarding, Forwarding::Dsr);
    assert_eq!(config.target_groups[0].algorithm, Algorithm::Maglev);
}

#[test]
fn unknown_key() {
    refused(
        &VALID.replace("    port: 80\n    protocol", "    prot: 80\n    protocol"),
        4,
        5,
        "unknown field `prot`",
    );
}

#[test]
fn wrong_type() {
    refused(
        &VALID.replace("port: 80\n    protocol", "port: eighty\n    protocol"),
        4,
        11,
        "invalid type",
    );
}

#[test]
fn unknown_protocol() {
    refused(
        &VALID.replace("protocol: tcp", "protocol: sctp"),
        5,
        15,
        "unknown variant `sctp`",
    );
}

#[test]
fn unknown_forwarding_mode() {
    refused(
        &VALID.replace("forwarding: dsr", "forwarding: snat"),
        9,
        17,
        "unknown variant `snat`, expected one of `dsr`, `ipip`, `nat`",
    );
}

#[test]
fn unknown_algorithm() {
    refused(
        &VALID.replace("algorithm: maglev", "algorithm: fastest"),
        10,
        16,
        "unknown variant `fastest`, expected one of `maglev`, `source_ip`, `round_robin`, `least_connections`",
    );
}

fn with_stickiness(stickiness: &str) -> String {
    VALID.replace(
        "    algorithm: maglev\n",
        &format!("    algorithm: least_connections\n    stickiness: {stickiness}\n"),
    )
}

#[test]
fn stickiness_takes_a_duration_from_1s_to_7d() {
    let config = parse(
        Path::new("lb.yaml"),
        &with_stickiness("{type: source_ip, duration: 7d}"),
    )
    .unwrap();
    let g = &config.target_groups[0];
    assert_eq!(g.algorithm, Algorithm::LeastConnections);
    assert_eq!(g.stickiness, Some(Duration::from_secs(7 * 86_400)));
    let default = parse(Path::new("lb.yaml"), &with_stickiness("{type: source_ip}")).unwrap();
    assert_eq!(
        default.target_groups[0].stickiness,
        Some(DEFAULT_STICKINESS_DURATION)
    );
    let none = parse(Path::new("lb.yaml"), VALID).unwrap();
    assert_eq!(none.target_groups[0].stickiness, None);
}

#[test]
fn bad_stickiness() {
    refused(
        &with_stickiness("{type: cookie, duration: 1h}"),
        11,
        24,
        "unknown variant `cookie`, expected `source_ip`",
    );
    refused(
        &with_stickiness("{type: source_ip, duration: 8d}"),
        11,
        45,
        "stickiness duration 8d must be between 1s and 7d",
    );
    refused(
        &with_stickiness("{type: source_ip, duration: 500ms}"),
        11,
        45,
        "stickiness duration 500ms must be between 1s and 7d",
    );
    refused(
        &with_stickiness("{type: source_ip, duration: soon}"),
        11,
        45,
        "is not a duration",
    );
    refused(
        &with_stickiness("{type: source_ip, for: 1h}"),
        11,
        35,
        "unknown field `for`",
    );
}

#[test]
fn yaml_syntax_error() {
    let errors = errors("listeners:\n  - name: [web\n");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("lb.yaml:"), "{errors:?}");
}

#[test]
fn bad_address() {
    refused(
        &VALID.replace("203.0.113.10", "203.0.113.300"),
        3,
        14,
        "`203.0.113.300` is not an IP address",
    );
    refused(
        &VALID.replace("203.0.113.10", "0.0.0.0"),
        3,
        14,
        "must be a unicast address",
    );
    refused(
        &VALID.replace("203.0.113.10", "127.0.0.2"),
        3,
        14,
        "VIP 127.0.0.2 cannot be used: it is a loopback address",
    );
    refused(
        &VALID.replace("203.0.113.10", "169.254.1.1"),
        3,
        14,
        "VIP 169.254.1.1 cannot be used: it is link-local",
    );
}

/// Targets named by IPv6 address: global unicast only. dsr takes them for VIPs of either
/// family; ipip for both (IPv4-in-IPv6, ip6ip6), but an IPv6 VIP needs them (no IPv6 in IPv4);
/// nat keeps the family.
#[test]
fn ipv6_targets() {
    let v6_targets = VALID
        .replace("198.51.100.11", "'2001:db8:1::11'")
        .replace("198.51.100.12", "'2001:db8:1::12'");
    let config = parse(Path::new("lb.yaml"), &v6_targets).unwrap();
    assert_eq!(
        config.target_groups[0].targets[0].endpoint().to_string(),
        "[2001:db8:1::11]:80"
    );
    for (address, why) in [
        ("fe80::11", "it is link-local (fe80::/10)"),
        ("::1", "it must be a unicast address"),
        ("ff02::1", "it must be a unicast address"),
        ("::ffff:198.51.100.11", "it is an IPv4-mapped address"),
    ] {
        refused(
            &VALID.replace("198.51.100.11", &format!("'{address}'")),
            12,
            18,
            &format!(
                "target address {} cannot be used: {why}",
                address.parse::<IpAddr>().unwrap()
            ),
        );
    }
    let mode = |text: &str, forwarding: &str| text.replace("forwarding: dsr", forwarding);
    let v6_vip = |text: &str| text.replace("203.0.113.10", "'2001:db8::10'");
    for text in [
        v6_targets.clone(),
        v6_vip(&v6_targets),
        v6_vip(VALID),
        mode(&v6_targets, "forwarding: ipip"),
        mode(&v6_vip(&v6_targets), "forwarding: ipip"),
        mode(VALID, "forwarding: ipip"),
    ] {
        assert!(parse(Path::new("lb.yaml"), &text).is_ok(), "{text}");
    }
    refused(
        &mode(&v6_vip(VALID), "forwarding: ipip"),
        6,
        19,
        "listener `web` has an IPv6 VIP, and target 198.51.100.11:80 of its group `web` (ipip) is IPv4: ipip carries an IPv6 packet in IPv6 only",
    );
    refused(
        &mode(&v6_targets, "forwarding: nat"),
        6,
        19,
        "listener `web` has an IPv4 VIP, and target [2001:db8:1::11]:80 of its group `web` (nat) is IPv6: nat keeps the address family (no NAT64)",
    );
}

/// An IPv6 VIP: global unicast only, in any mode (nat with IPv6 targets), with the clients'
/// prefixes of its family; a dual-stack service is two listeners on one group.
#[test]
fn ipv6_vips() {
    let v6 = |vip: &str| VALID.replace("203.0.113.10", &format!("'{vip}'"));
    let config = parse(Path::new("lb.yaml"), &v6("2001:db8::10")).unwrap();
    assert_eq!(
        config.listeners[0].address,
        "2001:db8::10".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        config.listeners[0].endpoint().to_string(),
        "[2001:db8::10]:80"
    );
    // An IPv6 listener sizes the IPv6 tables; without one they stay empty.
    assert!(config.settings.ipv6);
    assert!(!parse(Path::new("lb.yaml"), VALID).unwrap().settings.ipv6);
    for (vip, why) in [
        ("fe80::1", "it is link-local (fe80::/10)"),
        ("::1", "it is the loopback address"),
        ("ff02::1", "it must be a unicast address"),
        ("::", "it must be a unicast address"),
        ("::ffff:203.0.113.10", "it is an IPv4-mapped address"),
    ] {
        refused(
            &v6(vip),
            3,
            14,
            &format!(
                "VIP {} cannot be used: {why}",
                vip.parse::<IpAddr>().unwrap()
            ),
        );
    }
    refused(
        &v6("fe80::1%eth0"),
        3,
        14,
        "VIP `fe80::1%eth0` is scoped to one interface",
    );
    // nat, with targets of the VIP's family.
    let nat6 = parse(
        Path::new("lb.yaml"),
        &v6("2001:db8::10")
            .replace("forwarding: dsr", "forwarding: nat")
            .replace("198.51.100.1", "2001:db8:1::1"),
    )
    .unwrap();
    assert_eq!(nat6.nat_families(), [false, true]);
    refused(
        &v6("2001:db8::10").replace("forwarding: dsr", "forwarding: nat"),
        6,
        19,
        "listener `web` has an IPv6 VIP, and target 198.51.100.11:80 of its group `web` (nat) is IPv4: nat keeps the address family (no NAT64)",
    );
    // Port translation, as for IPv4 VIPs.
    let translated = parse(
        Path::new("lb.yaml"),
        &v6("2001:db8::10").replace(
            "        port: 80\n      - address: 198.51.100.12",
            "        port: 8080\n      - address: 198.51.100.12",
        ),
    )
    .unwrap();
    assert_eq!(translated.target_groups[0].targets[0].port, 8080);
    let allowing = |list: &str| {
        v6("2001:db8::10").replace(
            "    target_group: web\n",
            &format!("    target_group: web\n    allowed_sources: {list}\n"),
        )
    };
    assert!(
        parse(
            Path::new("lb.yaml"),
            &allowing("[2001:db8:1::/48, 2001:db8:2::7]")
        )
        .is_ok()
    );
    refused(
        &allowing("[2001:db8::1/32]"),
        7,
        23,
        "has bits set past its prefix length: write 2001:db8::/32",
    );
    refused(
        &allowing("[198.51.100.0/24]"),
        7,
        23,
        "`198.51.100.0/24` is IPv4, but listener `web` has an IPv6 VIP",
    );
    // Dual stack: an IPv4 and an IPv6 listener on one group.
    let dual = VALID.replace(
        "target_groups:",
        "  - {name: web6, address: '2001:db8::10', port: 80, protocol: tcp, target_group: web}\ntarget_groups:",
    );
    let config = parse(Path::new("lb.yaml"), &dual).unwrap();
    assert_eq!(config.listeners.len(), 2);
    // The deny-list takes both families.
    let denying = VALID.replace(
        "listeners:",
        "denied_sources: [192.0.2.0/24, '2001:db8:bad::/48']\nlisteners:",
    );
    assert_eq!(
        parse(Path::new("lb.yaml"), &denying)
            .unwrap()
            .denied_sources
            .len(),
        2
    );
}

#[test]
fn port_out_of_range() {
    refused(
        &VALID.replace("port: 80\n    protocol", "port: 0\n    protocol"),
        4,
        11,
        "port 0 is out of range",
    );
    let text = VALID.replace("port: 80\n    protocol", "port: 70000\n    protocol");
    // The listener port and every target port (which now differs) are reported.
    let errors = errors(&text);
    assert!(
        errors[0].starts_with("lb.yaml:4:11: port 70000 is out of range"),
        "{errors:?}"
    );
}

/// The L4 switch's example: two VIPs' ports translated to high target ports, real server 2 in
/// both groups, group 2 taking its port from the group.
const L4_SWITCH: &str = "\
listeners:
  - {name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: g1}
  - {name: game, address: 203.0.113.20, port: 6800, protocol: tcp_udp, target_group: g2}
target_groups:
  - name: g1
    targets:
      - {address: 198.51.100.11, port: 30080}
      - {address: 198.51.100.12, port: 30080}
  - name: g2
    forwarding: ipip
    port: 18600
    targets:
      - {address: 198.51.100.12}
      - {address: 198.51.100.13, port: 18601}
";

#[test]
fn target_ports_may_differ_and_default_to_the_groups() {
    let config = parse(Path::new("lb.yaml"), L4_SWITCH).unwrap();
    let ports = |g: usize| -> Vec<u16> {
        config.target_groups[g]
            .targets
            .iter()
            .map(|t| t.port)
            .collect()
    };
    assert_eq!(ports(0), [30080, 30080]);
    assert_eq!(ports(1), [18600, 18601]);
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn a_target_needs_a_port_of_its_own_or_its_groups() {
    refused(
        &L4_SWITCH.replace("    port: 18600\n", ""),
        12,
        19,
        "target 198.51.100.12 has no port: give it one, or give target group `g2` a default `port`",
    );
    refused(
        &L4_SWITCH.replace("port: 18600", "port: 0"),
        11,
        11,
        "port 0 is out of range",
    );
}

/// Two game-server processes on one host, at 7001 and 7002, in one group behind :7000.
pub(crate) const ONE_HOST_TWO_PORTS: &str = "\
listeners:
  - {name: game, address: 203.0.113.30, port: 7000, protocol: udp, target_group: game}
target_groups:
  - name: game
    targets:
      - {address: 198.51.100.11, port: 7001}
      - {address: 198.51.100.11, port: 7002}
";

#[test]
fn one_host_may_serve_a_listener_on_several_ports() {
    assert_eq!(errors(ONE_HOST_TWO_PORTS), Vec::<String>::new());
}

#[test]
fn one_host_cannot_answer_two_listener_ports_of_a_vip_from_one_target_port() {
    // A third listener on the first VIP whose group puts t2 on the port that already answers :80.
    let text = L4_SWITCH.replace(
        "target_groups:",
        "  - {name: alt, address: 203.0.113.10, port: 8080, protocol: tcp, target_group: alt}\n\
         target_groups:\n  - name: alt\n    targets:\n      - {address: 198.51.100.12, port: 30080}",
    );
    refused(
        &text,
        8,
        40,
        "target 198.51.100.12:30080/tcp serves listeners `web` (203.0.113.10:80) and `alt` (203.0.113.10:8080)",
    );
    // Another VIP, or another protocol, or another port on the same host is fine.
    for (from, to) in [
        (
            "address: 203.0.113.10, port: 8080",
            "address: 203.0.113.11, port: 8080",
        ),
        ("port: 8080, protocol: tcp", "port: 8080, protocol: udp"),
        ("198.51.100.12, port: 30080}", "198.51.100.12, port: 30081}"),
    ] {
        let fine = text.replacen(from, to, 1);
        assert_eq!(errors(&fine), Vec::<String>::new(), "{fine}");
    }
}

#[test]
fn duplicate_names() {
    let text = format!(
        "{VALID}  - name: web\n    targets:\n      - {{address: 198.51.100.13, port: 80}}\n"
    );
    refused(&text, 17, 11, "duplicate target group name `web`");
    let text = VALID.replace(
        "target_groups:",
        "  - {name: web, address: 203.0.113.11, port: 80, protocol: tcp, target_group: web}\ntarget_groups:",
    );
    refused(&text, 7, 12, "duplicate listener name `web`");
}

#[test]
fn same_vip_port_and_protocol_twice() {
    let text = VALID.replace(
        "target_groups:",
        "  - {name: other, address: 203.0.113.10, port: 80, protocol: tcp_udp, target_group: web}\ntarget_groups:",
    );
    refused(
        &text,
        7,
        48,
        "203.0.113.10:80/tcp already taken by listener `web`",
    );
}

#[test]
fn unknown_target_group() {
    refused(
        &VALID.replace("target_group: web", "target_group: api"),
        6,
        19,
        "unknown target group `api` (defined: web)",
    );
}

#[test]
fn an_empty_group_is_a_warning() {
    let text = format!("{VALID}  - name: spare\n    targets: []\n");
    let config = parse(Path::new("lb.yaml"), &text).unwrap();
    let warnings: Vec<String> = config.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        warnings,
        [
            "lb.yaml:17:11: target group `spare` has no targets: its listeners drop their traffic (counted as no_target)"
        ]
    );
}

#[test]
fn duplicate_target() {
    let text = VALID.replace("198.51.100.12", "198.51.100.11");
    refused(&text, 14, 18, "target 198.51.100.11:80 appears twice");
}

#[test]
fn bad_weight() {
    refused(
        &VALID.replace("weight: 3", "weight: 0"),
        16,
        17,
        "weight 0 must be between 1 and 1000",
    );
}

#[test]
fn bad_names() {
    refused(
        &VALID.replace("name: web\n    address", "name: \"web api\"\n    address"),
        2,
        11,
        "listener name `web api`",
    );
}

#[test]
fn no_listeners_or_groups() {
    let errors = errors("listeners: []\ntarget_groups: []\n");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("no listeners")));
    assert!(errors.iter().any(|e| e.contains("no target groups")));
}

#[test]
fn settings_are_checked() {
    let with = |s: &str| format!("settings:\n  {s}\n{VALID}");
    refused(&with("maglev_table_size: 65536"), 2, 22, "must be a prime");
    refused(&with("hash_seed: -1"), 2, 14, "hash_seed -1");
    refused(
        &with("connection_table_size: 10"),
        2,
        26,
        "connection_table_size 10",
    );
    refused(&with("max_target_groups: 0"), 2, 22, "max_target_groups 0");
    refused(
        &with("maglev_table_size: 7"),
        14,
        7,
        "must be at least 10 times",
    );
    let config = parse(Path::new("lb.yaml"), &with("maglev_table_size: 251")).unwrap();
    assert_eq!(config.settings.maglev_table_size, 251);
}

#[test]
fn every_problem_is_reported_in_file_order() {
    let text = VALID
        .replace("203.0.113.10", "nope")
        .replace("target_group: web", "target_group: api")
        .replace("weight: 3", "weight: 5000");
    let errors = errors(&text);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].starts_with("lb.yaml:3:"));
    assert!(errors[1].starts_with("lb.yaml:6:"));
    assert!(errors[2].starts_with("lb.yaml:16:"));
}

#[test]
fn positions_follow_paths() {
    let p = Positions::index(VALID);
    assert_eq!(p.get("listeners[0].port"), Some((4, 11)));
    assert_eq!(p.get("target_groups[0].targets[1].weight"), Some((16, 17)));
    // A missing node falls back to its nearest ancestor.
    assert_eq!(
        p.get("target_groups[0].targets[1].nothing"),
        p.get("target_groups[0].targets[1]")
    );
}

fn with_check(check: &str) -> String {
    VALID.replace(
        "    algorithm: maglev\n",
        &format!("    algorithm: maglev\n    health_check: {{{check}}}\n"),
    )
}

#[test]
fn health_check_defaults_follow_nlb() {
    let config = parse(Path::new("lb.yaml"), VALID).unwrap();
    let group = &config.target_groups[0];
    assert_eq!(group.health_check, HealthCheck::default());
    assert_eq!(group.deregistration_delay, DEFAULT_DEREGISTRATION_DELAY);
    assert_eq!(
        config.listeners[0].idle_timeout(lb_common::PROTO_TCP),
        Duration::from_secs(350)
    );
    assert_eq!(
        config.listeners[0].idle_timeout(lb_common::PROTO_UDP),
        Duration::from_secs(120)
    );
    // A short interval brings the default timeout down with it.
    let config = parse(Path::new("lb.yaml"), &with_check("interval: 4s")).unwrap();
    assert_eq!(
        config.target_groups[0].health_check.timeout,
        Duration::from_secs(2)
    );
}

#[test]
fn health_check_values_are_checked() {
    let config = parse(
        Path::new("lb.yaml"),
        &with_check("protocol: https, port: 8443, path: /ready, matcher: \"200,204\", interval: 5s, timeout: 2s, healthy_threshold: 3, unhealthy_threshold: 4"),
    )
    .unwrap();
    let check = &config.target_groups[0].health_check;
    assert_eq!(
        (check.protocol, check.port, check.path.as_str()),
        (CheckProtocol::Https, Some(8443), "/ready")
    );
    assert!(check.matcher.matches(204) && !check.matcher.matches(201));
    assert_eq!((check.healthy_threshold, check.unhealthy_threshold), (3, 4));

    refused(
        &with_check("interval: 5s, timeout: 5s"),
        11,
        43,
        "timeout (5s) must be shorter than interval (5s)",
    );
    refused(
        &with_check("interval: 500s"),
        11,
        30,
        "interval 500s must be between 1s and 300s",
    );
    refused(&with_check("interval: 30"), 11, 30, "`30` needs a unit");
    refused(
        &with_check("healthy_threshold: 1"),
        11,
        39,
        "healthy_threshold 1 must be between 2 and 10",
    );
    refused(
        &with_check("protocol: tcp, path: /x"),
        11,
        41,
        "path applies to http and https health checks only",
    );
    refused(
        &with_check("protocol: http, matcher: \"2xx\""),
        11,
        45,
        "matcher: `2xx` is not an HTTP status code",
    );
    refused(
        &with_check("port: web"),
        11,
        26,
        "health check port must be `traffic-port` or a number",
    );
    refused(
        &with_check("protocol: udp"),
        11,
        30,
        "unknown variant `udp`",
    );
}

#[test]
fn lifecycle_durations_are_checked() {
    let text = VALID.replace(
        "    algorithm: maglev\n",
        "    algorithm: maglev\n    deregistration_delay: 2h\n",
    );
    refused(
        &text,
        11,
        27,
        "deregistration_delay 2h must be between 0ms and 1h",
    );
    let text = VALID.replace(
        "    target_group: web\n",
        "    target_group: web\n    idle_timeout: 10m\n",
    );
    let config = parse(Path::new("lb.yaml"), &text).unwrap();
    assert_eq!(
        config.listeners[0].idle_timeout(lb_common::PROTO_UDP),
        Duration::from_secs(600)
    );
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert!(parse_duration("1.5s").is_err() && parse_duration("s").is_err());
}

#[test]
fn stickiness_table_size_is_bounded() {
    let text = format!("settings:\n  stickiness_table_size: 100\n{VALID}");
    refused(
        &text,
        2,
        26,
        "stickiness_table_size 100 must be between 1024 and 10000000",
    );
}

#[test]
fn source_lists_take_prefixes_and_addresses() {
    let text = format!(
        "denied_sources: [192.0.2.128/25]\n{}",
        VALID.replace(
            "    target_group: web\n",
            "    target_group: web\n    allowed_sources: [198.51.100.0/24, 192.0.2.7]\n"
        )
    );
    let config = parse(Path::new("lb.yaml"), &text).unwrap();
    let allowed: Vec<String> = config.listeners[0]
        .allowed_sources
        .iter()
        .flatten()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(allowed, ["198.51.100.0/24", "192.0.2.7/32"]);
    assert_eq!(config.denied_sources[0].to_string(), "192.0.2.128/25");
    assert_eq!(
        parse(Path::new("lb.yaml"), VALID).unwrap().listeners[0].allowed_sources,
        None
    );
}

#[test]
fn bad_source_lists() {
    let with = |list: &str| {
        VALID.replace(
            "    target_group: web\n",
            &format!("    target_group: web\n    allowed_sources: {list}\n"),
        )
    };
    refused(
        &with("[198.51.100.1/24]"),
        7,
        23,
        "`198.51.100.1/24` has bits set past its prefix length: write 198.51.100.0/24",
    );
    refused(&with("[198.51.100.0/33]"), 7, 23, "is not a prefix like");
    refused(
        &with("[2001:db8::/32]"),
        7,
        23,
        "`2001:db8::/32` is IPv6, but listener `web` has an IPv4 VIP: its clients never come from there",
    );
    refused(
        &with("[]"),
        7,
        22,
        "allowed_sources is empty, which would refuse everyone",
    );
    refused(
        &format!("denied_sources: [everyone]\n{VALID}"),
        1,
        18,
        "`everyone` is not a prefix",
    );
}

#[test]
fn rate_limits_on_new_flows() {
    let with = |limits: &str| {
        VALID.replace(
            "    target_group: web\n",
            &format!("    target_group: web\n{limits}"),
        )
    };
    let config = parse(
        Path::new("lb.yaml"),
        &with("    max_new_flows_per_second: 5000\n    max_new_flows_per_second_per_source: 20\n"),
    )
    .unwrap();
    let l = &config.listeners[0];
    assert_eq!(
        (
            l.max_new_flows_per_second,
            l.max_new_flows_per_second_per_source
        ),
        (Some(5000), Some(20))
    );
    let plain = parse(Path::new("lb.yaml"), VALID).unwrap();
    assert_eq!(plain.listeners[0].max_new_flows_per_second, None);
    assert_eq!(plain.settings.rate_limited_sources, 65_536);
    refused(
        &with("    max_new_flows_per_second: 0\n"),
        7,
        31,
        "max_new_flows_per_second 0 must be between 1 and 100000000 (leave it out for no limit)",
    );
    refused(
        &with("    max_new_flows_per_second_per_source: 100000001\n"),
        7,
        42,
        "max_new_flows_per_second_per_source 100000001 must be between 1 and 100000000",
    );
    refused(
        &with("    max_new_flows_per_second: lots\n"),
        7,
        31,
        "max_new_flows_per_second",
    );
    let text = format!("settings:\n  rate_limited_sources: 10\n{VALID}");
    refused(
        &text,
        2,
        25,
        "rate_limited_sources 10 must be between 1024 and 10000000",
    );
}

#[test]
fn answer_ping_is_on_unless_turned_off() {
    assert!(
        parse(Path::new("lb.yaml"), VALID)
            .unwrap()
            .settings
            .answer_ping
    );
    let off = format!("settings:\n  answer_ping: false\n{VALID}");
    assert!(
        !parse(Path::new("lb.yaml"), &off)
            .unwrap()
            .settings
            .answer_ping
    );
    let bad = format!("settings:\n  answer_ping: sometimes\n{VALID}");
    assert_eq!(errors(&bad).len(), 1, "{:?}", errors(&bad));
    assert!(
        errors(&bad)[0].starts_with("lb.yaml:2:"),
        "{:?}",
        errors(&bad)
    );
}

/// Two listeners of one VIP that one host would have to answer from the same target port are
/// refused, in either family, the target named as address:port (an IPv6 one in brackets).
#[test]
fn one_target_port_cannot_answer_for_two_listener_ports() {
    let text = |vip: &str, target: &str| {
        format!(
            "listeners:
  - {{name: web, address: '{vip}', port: 80, protocol: tcp, target_group: web}}
  - {{name: alt, address: '{vip}', port: 8080, protocol: tcp, target_group: web}}
target_groups:
  - name: web
    targets: [{{address: '{target}', port: 30080}}]
"
        )
    };
    refused(
        &text("203.0.113.10", "198.51.100.11"),
        6,
        48,
        "target 198.51.100.11:30080/tcp serves listeners `web` (203.0.113.10:80) and `alt` (203.0.113.10:8080)",
    );
    refused(
        &text("2001:db8::10", "2001:db8:1::11"),
        6,
        49,
        "target [2001:db8:1::11]:30080/tcp serves listeners `web` ([2001:db8::10]:80) and `alt` ([2001:db8::10]:8080)",
    );
}
