//! A network-namespace lab for lb: a client, a balancer and targets on one bridge.
//!
//! ```text
//!   client 198.51.100.2 ──┐
//!   lb     198.51.100.3 ──┤ br0 (namespace "sw")
//!   t1..tN 198.51.100.1x ─┘
//! ```
//! The client routes the VIP range 203.0.113.0/24 via the balancer; there is no route out.
//! A two-armed lab ([`Lab::two_armed`]) puts the targets on a private network instead, behind
//! the balancer's second interface:
//!
//! ```text
//!   client 198.51.100.2 ── br0 ── 198.51.100.3 eth0  lb  eth1 192.0.2.3 ── br1 ── t1..tN 192.0.2.1x
//! ```
//! The targets' default route is the balancer; the client has no route to them.
//! Servers and clients run in this process, in threads that entered a namespace (`setns`), so
//! their sockets live there. Everything is removed when the [`Lab`] drops, on failure too.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
    },
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

pub mod frames;

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The lab's IPv6 network ([`Lab::enable_ipv6`]): the client, the balancer, and the VIP.
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 3);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x10);
/// The router in front of the far client ([`Lab::add_far_client`]), and that client.
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 4);
pub const FAR_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const FAR_CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// Name of every namespace's lab interface.
pub const IFACE: &str = "eth0";

/// The balancer's interface on the private network of a two-armed lab.
pub const INTERNAL_IFACE: &str = "eth1";
pub const LB_INTERNAL_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);

/// Target `i`'s IPv6 address ([`Lab::enable_ipv6`]).
pub fn target_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11 + i as u16)
}

/// The first `n` targets, `address(i)` each (quoted if IPv6), serving on `port`, as the YAML
/// flow mappings of a group's `targets: [...]`.
pub fn targets_yaml(n: usize, port: u16, address: impl Fn(usize) -> String) -> String {
    (0..n)
        .map(|i| format!("{{address: {}, port: {port}}}", address(i)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn target_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 11 + i as u8)
}

/// Target `i`'s address in a two-armed lab.
pub fn private_target_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 11 + i as u8)
}

/// The lab's usual config: listener `web` (TCP :80) and listener `game` (UDP :7777) on the VIP,
/// each with a dsr group over the first `targets` targets. `web_check` and `game_check` are the
/// groups' health checks, as YAML flow mappings (`{protocol: tcp, interval: 1s}`).
pub fn lab_config(targets: usize, web_check: &str, game_check: &str) -> String {
    let list = |port: u16| -> String {
        (0..targets)
            .map(|i| format!("      - {{address: {}, port: {port}}}\n", target_addr(i)))
            .collect()
    };
    format!(
        "listeners:
  - {{name: web, address: {VIP}, port: 80, protocol: tcp, target_group: web}}
  - {{name: game, address: {VIP}, port: 7777, protocol: udp, target_group: game}}
target_groups:
  - name: web
    health_check: {web_check}
    targets:
{}  - name: game
    health_check: {game_check}
    targets:
{}",
        list(80),
        list(7777)
    )
}

/// A lab of three targets prepared for dsr, each serving TCP on :80 and UDP on VIP:7777 (replies
/// of 100 bytes), and [`lab_config`] with the given checks written for it.
pub fn serving_lab(name: &str, web_check: &str, game_check: &str) -> Result<(Lab, PathBuf)> {
    let mut lab = Lab::new(name, 3)?;
    lab.prepare_targets("dsr", &[VIP])?;
    lab.start_tcp_servers(80, 100)?;
    lab.start_udp_servers(VIP, 7777, 100)?;
    let config = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(&config, lab_config(lab.targets, web_check, game_check))?;
    Ok((lab, config))
}

/// The health check the lab's tests use: TCP on port 80 every second, two results to decide.
pub const FAST_TCP_CHECK: &str = "{protocol: tcp, port: 80, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}";

/// The `lb` binary under test: `$LB_BIN`, else the release build next to this crate.
pub fn lb_binary() -> PathBuf {
    std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/lb"))
}

