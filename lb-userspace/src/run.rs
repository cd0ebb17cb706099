//! `lb run`: the controller. Loads the data plane, keeps its maps in line with the config, the
//! targets' health and their lifecycle, and reloads the config on SIGHUP.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    admin,
    config::{self, Config, Forwarding},
    health::{self, HealthCheck, ProbeResult, TargetState},
    instance::{self, Instance},
    lifecycle::{Registry, TargetKey, Transition},
    maps::{Dataplane, MapState},
    metrics::{self, Status, Telemetry},
    net::{self, Interface},
    xdp::{self, Attachment, ModeChoice},
};

/// Name of the pinned XDP link in the pin directory.
const LINK_PIN: &str = "link";

/// How long to wait for a target's (or gateway's) ARP reply.
const ARP_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a predecessor may take to hand over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where lb pins an interface's maps and XDP link unless told otherwise.
pub fn default_pin_dir(interface: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb").join(interface)
}

pub fn run(
    config_path: &Path,
    interface: &str,
    mode: ModeChoice,
    pin_dir: &Path,
    metrics_listen: SocketAddr,
) -> Result<()> {
    let config = config::load(config_path)?;
    config.log_warnings();
    xdp::check_kernel()?;
    let iface = Interface::lookup(interface)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let mut controller =
            Controller::start(config_path, config, iface, mode, pin_dir, metrics_listen).await?;
        match controller.serve().await {
            Ok(Exit::Shutdown) => controller.shut_down(),
            Ok(Exit::Handover) => {
                info!("handing over: exiting without detaching; the data plane keeps forwarding for the next lb");
                Ok(())
            }
            Err(e) => {
                // Keep forwarding: a restarted lb adopts the pinned data plane.
                error!("the controller failed; the data plane keeps forwarding and the next `lb run` adopts it");
                Err(e)
            }
        }
    })
}

/// Why the controller stopped.
enum Exit {
    /// SIGINT or SIGTERM: detach and remove every trace.
    Shutdown,
    /// SIGUSR2 from a successor that adopts the pinned data plane.
    Handover,
}

struct Controller {
    config_path: PathBuf,
    config: Config,
    iface: Interface,
    /// Where the maps and the XDP link are pinned.
    pin_dir: PathBuf,
    /// Where ids and target states are recorded for a successor.
    snapshot_path: PathBuf,
    dataplane: Dataplane,
    registry: Registry,
    /// What the maps hold now.
    state: MapState,
    /// Next-hop MAC of each target address, resolved once.
    macs: HashMap<Ipv4Addr, [u8; 6]>,
    probes: HashMap<TargetKey, Probe>,
    results_tx: mpsc::Sender<ProbeResult<TargetKey>>,
    results_rx: mpsc::Receiver<ProbeResult<TargetKey>>,
    prober: health::Prober,
    admin_rx: mpsc::Receiver<admin::Request>,
    telemetry: Telemetry,
    _instance: Instance,
}

