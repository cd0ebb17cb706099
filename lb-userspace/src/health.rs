//! Health checks with NLB's semantics: target states, threshold counting, HTTP status matchers,
//! and the probes themselves (TCP half-open handshake or connect, HTTP GET, HTTPS GET).
//!
//! The counting is pure (no clock, no I/O) so tests drive it result by result; probes are async,
//! one jittered task per target, and a slow or black-holed target costs only its own timeout.

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use crate::half_open::HalfOpen;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    time::{Instant, timeout},
};

/// A target's state, as NLB names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TargetState {
    /// Registered, not yet judged by enough probes.
    Initial,
    Healthy,
    Unhealthy,
    /// Deregistered: no new flows, existing flows keep it until they end or the delay passes.
    Draining,
    /// Gone: the delay passed.
    Unused,
}

impl TargetState {
    pub const ALL: [TargetState; 5] = [
        Self::Initial,
        Self::Healthy,
        Self::Unhealthy,
        Self::Draining,
        Self::Unused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
            Self::Unused => "unused",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Consecutive probe results of one target and the state they lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    state: TargetState,
    successes: u32,
    failures: u32,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            state: TargetState::Initial,
            successes: 0,
            failures: 0,
        }
    }
}

impl Tracker {
    /// A tracker that starts from a known state (a takeover keeps what the old instance knew).
    pub fn starting_at(state: TargetState) -> Self {
        Tracker {
            state,
            ..Tracker::default()
        }
    }

    pub fn state(&self) -> TargetState {
        self.state
    }

    /// Records one probe result; returns the new state when it changed.
    ///
    /// `healthy_threshold` consecutive successes make a target healthy, `unhealthy_threshold`
    /// consecutive failures unhealthy, from any state (initial included).
    pub fn record(
        &mut self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<TargetState> {
        let next = if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.successes >= healthy_threshold).then_some(TargetState::Healthy)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.failures >= unhealthy_threshold).then_some(TargetState::Unhealthy)
        };
        match next {
            Some(state) if state != self.state => {
                self.state = state;
                Some(state)
            }
            _ => None,
        }
    }
}

/// HTTP status codes that count as healthy: "200", "200,202", "200-299", "200-299,302".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher(Vec<(u16, u16)>);

impl Matcher {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let (low, high) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let code = |s: &str| -> Result<u16, String> {
                match s.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => Ok(c),
                    _ => Err(format!("`{s}` is not an HTTP status code (100-599)")),
                }
            };
            let (low, high) = (code(low)?, code(high)?);
            if low > high {
                return Err(format!("range `{part}` is backwards"));
            }
            ranges.push((low, high));
        }
        Ok(Matcher(ranges))
    }

    pub fn matches(&self, code: u16) -> bool {
        self.0
            .iter()
            .any(|&(low, high)| (low..=high).contains(&code))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckProtocol {
    Tcp,
    Http,
    Https,
}

/// A target group's health check, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub protocol: CheckProtocol,
    /// `None`: the target's traffic port.
    pub port: Option<u16>,
    pub path: String,
    pub matcher: Matcher,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    /// NLB's defaults for a TCP check.
    fn default() -> Self {
        HealthCheck {
            protocol: CheckProtocol::Tcp,
            port: None,
            path: "/".into(),
            matcher: Matcher(vec![(200, 399)]),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            healthy_threshold: 5,
            unhealthy_threshold: 2,
        }
    }
}

/// One probe's outcome.
#[derive(Debug)]
pub struct ProbeResult<K> {
    /// Shared with the probe task: sending a result allocates nothing.
    pub target: Arc<K>,
    pub ok: bool,
    pub duration: Duration,
    /// Why it failed, for the log.
    pub error: Option<String>,
}

/// What the probe tasks share: the TLS client and, when the process may open a raw socket, the
/// half-open prober for TCP checks. Cheap to clone.
#[derive(Clone)]
pub struct Prober {
    tls: tokio_rustls::TlsConnector,
    /// `None`: TCP checks connect (and reset) instead.
    half_open: Option<HalfOpen>,
}

impl Prober {
    /// Must run inside a tokio runtime. Also returns why TCP checks will connect rather than
    /// send half-open handshakes, if they will.
    pub fn new() -> (Self, Option<std::io::Error>) {
        let (half_open, why_not) = match HalfOpen::open() {
            Ok(h) => (Some(h), None),
            Err(e) => (None, Some(e)),
        };
        (
            Prober {
                tls: tls_connector(),
                half_open,
            },
            why_not,
        )
    }
}