/// Runs `f` on a thread that has entered network namespace `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("thread in {netns} panicked"))?
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Routes the lab's VIP range of one family (203.0.113.0/24, or 2001:db8:10::/64) in namespace
/// `ns` through the balancer.
fn route_vips(ns: &str, ipv6: bool) -> Result<String> {
    let (family, vips, lb) = if ipv6 {
        ("-6", "2001:db8:10::/64", LB_ADDR6.to_string())
    } else {
        ("-4", "203.0.113.0/24", LB_ADDR.to_string())
    };
    ip(&["-n", ns, family, "route", "add", vips, "via", &lb])
}

/// Sets `setting` (`key=value`) in namespace `ns`.
fn sysctl(ns: &str, setting: &str) -> Result<String> {
    run(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", setting]))
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// A lab of namespaces named `<prefix>-sw`, `<prefix>-client`, `<prefix>-lb`, `<prefix>-t<i>`.
pub struct Lab {
    prefix: String,
    pub targets: usize,
    namespaces: Vec<String>,
    servers: Vec<Server>,
    /// Per target: the status its TCP servers answer HTTP requests with.
    http_status: Vec<Arc<AtomicU16>>,
    balancers: Vec<Child>,
}

/// A server thread in a target, stoppable on its own.
struct Server {
    target: usize,
    port: u16,
    udp: bool,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Server {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

impl Lab {
    /// Builds the topology with `targets` target hosts.
    pub fn new(prefix: &str, targets: usize) -> Result<Self> {
        Self::build(prefix, targets, false)
    }

    /// Builds the two-armed topology: the targets on a private network that only the balancer
    /// reaches, their default route through it.
    pub fn two_armed(prefix: &str, targets: usize) -> Result<Self> {
        Self::build(prefix, targets, true)
    }

    fn build(prefix: &str, targets: usize, two_armed: bool) -> Result<Self> {
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            targets,
            namespaces: Vec::new(),
            servers: Vec::new(),
            http_status: (0..targets)
                .map(|_| Arc::new(AtomicU16::new(200)))
                .collect(),
            balancers: Vec::new(),
        };
        remove_namespaces(prefix);
        let sw = lab.add_netns("sw")?;
        for bridge in ["br0", "br1"] {
            ip(&["-n", &sw, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", bridge, "up"])?;
        }
        lab.add_host("client", CLIENT_ADDR)?;
        lab.add_host("lb", LB_ADDR)?;
        for i in 0..targets {
            let host = format!("t{}", i + 1);
            if two_armed {
                lab.add_netns(&host)?;
                lab.connect(&host, &host, IFACE, "br1", private_target_addr(i))?;
                let gateway = LB_INTERNAL_ADDR.to_string();
                ip(&[
                    "-n",
                    &lab.ns(&host),
                    "route",
                    "add",
                    "default",
                    "via",
                    &gateway,
                ])?;
            } else {
                lab.add_host(&host, target_addr(i))?;
            }
        }
        if two_armed {
            lab.connect("lb", "lb-int", INTERNAL_IFACE, "br1", LB_INTERNAL_ADDR)?;
            attach_pass_program(&sw, "lb-int")?;
        }
        route_vips(&lab.ns("client"), false)?;
        // veth hands XDP_TX frames to its peer promptly only when the peer runs XDP itself.
        attach_pass_program(&sw, "lb")?;
        Ok(lab)
    }

    /// The full namespace name of lab host `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn target_ns(&self, i: usize) -> String {
        self.ns(&format!("t{}", i + 1))
    }

    fn add_netns(&mut self, host: &str) -> Result<String> {
        let name = self.ns(host);
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    fn add_host(&mut self, host: &str, addr: Ipv4Addr) -> Result<()> {
        self.add_netns(host)?;
        self.connect(host, host, IFACE, "br0", addr)
    }

    /// Connects `host` to `bridge`: interface `dev` with address `addr` in the host, `port` on
    /// the switch.
    fn connect(
        &self,
        host: &str,
        port: &str,
        dev: &str,
        bridge: &str,
        addr: Ipv4Addr,
    ) -> Result<()> {
        let ns = self.ns(host);
        let sw = self.ns("sw");
        ip(&[
            "-n", &sw, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", &ns,
        ])?;
        ip(&["-n", &sw, "link", "set", port, "master", bridge, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        ip(&["-n", &ns, "link", "set", dev, "up"])?;
        // veth leaves TCP/UDP checksums to "hardware" that never computes them; XDP forwards the
        // raw bytes, so frames it sends on would carry a partial checksum. A real NIC fills it in.
        run(Command::new("ip").args(["netns", "exec", &ns, "ethtool", "-K", dev, "tx", "off"]))?;
        Ok(())
    }

    /// Runs the `lb` binary in namespace `host` and returns its output; fails on a non-zero exit.
    pub fn lb(&self, host: &str, args: &[&str]) -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(host)])
            .arg(lb_binary())
            .args(args))
    }

    /// Gives the client `n` more addresses, 198.51.100.100 onwards, on its network (targets
    /// answer them directly), and returns them: clients that source-IP algorithms tell apart.
    pub fn add_client_addresses(&self, n: u8) -> Result<Vec<Ipv4Addr>> {
        (100..100 + n)
            .map(|host| {
                let addr = Ipv4Addr::new(198, 51, 100, host);
                ip(&[
                    "-n",
                    &self.ns("client"),
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    IFACE,
                ])?;
                Ok(addr)
            })
            .collect()
    }

    /// Adds a client network behind a router, both families (IPv6 as [`Lab::enable_ipv6`]
    /// gives the lab): host `far` (`FAR_CLIENT_ADDR`, `FAR_CLIENT_ADDR6`) reaches the lab only
    /// through `rt` (198.51.100.4 and 2001:db8:1::4 on the lab's bridge), which routes the VIP
    /// ranges to the balancer and whose link to `far` has MTU `mtu` on the router's side only.
    /// `far` sees 1500 and announces a TCP MSS to match, so a target's full-size replies reach
    /// the router, which cannot pass them on and answers "fragmentation needed" or "packet too
    /// big" to their source, the VIP: the path MTU black hole of direct server return.
    pub fn add_far_client(&mut self, mtu: u32) -> Result<()> {
        self.enable_ipv6()?;
        self.add_host("rt", ROUTER_ADDR)?;
        let (rt, far) = (self.ns("rt"), self.add_netns("far")?);
        ip(&[
            "-n", &rt, "link", "add", "far0", "type", "veth", "peer", "name", IFACE, "netns", &far,
        ])?;
        let router_side = Ipv4Addr::new(192, 0, 2, 1);
        ip(&["-n", &rt, "link", "set", "far0", "mtu", &mtu.to_string()])?;
        ip(&[
            "-n",
            &rt,
            "addr",
            "add",
            &format!("{router_side}/24"),
            "dev",
            "far0",
        ])?;
        ip(&["-n", &rt, "link", "set", "far0", "up"])?;
        ip(&[
            "-n",
            &far,
            "addr",
            "add",
            &format!("{FAR_CLIENT_ADDR}/24"),
            "dev",
            IFACE,
        ])?;
        ip(&["-n", &far, "link", "set", IFACE, "up"])?;
        ip(&[
            "-n",
            &far,
            "route",
            "add",
            "default",
            "via",
            &router_side.to_string(),
        ])?;
        // As in `connect`: checksums in full, for the frames the balancer forwards raw.
        for (ns, dev) in [(&far, IFACE), (&rt, "far0")] {
            run(Command::new("ip").args(["netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]))?;
        }
        sysctl(&rt, "net.ipv4.ip_forward=1")?;
        route_vips(&rt, false)?;
        // IPv6 alike: 2001:db8:2::/64 behind the router, which the lab knows as 2001:db8:1::4.
        let (router6, router6_far) = ("2001:db8:1::4", "2001:db8:2::1");
        let far6 = FAR_CLIENT_ADDR6.to_string();
        for (ns, addr, dev) in [
            (&rt, router6, IFACE),
            (&rt, router6_far, "far0"),
            (&far, far6.as_str(), IFACE),
        ] {
            ip(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
        }
        ip(&[
            "-n",
            &far,
            "-6",
            "route",
            "add",
            "default",
            "via",
            router6_far,
        ])?;
        sysctl(&rt, "net.ipv6.conf.all.forwarding=1")?;
        route_vips(&rt, true)?;
        for i in 0..self.targets {
            let ns = self.target_ns(i);
            let router = ROUTER_ADDR.to_string();
            ip(&["-n", &ns, "route", "add", "192.0.2.0/24", "via", &router])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "2001:db8:2::/64",
                "via",
                router6,
            ])?;
        }
        Ok(())
    }

    /// Gives the client, the balancer and the targets IPv6 addresses on the lab's network
    /// (2001:db8:1::/64, without duplicate address detection, so that they work at once), and
    /// the client a route to the IPv6 VIPs (2001:db8:10::/64) through the balancer.
    pub fn enable_ipv6(&self) -> Result<()> {
        let hosts = [("client", CLIENT_ADDR6), ("lb", LB_ADDR6)]
            .into_iter()
            .map(|(h, a)| (h.to_owned(), a))
            .chain((0..self.targets).map(|i| (format!("t{}", i + 1), target_addr6(i))));
        for (host, addr) in hosts {
            let ns = self.ns(&host);
            ip(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                IFACE,
                "nodad",
            ])?;
        }
        route_vips(&self.ns("client"), true)?;
        Ok(())
    }

    /// `ping -c count vip` from the client (0.2 s apart, 1 s for each answer): fails unless
    /// every request was answered.
    pub fn ping(&self, vip: impl Into<IpAddr>, count: u32) -> Result<()> {
        let vip = vip.into().to_string();
        let count = count.to_string();
        let said = run(Command::new("ip")
            .args(["netns", "exec", &self.ns("client"), "ping"])
            .args(["-c", &count, "-i", "0.2", "-W", "1", &vip]))?;
        if !said.contains(&format!("{count} received")) {
            bail!("ping {vip}: {said}");
        }
        Ok(())
    }

    /// lb's `/status`, from inside the lab.
    pub fn status(&self) -> Result<lb::metrics::Status> {
        let body = in_netns(&self.ns("lb"), || {
            lb::admin::get("127.0.0.1:9617".parse().unwrap(), "/status")
        })??;
        Ok(serde_json::from_str(&body)?)
    }

    /// Prepares every target with `lb target`.
    pub fn prepare_targets<A: std::fmt::Display>(&self, mode: &str, vips: &[A]) -> Result<()> {
        for i in 0..self.targets {
            let mut args = vec!["target", "-i", IFACE, "--mode", mode];
            let vips: Vec<String> = vips.iter().map(|v| v.to_string()).collect();
            for v in &vips {
                args.extend(["--vip", v]);
            }
            self.lb(&format!("t{}", i + 1), &args)?;
        }
        Ok(())
    }

    /// Where the lab's balancers pin their maps and link: lb's default on the host's BPF
    /// filesystem, a directory for the balancer's network namespace (removed with the lab).
    pub fn pin_dir(&self) -> PathBuf {
        let netns = std::fs::metadata(format!("/var/run/netns/{}", self.ns("lb")))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap_or(0);
        PathBuf::from("/sys/fs/bpf/lb")
            .join(netns.to_string())
            .join(IFACE)
    }

    /// Starts `lb run` in the balancer namespace and waits until it says it forwards.
    ///
    /// It enters only the network namespace (`nsenter --net`): `ip netns exec` would give it a
    /// private mount namespace, whose BPF filesystem, and the pins on it, die with the process,
    /// so a second `lb run` could not take over.
    pub fn start_balancer(&mut self, config: &Path, extra: &[&str]) -> Result<Balancer> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns("lb")))
            .arg(lb_binary())
            .args(["run", "-c"])
            .arg(config)
            .args(["-i", IFACE])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lb run")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.contains("forwarding on");
                    log.push(line);
                    if ready {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    bail!(
                        "lb run did not start (exit {status:?}):\n{}",
                        log.join("\n")
                    );
                }
            }
        }
        let pid = child.id();
        self.balancers.push(child);
        Ok(Balancer {
            pid,
            log,
            mark: 0,
            lines: rx,
        })
    }

    /// A TCP server on port `port` in every target: each reply line is the target's name,
    /// padded to `reply_len` bytes. An HTTP GET gets the target's HTTP status instead.
    pub fn start_tcp_servers(&mut self, port: u16, reply_len: usize) -> Result<()> {
        for i in 0..self.targets {
            self.start_tcp_server(i, port, reply_len)?;
        }
        Ok(())
    }

    /// The TCP server of target `i` (0-based) on `port`.
    pub fn start_tcp_server(&mut self, i: usize, port: u16, reply_len: usize) -> Result<()> {
        let name = format!("t{}", i + 1);
        let listener = in_netns(&self.target_ns(i), move || {
            // Both families: an IPv6 socket on `::` takes IPv4 too.
            TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        })??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let status = self.http_status[i].clone();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let name = name.clone();
                        let status = status.clone();
                        std::thread::spawn(move || serve_tcp(stream, &name, reply_len, &status));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        self.servers.push(Server {
            target: i,
            port,
            udp: false,
            stop,
            thread,
        });
        Ok(())
    }

    /// Stops the TCP server of target `i` on `port`: new connections are refused (established
    /// ones end when their client closes them).
    pub fn stop_tcp_server(&mut self, i: usize, port: u16) {
        self.stop_server(i, port, false);
    }

    /// Stops the UDP server of target `i` on `port`: its host answers with port unreachable.
    pub fn stop_udp_server(&mut self, i: usize, port: u16) {
        self.stop_server(i, port, true);
    }

    fn stop_server(&mut self, i: usize, port: u16, udp: bool) {
        let (stop, keep) = self
            .servers
            .drain(..)
            .partition(|s| s.target == i && s.port == port && s.udp == udp);
        self.servers = keep;
        for server in stop {
            server.stop();
        }
    }

    /// Makes the TCP servers of target `i` answer HTTP requests with `status`.
    pub fn set_http_status(&self, i: usize, status: u16) {
        self.http_status[i].store(status, Ordering::Relaxed);
    }

    /// A UDP server on VIP:`port` in every target (a DSR UDP server must answer from the VIP):
    /// each reply is the target's name, padded to `reply_len` bytes.
    pub fn start_udp_servers(
        &mut self,
        vip: impl Into<IpAddr>,
        port: u16,
        reply_len: usize,
    ) -> Result<()> {
        let vip = vip.into();
        for i in 0..self.targets {
            self.start_udp_server(i, vip, port, reply_len)?;
        }
        Ok(())
    }

    /// The UDP server of target `i` (0-based) on `vip`:`port`.
    pub fn start_udp_server(
        &mut self,
        i: usize,
        vip: impl Into<IpAddr>,
        port: u16,
        reply_len: usize,
    ) -> Result<()> {
        let name = format!("t{}", i + 1);
        let addr = SocketAddr::new(vip.into(), port);
        let socket = in_netns(&self.target_ns(i), move || UdpSocket::bind(addr))??;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let reply = padded(&name, reply_len);
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        self.servers.push(Server {
            target: i,
            port,
            udp: true,
            stop,
            thread,
        });
        Ok(())
    }

    /// Turns `host`'s checksum, segmentation (TSO) and GSO offloads back on: the lab turns them
    /// off everywhere, for frames that XDP forwards raw; a target's own replies need not.
    pub fn enable_offloads(&self, host: &str) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "ethtool", "-K", IFACE])
            .args(["tx", "on", "tso", "on", "gso", "on"]))
        .map(drop)
    }

    /// `ip -j -d -s link show` of `host`'s interface `dev`.
    fn link(&self, host: &str, dev: &str) -> Result<serde_json::Value> {
        let out = ip(&[
            "-n",
            &self.ns(host),
            "-j",
            "-d",
            "-s",
            "link",
            "show",
            "dev",
            dev,
        ])?;
        let mut links: serde_json::Value = serde_json::from_str(&out)?;
        Ok(links[0].take())
    }

    /// Whether an XDP program is attached to `host`'s lab interface.
    pub fn xdp_attached(&self, host: &str) -> Result<bool> {
        Ok(!self.link(host, IFACE)?["xdp"].is_null())
    }

    /// Bytes received so far by `host`'s lab interface.
    pub fn rx_bytes(&self, host: &str) -> Result<u64> {
        self.rx_bytes_on(host, IFACE)
    }

    /// Bytes received so far by `host`'s interface `dev`.
    pub fn rx_bytes_on(&self, host: &str, dev: &str) -> Result<u64> {
        self.link(host, dev)?["stats64"]["rx"]["bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("no rx byte counter for {dev} of {host}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let pins = self.pin_dir();
        for mut child in self.balancers.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for server in self.servers.drain(..) {
            server.stop();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
        // Left only by a balancer that did not shut down (killed, or a failed test).
        if let Some(netns_dir) = pins.parent() {
            let _ = std::fs::remove_dir_all(netns_dir);
        }
    }
}

/// Deletes namespaces left by an earlier run with the same prefix (a killed test).
fn remove_namespaces(prefix: &str) {
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('-'))
            {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
}

/// Attaches lb's XDP_PASS program to `dev` in namespace `netns` (it stays until the namespace goes).
fn attach_pass_program(netns: &str, dev: &str) -> Result<()> {
    let mut ebpf = aya::Ebpf::load(lb::LAB_OBJECT)?;
    let program: &mut aya::programs::Xdp = ebpf
        .program_mut("lb_pass")
        .context("lb_pass missing")?
        .try_into()?;
    program.load()?;
    attach_xdp(netns, dev, program)
}

/// Attaches `program` to `dev` in namespace `netns` through netlink, in native mode: the kernel
/// holds it there until [`detach_xdp`] or the namespace goes, whatever happens to `program`.
pub fn attach_xdp(netns: &str, dev: &str, program: &aya::programs::Xdp) -> Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&program.fd()?.as_fd());
    let dev = dev.to_owned();
    in_netns(netns, move || -> Result<()> {
        let index = lb::net::Interface::lookup(&dev)?.index;
        // SAFETY: the caller's program, and so its fd, outlives this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        lb::xdp::netlink_set_xdp(index, Some(fd), lb::xdp::XDP_FLAGS_DRV_MODE)?;
        Ok(())
    })?
}