struct Probe {
    addr: SocketAddr,
    check: HealthCheck,
    task: JoinHandle<()>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Controller {
    async fn start(
        config_path: &Path,
        config: Config,
        iface: Interface,
        mode: ModeChoice,
        pin_dir: &Path,
        metrics_listen: SocketAddr,
    ) -> Result<Self> {
        let predecessor = instance::find(&iface.name)?;
        xdp::prepare_pin_dir(pin_dir)?;
        let link_pin = pin_dir.join(LINK_PIN);
        let adopting = link_pin.exists();
        let mut macs = HashMap::new();
        resolve_macs(&config, &iface, &mut macs)?;
        forward_for_nat(&config, &iface)?;

        let now = std::time::Instant::now();
        let limits = (
            lb_common::MAX_LISTENERS,
            config.settings.max_target_groups,
            lb_common::MAX_TARGETS,
        );
        let snapshot_path = instance::state_file(&iface.name, "registry");
        let mut registry = match std::fs::read(&snapshot_path) {
            Ok(bytes) if adopting => {
                let snapshot = serde_json::from_slice(&bytes)
                    .with_context(|| format!("reading {}", snapshot_path.display()))?;
                Registry::restore(&snapshot, limits.0, limits.1, limits.2, now)
                    .map_err(|e| anyhow!(e))?
            }
            _ => {
                if adopting {
                    warn!(
                        "no record of the previous lb's targets: established flows may move once"
                    );
                }
                Registry::new(limits.0, limits.1, limits.2)
            }
        };
        let transitions = registry.sync(&config, now).map_err(|e| anyhow!(e))?;

        let mut dataplane = Dataplane::load(&config.settings, Some(pin_dir))?;
        let current = if adopting {
            dataplane.read_state()?
        } else {
            MapState::default()
        };
        let state = MapState::build(&config, &registry, &iface, cached_mac(&macs, &iface))?;
        dataplane.apply(&current, &state)?;
        if let Some(old) = &predecessor {
            instance::signal_and_wait(old.pid, libc::SIGUSR2, HANDOVER_TIMEOUT)
                .context("taking over from the running lb")?;
        }
        let attachment = xdp::attach_pinned(dataplane.program_mut(), &iface, mode, &link_pin)?;
        // Bound only now: a predecessor held the port until it exited.
        let admin_listener = admin::bind(metrics_listen).await?;
        let (admin_tx, admin_rx) = mpsc::channel(16);
        tokio::spawn(admin::serve(admin_listener, admin_tx));
        let instance = Instance::claim(&iface.name, config_path, metrics_listen)?;
        let (results_tx, results_rx) = mpsc::channel(1024);
        let (prober, connecting) = health::Prober::new();
        if let Some(why) = connecting {
            warn!(
                "TCP health checks connect instead of sending half-open handshakes: raw socket: {why}"
            );
        }
        let mut controller = Controller {
            config_path: config_path.to_owned(),
            config,
            iface,
            pin_dir: pin_dir.to_owned(),
            snapshot_path,
            dataplane,
            registry,
            state,
            macs,
            probes: HashMap::new(),
            results_tx,
            results_rx,
            prober,
            admin_rx,
            telemetry: Telemetry::default(),
            _instance: instance,
        };
        let how = match (attachment, &predecessor) {
            (Attachment::New(mode), _) => format!("{mode} XDP"),
            (Attachment::Replaced, Some(old)) => format!("took over from pid {}", old.pid),
            (Attachment::Replaced, None) => {
                "adopted the data plane a previous lb left running".into()
            }
        };
        info!(
            "forwarding on {} ({how}): {}",
            controller.iface.name,
            controller.config.summary()
        );
        log_transitions(&transitions);
        controller.log_listeners();
        controller.save_snapshot();
        controller.sync_probes();
        Ok(controller)
    }

    async fn serve(&mut self) -> Result<Exit> {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut handover = signal(SignalKind::user_defined2())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(Exit::Shutdown),
                _ = terminate.recv() => return Ok(Exit::Shutdown),
                _ = handover.recv() => return Ok(Exit::Handover),
                _ = hangup.recv() => self.reload(),
                Some(request) = self.admin_rx.recv() => self.answer(request),
                Some(result) = self.results_rx.recv() => self.on_probe(result)?,
                _ = tick.tick() => {
                    let expired = self.registry.expire(std::time::Instant::now());
                    if !expired.is_empty() {
                        self.refresh()?;
                        log_transitions(&expired);
                        self.sync_probes();
                    }
                }
            }
        }
    }

    /// Detaches the program and removes the pins and records: the interface is left as it was.
    fn shut_down(&mut self) -> Result<()> {
        self.probes.clear();
        xdp::detach_pinned(&self.pin_dir.join(LINK_PIN))
            .with_context(|| format!("detaching from {}", self.iface.name))?;
        Dataplane::unpin(&self.pin_dir)?;
        let _ = std::fs::remove_dir(&self.pin_dir);
        let _ = std::fs::remove_file(&self.snapshot_path);
        info!("detached from {}", self.iface.name);
        Ok(())
    }

    /// Records ids and states for a successor (best effort: without it flows may move once).
    fn save_snapshot(&self) {
        let snapshot = self.registry.snapshot(std::time::Instant::now());
        let written = serde_json::to_vec(&snapshot)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| {
                let tmp = self.snapshot_path.with_extension("tmp");
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &self.snapshot_path)?;
                Ok(())
            });
        if let Err(e) = written {
            warn!(
                "cannot record target states in {}: {e:#}",
                self.snapshot_path.display()
            );
        }
    }

    fn on_probe(&mut self, result: ProbeResult<TargetKey>) -> Result<()> {
        let Some(group) = self.config.target_group(&result.target.group) else {
            return Ok(());
        };
        let check = &group.health_check;
        self.telemetry
            .probe_duration
            .with_label_values(&[&group.name, &result.target.addr.to_string()])
            .observe(result.duration.as_secs_f64());
        let transition = self.registry.record(
            &result.target,
            result.ok,
            check.healthy_threshold,
            check.unhealthy_threshold,
        );
        if let Some(t) = transition {
            // The maps first: whoever reads the log line may act on it at once.
            self.refresh()?;
            let why = result.error.map(|e| format!(" ({e})")).unwrap_or_default();
            info!("target {}: {} -> {}{why}", t.target, t.from, t.to);
            // A group starts failing open only when its last healthy target stops being healthy,
            // so only such a transition needs a look at the group.
            if t.from == TargetState::Healthy && self.registry.fails_open(&t.target.group) {
                warn!(
                    "target group {} has no healthy target: failing open to all registered targets",
                    t.target.group
                );
            }
        }
        Ok(())
    }

    /// Answers the admin endpoint from the maps and the registry as they are now.
    fn answer(&self, request: admin::Request) {
        let status = Status::collect(
            &self.iface.name,
            &self.config,
            &self.registry,
            &self.state,
            &self.dataplane,
        );
        let _ = match request {
            admin::Request::Metrics(reply) => {
                reply.send(status.and_then(|s| metrics::render(&s, &self.telemetry)))
            }
            admin::Request::Status(reply) => {
                reply.send(status.and_then(|s| Ok(serde_json::to_string(&s)?)))
            }
        };
    }

    /// Applies a new config from the same file; an invalid one changes nothing.
    fn reload(&mut self) {
        let result = config::load(&self.config_path)
            .map_err(|e| anyhow!("{e}"))
            .and_then(|new| self.apply_config(new));
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.telemetry.reloads.with_label_values(&[outcome]).inc();
        match result {
            Ok(()) => {
                self.config.log_warnings();
                info!(
                    "reloaded {}: {}",
                    self.config_path.display(),
                    self.config.summary()
                )
            }
            Err(e) => error!("reload refused, the running configuration stays in force: {e:#}"),
        }
    }

    fn apply_config(&mut self, new: Config) -> Result<()> {
        for (what, old, now) in [
            (
                "maglev_table_size",
                self.config.settings.maglev_table_size,
                new.settings.maglev_table_size,
            ),
            (
                "connection_table_size",
                self.config.settings.connection_table_size,
                new.settings.connection_table_size,
            ),
            (
                "max_target_groups",
                self.config.settings.max_target_groups,
                new.settings.max_target_groups,
            ),
        ] {
            if old != now {
                bail!("settings.{what} changed from {old} to {now}: that needs a restart of lb");
            }
        }
        // Everything that can fail comes before anything changes.
        resolve_macs(&new, &self.iface, &mut self.macs)?;
        forward_for_nat(&new, &self.iface)?;
        let transitions = self
            .registry
            .sync(&new, std::time::Instant::now())
            .map_err(|e| anyhow!(e))?;
        self.config = new;
        self.refresh()?;
        log_transitions(&transitions);
        self.sync_probes();
        Ok(())
    }

    /// Rebuilds the map contents and writes what changed.
    fn refresh(&mut self) -> Result<()> {
        let new = MapState::build(
            &self.config,
            &self.registry,
            &self.iface,
            cached_mac(&self.macs, &self.iface),
        )?;
        self.dataplane.apply(&self.state, &new)?;
        self.state = new;
        self.save_snapshot();
        Ok(())
    }

    /// One probe task per registered target; restarted when its check changes.
    fn sync_probes(&mut self) {
        let mut wanted = HashMap::new();
        for (key, entry) in self.registry.targets() {
            if entry.state() == TargetState::Draining {
                continue;
            }
            if let Some(group) = self.config.target_group(&key.group) {
                let check = group.health_check.clone();
                let port = check.port.unwrap_or(key.addr.port());
                wanted.insert(
                    key.clone(),
                    (SocketAddr::from((*key.addr.ip(), port)), check),
                );
            }
        }
        self.probes.retain(|key, probe| {
            wanted
                .get(key)
                .is_some_and(|(addr, check)| *addr == probe.addr && *check == probe.check)
        });
        for (key, (addr, check)) in wanted {
            if self.probes.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(health::probe_loop(
                Arc::new(key.clone()),
                addr,
                Arc::new(check.clone()),
                self.prober.clone(),
                self.results_tx.clone(),
            ));
            self.probes.insert(key, Probe { addr, check, task });
        }
    }

    fn log_listeners(&self) {
        for l in &self.config.listeners {
            if let Some(group) = self.config.target_group(&l.target_group) {
                info!(
                    "listener {} {}:{}/{:?} -> target group {} ({}, {} targets, {:?} health check every {})",
                    l.name,
                    l.address,
                    l.port,
                    l.protocol,
                    group.name,
                    group.forwarding,
                    group.targets.len(),
                    group.health_check.protocol,
                    config::show(group.health_check.interval),
                );
            }
        }
    }
}