/// Probes `addr` once, within the check's timeout.
pub async fn probe(addr: SocketAddr, check: &HealthCheck, prober: &Prober) -> Result<(), String> {
    let attempt = async {
        if let (CheckProtocol::Tcp, Some(half_open)) = (check.protocol, &prober.half_open)
            && half_open.serves(addr)
        {
            return half_open.probe(addr).await;
        }
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // Close with a reset, as HAProxy's checks do: the target answered, which is all a
        // check asks, and no TIME_WAIT socket is left behind per probe (10,000 a second at
        // 10,000 targets).
        crate::net::reset_on_close(&stream).map_err(|e| format!("setsockopt: {e}"))?;
        match check.protocol {
            CheckProtocol::Tcp => Ok(()),
            CheckProtocol::Http => http_get(stream, addr, check).await,
            CheckProtocol::Https => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let stream = prober
                    .tls
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                http_get(stream, addr, check).await
            }
        }
    };
    match timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    check: &HealthCheck,
) -> Result<(), String> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    // The status line is all we need: "HTTP/1.1 200 OK".
    let mut buf = [0u8; 512];
    let mut len = 0;
    while !buf[..len].windows(2).any(|w| w == b"\r\n") {
        if len == buf.len() {
            return Err("status line too long".into());
        }
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if n == 0 {
            return Err("connection closed before a status line".into());
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| {
            format!(
                "not an HTTP response: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if check.matcher.matches(code) {
        Ok(())
    } else {
        Err(format!("HTTP status {code} does not match"))
    }
}

/// A TLS client for health checks. Like NLB it does not verify the target's certificate: the
/// check asks whether the service answers, not who it is.
fn tls_connector() -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Probes start on ticks of this length. At 10,000 targets the runtime then wakes about 100
/// times a second to send a batch, rather than once or twice per probe: those wake-ups (an
/// `epoll_wait` and a context switch each) were a fifth of the checker's CPU. Intervals are
/// at least 1 s, so this moves a probe by at most 1% of one.
const PROBE_TICK: Duration = Duration::from_millis(10);

/// `deadline`, rounded to the nearest probe tick (so intervals keep their mean).
fn on_tick(deadline: Instant) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let tick = PROBE_TICK.as_nanos();
    let ticks = (deadline.saturating_duration_since(epoch).as_nanos() + tick / 2) / tick;
    epoch + Duration::from_nanos((ticks * tick) as u64)
}

/// Probes one target forever, every `interval` (±10%, first probe at a random point of the
/// first interval so that targets are not probed in lockstep), reporting to `results`.
/// Ends when the receiver is gone; the controller aborts it when the target goes.
pub async fn probe_loop<K>(
    target: Arc<K>,
    addr: SocketAddr,
    check: Arc<HealthCheck>,
    prober: Prober,
    results: mpsc::Sender<ProbeResult<K>>,
) {
    let interval = check.interval.as_secs_f64();
    let first = Instant::now() + Duration::from_secs_f64(interval * fastrand::f64());
    tokio::time::sleep_until(on_tick(first)).await;
    loop {
        let start = Instant::now();
        let outcome = probe(addr, &check, &prober).await;
        let result = ProbeResult {
            target: target.clone(),
            ok: outcome.is_ok(),
            duration: start.elapsed(),
            error: outcome.err(),
        };
        if results.send(result).await.is_err() {
            return;
        }
        let jitter = 0.9 + 0.2 * fastrand::f64();
        tokio::time::sleep_until(on_tick(start + Duration::from_secs_f64(interval * jitter))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_deadlines_round_to_the_nearest_tick() {
        let now = Instant::now();
        let first = on_tick(now);
        for ms in 0..50 {
            let deadline = now + Duration::from_millis(ms);
            let at = on_tick(deadline);
            let off = if at > deadline {
                at - deadline
            } else {
                deadline - at
            };
            assert!(off <= PROBE_TICK / 2, "{ms} ms: moved by {off:?}");
            let since_first = at.saturating_duration_since(first).as_nanos();
            assert_eq!(
                since_first % PROBE_TICK.as_nanos(),
                0,
                "{ms} ms: off the ticks"
            );
        }
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut t = Tracker::default();
        assert_eq!(t.state(), TargetState::Initial);
        // 2 of 3 successes, then a failure: the streak starts over.
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(false, 3, 2), None);
        assert_eq!(t.state(), TargetState::Initial);
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), Some(TargetState::Healthy));
        assert_eq!(
            t.record(true, 3, 2),
            None,
            "no transition to the same state"
        );
        assert_eq!(t.record(false, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), None, "a success resets the failures");
        assert_eq!(t.record(false, 3, 2), None);
        assert_eq!(t.record(false, 3, 2), Some(TargetState::Unhealthy));
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), None);
        assert_eq!(t.record(true, 3, 2), Some(TargetState::Healthy));
    }

    #[test]
    fn initial_targets_can_turn_unhealthy() {
        let mut t = Tracker::default();
        assert_eq!(t.record(false, 5, 2), None);
        assert_eq!(t.record(false, 5, 2), Some(TargetState::Unhealthy));
    }

    #[test]
    fn a_takeover_keeps_the_known_state() {
        let mut t = Tracker::starting_at(TargetState::Healthy);
        assert_eq!(t.record(true, 5, 2), None);
        assert_eq!(t.state(), TargetState::Healthy);
    }

    /// An HTTP server on loopback that answers one request per connection with `status`, or
    /// never answers when `status` is `None`.
    fn http_server(status: Option<u16>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    use std::io::{Read as _, Write as _};
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf);
                    match status {
                        Some(code) => {
                            let _ =
                                write!(stream, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                        }
                        None => std::thread::sleep(Duration::from_secs(5)),
                    }
                });
            }
        });
        addr
    }

    fn http_check(timeout: Duration) -> HealthCheck {
        HealthCheck {
            protocol: CheckProtocol::Http,
            timeout,
            interval: timeout * 2,
            ..HealthCheck::default()
        }
    }

    #[tokio::test]
    async fn http_probes_match_the_status() {
        let (prober, _) = Prober::new();
        let check = http_check(Duration::from_secs(2));
        assert_eq!(probe(http_server(Some(200)), &check, &prober).await, Ok(()));
        assert_eq!(probe(http_server(Some(302)), &check, &prober).await, Ok(()));
        let err = probe(http_server(Some(503)), &check, &prober)
            .await
            .unwrap_err();
        assert_eq!(err, "HTTP status 503 does not match");
    }

    /// A real TLS server (`openssl s_server -www`, self-signed, answers HTTP 200).
    #[tokio::test]
    async fn https_probes_complete_a_tls_handshake() {
        let dir = std::env::temp_dir().join(format!("lb-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=target",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl is installed by cargo xtask setup");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = std::process::Command::new("openssl")
            .args([
                "s_server",
                "-www",
                "-quiet",
                "-accept",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("-key")
            .arg(&key)
            .arg("-cert")
            .arg(&cert)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "openssl s_server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let check = HealthCheck {
            protocol: CheckProtocol::Https,
            timeout: Duration::from_secs(5),
            ..HealthCheck::default()
        };
        let (prober, _) = Prober::new();
        let result = probe(addr, &check, &prober).await;
        let plain = probe(
            addr,
            &HealthCheck {
                protocol: CheckProtocol::Http,
                ..check.clone()
            },
            &prober,
        )
        .await;
        let _ = server.kill();
        let _ = server.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(result, Ok(()));
        assert!(plain.is_err(), "plain HTTP to a TLS port must fail");
    }

    #[tokio::test]
    async fn a_silent_target_costs_only_its_timeout() {
        let check = http_check(Duration::from_millis(300));
        let start = std::time::Instant::now();
        let (prober, _) = Prober::new();
        let err = probe(http_server(None), &check, &prober).await.unwrap_err();
        assert!(err.starts_with("no answer within"), "{err}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn tcp_checks_tell_open_from_closed_ports_both_ways() {
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let check = HealthCheck {
            timeout: Duration::from_secs(2),
            ..HealthCheck::default()
        };
        let (half_open, why_not) = Prober::new();
        assert!(why_not.is_none(), "raw socket (run as root): {why_not:?}");
        let connecting = Prober {
            tls: tls_connector(),
            half_open: None,
        };
        for (prober, refused) in [
            (half_open, "connection refused"),
            (connecting, "connect: Connection refused"),
        ] {
            assert_eq!(
                probe(open.local_addr().unwrap(), &check, &prober).await,
                Ok(())
            );
            let err = probe(closed, &check, &prober).await.unwrap_err();
            assert!(err.starts_with(refused), "{err}");
        }
    }

    #[test]
    fn matchers() {
        let m = Matcher::parse("200-299,302").unwrap();
        assert!(m.matches(200) && m.matches(299) && m.matches(302));
        assert!(!m.matches(300) && !m.matches(404));
        let m = Matcher::parse("200, 202").unwrap();
        assert!(m.matches(202) && !m.matches(201));
        assert!(Matcher::parse("200-399").unwrap().matches(301));
        for bad in ["", "abc", "99", "600", "300-200", "200-", "200,,202"] {
            assert!(Matcher::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