/// Detaches whatever XDP program netlink attached to `dev` in namespace `netns`.
pub fn detach_xdp(netns: &str, dev: &str) -> Result<()> {
    let dev = dev.to_owned();
    in_netns(netns, move || -> Result<()> {
        let index = lb::net::Interface::lookup(&dev)?.index;
        lb::xdp::netlink_set_xdp(index, None, lb::xdp::XDP_FLAGS_DRV_MODE)?;
        Ok(())
    })?
}

fn padded(name: &str, len: usize) -> Vec<u8> {
    let mut reply = name.as_bytes().to_vec();
    reply.push(b' ');
    reply.resize(len.max(name.len() + 2) - 1, b'.');
    reply.push(b'\n');
    reply
}

fn serve_tcp(stream: TcpStream, name: &str, reply_len: usize, http_status: &AtomicU16) {
    let reply = padded(name, reply_len);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut lines = BufReader::new(stream).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.starts_with("GET ") {
            // A health check: skip the headers, answer with the status, close.
            for header in lines.by_ref() {
                if header.map_or(true, |h| h.trim().is_empty()) {
                    break;
                }
            }
            let status = http_status.load(Ordering::Relaxed);
            let _ = write!(
                writer,
                "HTTP/1.1 {status} {name}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        if writer.write_all(&reply).is_err() {
            return;
        }
    }
}

