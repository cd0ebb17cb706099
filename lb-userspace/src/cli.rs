//! The `lb` command line.

use std::{
    collections::HashMap, io::IsTerminal as _, net::Ipv4Addr, path::PathBuf, process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{self, Config, ConfigErrors, Forwarding},
    maps::{Dataplane, MapState},
    net::{self, Interface},
    target,
    xdp::{self, ModeChoice},
};

/// How long to wait for a target's (or gateway's) ARP reply at start.
const ARP_TIMEOUT: Duration = Duration::from_secs(3);

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
    Run {
        /// The config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The interface that receives VIP traffic (and sends it on to the targets).
        #[arg(short, long, value_name = "IFACE")]
        interface: String,
        /// XDP mode: native (in the driver, fastest), generic (any interface, slower), or auto:
        /// native when the driver supports it, else generic with a warning that says why.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: ModeChoice,
    },
    /// Prepare this host as a target: VIPs on loopback, ARP sysctls, and for ipip the XDP decap.
    Target {
        /// The interface that receives traffic from the balancer.
        #[arg(short, long, value_name = "IFACE")]
        interface: String,
        /// The forwarding mode of the target group this host is in.
        #[arg(long, value_enum)]
        mode: TargetMode,
        /// A VIP this host serves (repeat for several).
        #[arg(long = "vip", value_name = "ADDR", required = true)]
        vips: Vec<Ipv4Addr>,
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
        } => run(&config, &interface, xdp_mode).map(|()| true),
        Command::Target {
            interface,
            mode,
            vips,
            check,
            undo,
        } => {
            let mode = match mode {
                TargetMode::Dsr => Forwarding::Dsr,
                TargetMode::Ipip => Forwarding::Ipip,
            };
            let action = if check {
                target::Action::Check
            } else if undo {
                target::Action::Undo
            } else {
                target::Action::Apply
            };
            target::run(&interface, mode, &vips, action)
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

fn check(path: &std::path::Path) -> Result<bool> {
    let config = config::load(path)?;
    println!("{}: ok: {}", path.display(), config.summary());
    Ok(true)
}

fn run(path: &std::path::Path, interface: &str, mode: ModeChoice) -> Result<()> {
    let config = config::load(path)?;
    xdp::check_kernel()?;
    let iface = Interface::lookup(interface)?;
    let state = MapState::build(&config, &iface, next_hop_resolver(&iface))?;
    let mut dataplane = Dataplane::load(&config.settings)?;
    dataplane.write(&state)?;
    let (link, attached) = xdp::attach(dataplane.program_mut(), &iface, mode)?;
    info!(
        "forwarding on {} ({attached} XDP): {}",
        iface.name,
        config.summary()
    );
    log_listeners(&config);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(wait_for_shutdown())?;

    dataplane
        .program_mut()
        .detach(link)
        .with_context(|| format!("detaching from {}", iface.name))?;
    info!("detached from {}", iface.name);
    Ok(())
}

fn log_listeners(config: &Config) {
    for l in &config.listeners {
        if let Some(group) = config.target_group(&l.target_group) {
            info!(
                "listener {} {}:{}/{:?} -> target group {} ({}, {} targets)",
                l.name,
                l.address,
                l.port,
                l.protocol,
                group.name,
                group.forwarding,
                group.targets.len()
            );
        }
    }
}

async fn wait_for_shutdown() -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => warn!("SIGHUP: configuration reload is not supported yet; restart lb to apply a new config"),
        }
    }
}

/// The MAC each target's frames go to: the target itself (dsr), or the next hop towards it
/// (ipip). Looked up once per next hop.
fn next_hop_resolver(
    iface: &Interface,
) -> impl FnMut(&config::TargetGroup, &config::Target) -> Result<[u8; 6]> + '_ {
    let mut cache: HashMap<Ipv4Addr, [u8; 6]> = HashMap::new();
    move |group, target| {
        let route = net::route_to(target.address)?;
        if route.dev != iface.name {
            bail!(
                "target {} of group {} is reached through {}, not {}: lb sends only from the interface it runs on",
                target.address,
                group.name,
                route.dev,
                iface.name
            );
        }
        if group.forwarding == Forwarding::Dsr
            && let Some(gw) = route.gateway
        {
            bail!(
                "target {} of group {} is behind gateway {gw}: dsr needs targets on the same layer-2 segment as {}; use `forwarding: ipip` for routed targets",
                target.address,
                group.name,
                iface.name
            );
        }
        let hop = route.next_hop(target.address);
        if let Some(mac) = cache.get(&hop) {
            return Ok(*mac);
        }
        let mac = net::resolve_mac(hop, &iface.name, ARP_TIMEOUT).with_context(|| {
            format!(
                "resolving the MAC of target {} of group {}",
                target.address, group.name
            )
        })?;
        cache.insert(hop, mac);
        Ok(mac)
    }
}
