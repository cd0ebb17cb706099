//! The `lb` command line.

use std::{
    io::IsTerminal as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    admin,
    config::{self, ConfigErrors, Forwarding},
    instance,
    metrics::{self, Status},
    run, target,
    xdp::ModeChoice,
};

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "An NLB-like layer-4 load balancer on XDP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: a one-line summary, or every problem with file, line and column.
    Check {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Load the config, attach the XDP balancer to an interface and forward until SIGINT/SIGTERM,
    /// which detach it and leave the interface as it was.
    ///
    /// The maps and the XDP link are pinned, so forwarding outlives the process: a second
    /// `lb run` on the same interface takes over from the running one (which exits without
    /// detaching) with the connection table and target states, so an upgrade or restart loses
    /// no flow; after a crash or `kill -9` the data plane keeps forwarding and the next `lb run`
    /// adopts it. SIGHUP (or `lb reload`) reloads the config.
    Run {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// An interface that receives VIP traffic or reaches targets. Name several for a
        /// balancer with several networks (`-i ext0 -i int0`: clients on one, targets on the
        /// other); the program runs on each and sends a frame out of whichever reaches its
        /// target or client.
        #[arg(short, long = "interface", value_name = "IFACE", required = true)]
        interface: Vec<String>,
        /// XDP mode: native (in the driver, fastest), generic (any interface, slower), or auto:
        /// native when the driver supports it, else generic with a warning that says why.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: ModeChoice,
        /// Where to pin the maps and the XDP links (a BPF filesystem; /sys/fs/bpf is mounted if
        /// needed) [default: /sys/fs/bpf/lb/NETNS/IFACE: the network namespace's inode number and
        /// the first interface]
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
        /// Where to serve Prometheus metrics (/metrics) and the status lb status reads (/status).
        #[arg(long, value_name = "ADDR", default_value = admin::DEFAULT_LISTEN)]
        metrics_listen: SocketAddr,
    },
    /// Show the running lb: listeners, target groups and targets with their state, active
    /// flows, packets/s and bytes/s (sampled over one second).
    Status {
        /// The interface of the lb to show (needed only when several run).
        #[arg(short, long, value_name = "IFACE")]
        interface: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply the config file of the `lb run` on IFACE again (as SIGHUP does): only what changed
    /// is written; an invalid file is refused with `lb check`'s messages and changes nothing.
    Reload {
        /// The interface the running lb serves.
        #[arg(short, long, value_name = "IFACE")]
        interface: String,
    },
    /// Prepare this host as a target: VIPs on loopback, ARP sysctls, for ipip the XDP decap, and
    /// for translated ports the reply-port program.
    ///
    /// With -c, from the balancer's own config: the targets whose address is on IFACE are this
    /// host, and a run again after the file changed converges (adds what is missing, removes
    /// what the file no longer asks for). Otherwise from --mode, --vip and --port.
    Target {
        /// The interface that receives traffic from the balancer (and sends the replies).
        #[arg(short, long, value_name = "IFACE")]
        interface: String,
        /// The balancer's config file.
        #[arg(short, long, value_name = "FILE", conflicts_with_all = ["mode", "vips", "ports"])]
        config: Option<PathBuf>,
        /// The forwarding mode of the target group this host is in.
        #[arg(long, value_enum, required_unless_present = "config")]
        mode: Option<TargetMode>,
        /// A VIP this host serves (repeat for several).
        #[arg(long = "vip", value_name = "ADDR", required_unless_present = "config")]
        vips: Vec<IpAddr>,
        /// A translated port, LISTENER:TARGET with /tcp or /udp (both if neither): replies from
        /// each VIP's TARGET port leave from its LISTENER port (repeat for several).
        #[arg(long = "port", value_name = "LISTENER:TARGET[/PROTO]", value_parser = parse_port_map)]
        ports: Vec<Vec<(u16, u16, u8)>>,
        /// Report what is missing without changing anything (exit 1 if anything is).
        #[arg(long, conflicts_with = "undo")]
        check: bool,
        /// Revert what `lb target` set up.
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TargetMode {
    Dsr,
    Ipip,
    Nat,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            interface,
            xdp_mode,
            pin_dir,
            metrics_listen,
        } => {
            let pin_dir = pin_dir.unwrap_or_else(|| run::default_pin_dir(&interface[0]));
            run::run(&config, &interface, xdp_mode, &pin_dir, metrics_listen).map(|()| true)
        }
        Command::Status { interface, json } => status(interface.as_deref(), json),
        Command::Reload { interface } => reload(&interface),
        Command::Target {
            interface,
            config,
            mode,
            vips,
            ports,
            check,
            undo,
        } => {
            let action = if check {
                target::Action::Check
            } else if undo {
                target::Action::Undo
            } else {
                target::Action::Apply
            };
            prepare_target(&interface, config, mode, &vips, &ports.concat(), action)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            if let Some(errors) = e.downcast_ref::<ConfigErrors>() {
                eprintln!("{errors}");
            } else {
                eprintln!("lb: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn prepare_target(
    interface: &str,
    config: Option<PathBuf>,
    mode: Option<TargetMode>,
    vips: &[IpAddr],
    ports: &[(u16, u16, u8)],
    action: target::Action,
) -> Result<bool> {
    let Some(path) = config else {
        if let Some(IpAddr::V6(mapped)) = vips
            .iter()
            .find(|v| matches!(v, IpAddr::V6(v) if v.to_ipv4_mapped().is_some()))
        {
            bail!(
                "--vip {mapped} is an IPv4-mapped address: give the IPv4 VIP as it is ({})",
                mapped
                    .to_ipv4_mapped()
                    .map_or_else(String::new, |v| v.to_string())
            );
        }
        let mode = match mode {
            Some(TargetMode::Ipip) => Forwarding::Ipip,
            Some(TargetMode::Nat) => Forwarding::Nat,
            _ => Forwarding::Dsr,
        };
        let plan = target::Plan::from_flags(mode, vips, ports);
        return target::run(interface, &plan, action, false);
    };
    let config = config::load(&path)?;
    let iface = crate::net::Interface::lookup(interface)?;
    let host: Vec<IpAddr> = (iface.ipv4.iter().map(|&a| IpAddr::from(a)))
        .chain(iface.ipv6.iter().map(|&a| IpAddr::from(a)))
        .collect();
    let plan = target::Plan::from_config(&config, &host);
    if plan.vips.is_empty() && !plan.nat && action != target::Action::Undo {
        bail!(
            "no target in {} is this host (addresses on {interface}: {}): nothing to prepare",
            path.display(),
            host.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    target::run(interface, &plan, action, true)
}

/// `80:30080/tcp`, `80:30080/udp` or `80:30080` (both): listener port, target port, protocols.
fn parse_port_map(text: &str) -> Result<Vec<(u16, u16, u8)>, String> {
    let (ports, protos) = match text.split_once('/') {
        Some((ports, "tcp")) => (ports, &[lb_common::PROTO_TCP][..]),
        Some((ports, "udp")) => (ports, &[lb_common::PROTO_UDP][..]),
        Some((_, other)) => return Err(format!("`{other}` is not tcp or udp")),
        None => (text, &[lb_common::PROTO_TCP, lb_common::PROTO_UDP][..]),
    };
    let port = |p: &str| -> Result<u16, String> {
        p.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("`{p}` is not a port (1-65535)"))
    };
    let (listener, target) = ports
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not LISTENER:TARGET, like 80:30080/tcp"))?;
    let (listener, target) = (port(listener)?, port(target)?);
    Ok(protos.iter().map(|&p| (listener, target, p)).collect())
}

fn check(path: &std::path::Path) -> Result<bool> {
    let config = config::load(path)?;
    config.log_warnings();
    println!("{}: ok: {}", path.display(), config.summary());
    Ok(true)
}

fn reload(interface: &str) -> Result<bool> {
    let Some(instance) = instance::find(interface)? else {
        bail!("no lb is running on {interface}");
    };
    let config = config::load(&instance.config)?;
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(instance.pid as i32, libc::SIGHUP) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!(
                "lb (pid {}) runs as another user: only root, or that user, may reload it",
                instance.pid
            );
        }
        return Err(e).with_context(|| format!("signalling lb (pid {})", instance.pid));
    }
    println!(
        "asked lb (pid {}) to reload {}: {}",
        instance.pid,
        instance.config.display(),
        config.summary()
    );
    Ok(true)
}

fn status(interface: Option<&str>, json: bool) -> Result<bool> {
    let running = instance::all();
    let (iface, info) = match (interface, running.as_slice()) {
        (Some(i), _) => (
            i.to_owned(),
            instance::find(i)?.ok_or_else(|| anyhow::anyhow!("no lb is running on {i}"))?,
        ),
        (None, []) => bail!("no lb is running (in this network namespace)"),
        (None, [(i, info)]) => (i.clone(), info.clone()),
        (None, many) => bail!(
            "lb runs on several interfaces here ({}): choose one with -i",
            many.iter()
                .map(|(i, _)| i.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let sample = || -> Result<(Instant, Status)> {
        let body = admin::get(info.admin, "/status")?;
        Ok((Instant::now(), serde_json::from_str(&body)?))
    };
    let (t0, before) = sample()?;
    std::thread::sleep(Duration::from_secs(1));
    let (t1, now) = sample()?;
    let rates = metrics::Rates::between(&before, &now, (t1 - t0).as_secs_f64());
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "status": now, "rates": rates }))?
        );
    } else {
        let on = if info.interfaces.is_empty() {
            iface
        } else {
            info.interfaces.join(", ")
        };
        println!(
            "lb on {on} (pid {}, config {})\n",
            info.pid,
            info.config.display()
        );
        print!("{}", metrics::table(&now, &rates));
    }
    Ok(true)
}