fn log_transitions(transitions: &[Transition]) {
    for t in transitions {
        info!("target {}: {} -> {}", t.target, t.from, t.to);
    }
}

/// A MAC lookup for [`MapState::build`] from MACs resolved beforehand.
fn cached_mac<'a>(
    macs: &'a HashMap<Ipv4Addr, [u8; 6]>,
    iface: &'a Interface,
) -> impl FnMut(&TargetKey, Forwarding) -> Result<[u8; 6]> + 'a {
    move |key, _| {
        macs.get(key.addr.ip())
            .copied()
            .ok_or_else(|| anyhow!("no MAC known for the next hop of {key} on {}", iface.name))
    }
}

/// Resolves the next-hop MAC of every target of `config` not known yet: the target itself
/// (dsr), or the next hop towards it (ipip). Each next hop is asked once.
/// With a nat group, the balancer is a router: its FIB lookups (and the kernel, for a packet
/// whose next hop is not known yet) forward only on an interface where IPv4 forwarding is on.
fn forward_for_nat(config: &Config, iface: &Interface) -> Result<()> {
    if !config
        .target_groups
        .iter()
        .any(|g| g.forwarding == Forwarding::Nat)
    {
        return Ok(());
    }
    let key = format!("net.ipv4.conf.{}.forwarding", iface.name);
    if crate::target::read_sysctl(&key)? != "1" {
        crate::target::write_sysctl(&key, "1")?;
        info!(
            "nat: {key} = 1, so that {} routes what it translates",
            iface.name
        );
    }
    Ok(())
}

fn resolve_macs(
    config: &Config,
    iface: &Interface,
    macs: &mut HashMap<Ipv4Addr, [u8; 6]>,
) -> Result<()> {
    let mut hops: HashMap<Ipv4Addr, [u8; 6]> = HashMap::new();
    for group in &config.target_groups {
        for target in &group.targets {
            if macs.contains_key(&target.address) {
                continue;
            }
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
            let mac = match hops.get(&hop) {
                Some(mac) => *mac,
                None => net::resolve_mac(hop, &iface.name, ARP_TIMEOUT).with_context(|| {
                    format!(
                        "resolving the MAC of target {} of group {}",
                        target.address, group.name
                    )
                })?,
            };
            hops.insert(hop, mac);
            macs.insert(target.address, mac);
        }
    }
    Ok(())
}