/// A running `lb run`.
pub struct Balancer {
    pub pid: u32,
    /// What it printed so far (as far as read).
    pub log: Vec<String>,
    mark: usize,
    lines: mpsc::Receiver<String>,
}

impl Balancer {
    /// Waits until lb has printed, since the last [`Balancer::mark`], a line containing every
    /// one of `parts`; returns it.
    pub fn wait_for_log(&mut self, parts: &[&str], timeout: Duration) -> Result<String> {
        let matches = |line: &str| parts.iter().all(|p| line.contains(p));
        if let Some(line) = self.log[self.mark..].iter().find(|l| matches(l)) {
            return Ok(line.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if matches(&line) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!(
                    "lb did not log {parts:?} within {timeout:?}; its log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits until each of the first `targets` targets of both groups of [`lab_config`] has
    /// passed its health check, each within `timeout`.
    pub fn wait_all_healthy(&mut self, targets: usize, timeout: Duration) -> Result<()> {
        for (group, port) in [("web", 80), ("game", 7777)] {
            for i in 0..targets {
                let target = format!("{}:{port} in {group}", target_addr(i));
                self.wait_for_log(&[&target, "-> healthy"], timeout)?;
            }
        }
        Ok(())
    }

    /// From now on, [`Balancer::wait_for_log`] only looks at lines printed after this call.
    pub fn mark(&mut self) {
        self.log.extend(self.lines.try_iter());
        self.mark = self.log.len();
    }

    /// Sends SIGTERM and returns how it exited and what it printed meanwhile.
    pub fn terminate(&mut self, lab: &mut Lab) -> Result<(std::process::ExitStatus, Vec<String>)> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        self.wait_exit(lab, Duration::from_secs(10))
    }

    /// Waits for the process to exit by itself; returns how, and what it printed meanwhile.
    pub fn wait_exit(
        &mut self,
        lab: &mut Lab,
        timeout: Duration,
    ) -> Result<(std::process::ExitStatus, Vec<String>)> {
        let child = lab
            .balancers
            .iter_mut()
            .find(|c| c.id() == self.pid)
            .ok_or_else(|| anyhow!("not a balancer of this lab"))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("lb (pid {}) did not exit within {timeout:?}", self.pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF: everything printed is in the channel now.
        let lines: Vec<String> = self.lines.iter().collect();
        self.log.extend(lines.iter().cloned());
        Ok((status, lines))
    }
}

/// Counted UDP datagrams from the client on several flows, each answered by a target: what
/// the stream sent and what came back tells how many were lost.
pub struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    received: Arc<std::sync::atomic::AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpStream {
    /// Starts `flows` flows to `vip:port`, each sending one datagram every `every`.
    pub fn start(
        lab: &Lab,
        vip: Ipv4Addr,
        port: u16,
        flows: usize,
        every: Duration,
    ) -> Result<Self> {
        let stream = UdpStream {
            stop: Arc::new(AtomicBool::new(false)),
            sent: Default::default(),
            received: Default::default(),
            threads: Vec::new(),
        };
        let mut threads = Vec::new();
        for _ in 0..flows {
            let socket = in_netns(&lab.ns("client"), move || -> std::io::Result<UdpSocket> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(SocketAddrV4::new(vip, port))?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                Ok(s)
            })??;
            let receiver = socket.try_clone()?;
            let (stop, sent, received) = (
                stream.stop.clone(),
                stream.sent.clone(),
                stream.received.clone(),
            );
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if socket.send(b"datagram").is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(every);
                }
            }));
            let stop = stream.stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                loop {
                    match receiver.recv(&mut buf) {
                        Ok(_) => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        // Nothing for 200 ms after the senders stopped: all replies are in.
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => {}
                    }
                }
            }));
        }
        Ok(UdpStream { threads, ..stream })
    }

    /// Stops the stream; returns (sent, received).
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// The name of the target that sent a reply: its first word.
fn answered_by(reply: &str) -> String {
    reply
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Flows per target: for each flow, the target that answered its first request.
pub fn share(answers: &[Answers]) -> std::collections::BTreeMap<String, usize> {
    let mut share = std::collections::BTreeMap::new();
    for a in answers {
        *share.entry(a[0].clone()).or_default() += 1;
    }
    share
}

/// Which target answered, per request of one connection or flow.
pub type Answers = Vec<String>;

/// Opens `connections` TCP connections to `vip:port` from the client, each sending `requests`
/// lines; returns the names that answered on each, and the reply bytes received.
pub fn tcp_clients(
    lab: &Lab,
    vip: impl Into<IpAddr>,
    port: u16,
    connections: usize,
    requests: usize,
) -> Result<(Vec<Answers>, u64)> {
    let addr = SocketAddr::new(vip.into(), port);
    in_netns(&lab.ns("client"), move || -> Result<(Vec<Answers>, u64)> {
        let mut all = Vec::new();
        let mut bytes = 0;
        for c in 0..connections {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .with_context(|| format!("connection {c} to {addr}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut writer = stream.try_clone()?;
            let mut reader = BufReader::new(stream);
            let mut answers = Vec::new();
            for r in 0..requests {
                writeln!(writer, "request {r}")?;
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .with_context(|| format!("reply {r} on connection {c}"))?;
                bytes += line.len() as u64;
                answers.push(answered_by(&line));
            }
            all.push(answers);
        }
        Ok((all, bytes))
    })?
}

/// Sends `requests` datagrams on each of `flows` UDP flows (one socket, so one source port,
/// each) and returns who answered each; a lost reply is retried a few times, then is an error.
pub fn udp_clients(
    lab: &Lab,
    vip: impl Into<IpAddr>,
    port: u16,
    flows: usize,
    requests: usize,
) -> Result<(Vec<Answers>, u64)> {
    let addr = SocketAddr::new(vip.into(), port);
    let any: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    in_netns(&lab.ns("client"), move || -> Result<(Vec<Answers>, u64)> {
        let mut all = Vec::new();
        // Every flow keeps its socket until all are done, so that no two flows share a source
        // port (the kernel may hand a closed socket's port to the next one).
        let mut sockets = Vec::new();
        let mut bytes = 0;
        let mut buf = [0u8; 4096];
        for f in 0..flows {
            let socket = UdpSocket::bind(any)?;
            socket.connect(addr)?;
            socket.set_read_timeout(Some(Duration::from_millis(500)))?;
            let mut answers = Vec::new();
            for r in 0..requests {
                let mut attempts = 0;
                let n = loop {
                    socket.send(format!("request {r}").as_bytes())?;
                    match socket.recv(&mut buf) {
                        Ok(n) => break n,
                        Err(_) if attempts < 5 => attempts += 1,
                        Err(e) => {
                            return Err(e).with_context(|| format!("no reply {r} on flow {f}"));
                        }
                    }
                };
                bytes += n as u64;
                answers.push(answered_by(&String::from_utf8_lossy(&buf[..n])));
            }
            all.push(answers);
            sockets.push(socket);
        }
        Ok((all, bytes))
    })?
}

/// A long-lived TCP connection from the client.
pub struct Connection {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Connection {
    pub fn open(lab: &Lab, vip: Ipv4Addr, port: u16) -> Result<Self> {
        Self::open_from(lab, None, vip, port)
    }

    /// A connection from the client's address `source` (see [`Lab::add_client_addresses`]), or
    /// its first one.
    pub fn open_from(
        lab: &Lab,
        source: Option<Ipv4Addr>,
        vip: Ipv4Addr,
        port: u16,
    ) -> Result<Self> {
        Self::connect(lab, source, vip, port, Duration::from_secs(3))
    }

    /// As [`Connection::open_from`], giving up after `timeout`.
    pub fn connect(
        lab: &Lab,
        source: Option<Ipv4Addr>,
        vip: Ipv4Addr,
        port: u16,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = in_netns(&lab.ns("client"), move || -> std::io::Result<TcpStream> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            if let Some(source) = source {
                socket.bind(&SocketAddr::from(SocketAddrV4::new(source, 0)).into())?;
            }
            socket.connect_timeout(
                &SocketAddr::from(SocketAddrV4::new(vip, port)).into(),
                timeout,
            )?;
            Ok(socket.into())
        })??;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(Connection {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request; returns the name of the target that answered.
    pub fn request(&mut self) -> Result<String> {
        writeln!(self.writer, "request")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(answered_by(&line))
    }
}
