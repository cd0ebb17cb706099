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
    maps::{Dataplane, MapState, NextHop},
    metrics::{self, Status, Telemetry},
    net::{self, Interface},
    xdp::{self, Attachment, ModeChoice},
};

/// The pinned XDP link of interface `iface` in the pin directory.
fn link_pin(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(format!("link-{iface}"))
}

/// The interfaces whose links are pinned in `pin_dir`.
fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| Some(e.file_name().to_str()?.strip_prefix("link-")?.to_owned()))
        .collect()
}

/// How long to wait for a target's (or gateway's) ARP reply.
const ARP_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a predecessor may take to hand over.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where lb pins its maps and XDP links unless told otherwise: named after its network
/// namespace and first interface, so that lbs on `eth0` in two namespaces sharing one BPF
/// filesystem never meet.
pub fn default_pin_dir(interface: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/lb")
        .join(instance::netns_id().to_string())
        .join(interface)
}

pub fn run(
    config_path: &Path,
    interfaces: &[String],
    mode: ModeChoice,
    pin_dir: &Path,
    metrics_listen: SocketAddr,
) -> Result<()> {
    let config = config::load(config_path)?;
    config.log_warnings();
    xdp::check_kernel()?;
    xdp::check_privileges("lb run")?;
    xdp::raise_memlock_limit();
    let ifaces = lookup_interfaces(interfaces)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let mut controller =
            Controller::start(config_path, config, ifaces, mode, pin_dir, metrics_listen).await?;
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
    /// The interfaces it runs on, in the order given: a target's next hop names one by index.
    ifaces: Vec<Interface>,
    /// Where the maps and the XDP links are pinned.
    pin_dir: PathBuf,
    /// Where ids and target states are recorded for a successor.
    snapshot_path: PathBuf,
    dataplane: Dataplane,
    registry: Registry,
    /// What the maps hold now.
    state: MapState,
    /// Next hop of each target address, resolved once.
    hops: HashMap<Ipv4Addr, NextHop>,
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
        ifaces: Vec<Interface>,
        mode: ModeChoice,
        pin_dir: &Path,
        metrics_listen: SocketAddr,
    ) -> Result<Self> {
        let names: Vec<String> = ifaces.iter().map(|i| i.name.clone()).collect();
        let predecessor = predecessor(&names)?;
        xdp::prepare_pin_dir(pin_dir)?;
        let pinned = pinned_links(pin_dir);
        // Adopt only what an lb on these very interfaces left: a link pinned for `eth0` that is
        // attached to another interface means another lb's pins (one given the same --pin-dir).
        for iface in ifaces.iter().filter(|i| pinned.contains(&i.name)) {
            let pin = link_pin(pin_dir, &iface.name);
            let on = xdp::pinned_link_ifindex(&pin)?;
            if on != 0 && on != iface.index {
                bail!(
                    "the XDP link pinned at {} is attached to interface index {on}, not to {} (index {}): the pins in {} belong to another lb; give this one its own --pin-dir",
                    pin.display(),
                    iface.name,
                    iface.index,
                    pin_dir.display()
                );
            }
        }
        let adopting = !pinned.is_empty();
        let stale_links: Vec<String> = pinned.into_iter().filter(|i| !names.contains(i)).collect();
        let mut hops = HashMap::new();
        resolve_next_hops(&config, &ifaces, &mut hops)?;
        forward_for_nat(&config, &ifaces)?;

        let now = std::time::Instant::now();
        let limits = (
            lb_common::MAX_LISTENERS,
            config.settings.max_target_groups,
            lb_common::MAX_TARGETS,
        );
        let snapshot_path = instance::state_file(&names[0], "registry");
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
        let state = MapState::build(&config, &registry, &ifaces, cached_hop(&hops))?;
        dataplane.apply(&current, &state)?;
        if let Some(old) = &predecessor {
            instance::signal_and_wait(old.pid, libc::SIGUSR2, HANDOVER_TIMEOUT)
                .context("taking over from the running lb")?;
        }
        let mut how = Vec::new();
        for iface in &ifaces {
            let attachment = xdp::attach_pinned(
                dataplane.program_mut(),
                iface,
                mode,
                &link_pin(pin_dir, &iface.name),
            )?;
            how.push(match (attachment, &predecessor) {
                (Attachment::New(mode), _) => format!("{} ({mode} XDP)", iface.name),
                (Attachment::Replaced, Some(old)) => {
                    format!("{} (took over from pid {})", iface.name, old.pid)
                }
                (Attachment::Replaced, None) => format!(
                    "{} (adopted the data plane a previous lb left running)",
                    iface.name
                ),
            });
        }
        // Interfaces the previous lb ran on and this one does not: the data plane leaves them.
        for stale in &stale_links {
            match xdp::detach_pinned(&link_pin(pin_dir, stale)) {
                Ok(()) => info!("detached from {stale}, which is no longer one of lb's interfaces"),
                Err(e) => warn!("cannot detach from {stale}: {e:#}"),
            }
        }
        // Bound only now: a predecessor held the port until it exited.
        let admin_listener = admin::bind(metrics_listen).await?;
        let (admin_tx, admin_rx) = mpsc::channel(16);
        tokio::spawn(admin::serve(admin_listener, admin_tx));
        let instance = Instance::claim(&names, config_path, metrics_listen)?;
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
            ifaces,
            pin_dir: pin_dir.to_owned(),
            snapshot_path,
            dataplane,
            registry,
            state,
            hops,
            probes: HashMap::new(),
            results_tx,
            results_rx,
            prober,
            admin_rx,
            telemetry: Telemetry::default(),
            _instance: instance,
        };
        info!(
            "forwarding on {}: {}",
            how.join(", "),
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
        let mut reconcile = tokio::time::interval(self.dataplane.reconcile_period());
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(Exit::Shutdown),
                _ = terminate.recv() => return Ok(Exit::Shutdown),
                _ = handover.recv() => return Ok(Exit::Handover),
                _ = hangup.recv() => self.reload(),
                Some(request) = self.admin_rx.recv() => self.answer(request),
                Some(result) = self.results_rx.recv() => self.on_probe(result)?,
                _ = reconcile.tick() => self.dataplane.reconcile_connections(&self.state),
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
        for iface in &self.ifaces {
            xdp::detach_pinned(&link_pin(&self.pin_dir, &iface.name))
                .with_context(|| format!("detaching from {}", iface.name))?;
        }
        Dataplane::unpin(&self.pin_dir)?;
        let _ = std::fs::remove_dir(&self.pin_dir);
        // The default's namespace directory goes with its last interface's.
        if self.pin_dir == default_pin_dir(&self.ifaces[0].name)
            && let Some(netns_dir) = self.pin_dir.parent()
        {
            let _ = std::fs::remove_dir(netns_dir);
        }
        let _ = std::fs::remove_file(&self.snapshot_path);
        info!("detached from {}", self.names().join(", "));
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
            &self.names(),
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
        let outcome = if result.is_ok() {
            metrics::RELOAD_SUCCESS
        } else {
            metrics::RELOAD_FAILURE
        };
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
        resolve_next_hops(&new, &self.ifaces, &mut self.hops)?;
        forward_for_nat(&new, &self.ifaces)?;
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
            &self.ifaces,
            cached_hop(&self.hops),
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

    fn names(&self) -> Vec<String> {
        self.ifaces.iter().map(|i| i.name.clone()).collect()
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

/// The interfaces named on the command line, each once.
fn lookup_interfaces(names: &[String]) -> Result<Vec<Interface>> {
    if names.len() > lb_common::MAX_INTERFACES {
        bail!(
            "lb runs on at most {} interfaces, not {}",
            lb_common::MAX_INTERFACES,
            names.len()
        );
    }
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            bail!("interface {name} is named twice");
        }
    }
    names.iter().map(|n| Interface::lookup(n)).collect()
}

/// The running lb this one takes over from: the one on any of `names`, if there is one.
fn predecessor(names: &[String]) -> Result<Option<instance::InstanceInfo>> {
    let mut found: Option<(String, instance::InstanceInfo)> = None;
    for name in names {
        if let Some(info) = instance::find(name)? {
            match &found {
                Some((other, first)) if first.pid != info.pid => bail!(
                    "two lbs run on these interfaces: pid {} on {other}, pid {} on {name}; stop one of them first",
                    first.pid,
                    info.pid
                ),
                Some(_) => {}
                None => found = Some((name.clone(), info)),
            }
        }
    }
    Ok(found.map(|(_, info)| info))
}

/// A next-hop lookup for [`MapState::build`] from next hops resolved beforehand.
fn cached_hop(
    hops: &HashMap<Ipv4Addr, NextHop>,
) -> impl FnMut(&TargetKey, Forwarding) -> Result<NextHop> + '_ {
    move |key, _| {
        hops.get(key.addr.ip())
            .copied()
            .ok_or_else(|| anyhow!("no next hop known for {key}"))
    }
}

/// With a nat group, the balancer is a router: its FIB lookups (and the kernel, for a packet
/// whose next hop is not known yet) forward only on interfaces where IPv4 forwarding is on.
fn forward_for_nat(config: &Config, ifaces: &[Interface]) -> Result<()> {
    if !config
        .target_groups
        .iter()
        .any(|g| g.forwarding == Forwarding::Nat)
    {
        return Ok(());
    }
    for iface in ifaces {
        let key = format!("net.ipv4.conf.{}.forwarding", iface.name);
        if crate::target::read_sysctl(&key)? != "1" {
            crate::target::write_sysctl(&key, "1")?;
            info!(
                "nat: {key} = 1, so that {} routes what it translates",
                iface.name
            );
        }
    }
    Ok(())
}

/// Resolves the next hop of every target of `config` not known yet: which of lb's interfaces
/// reaches it, and the MAC of the target itself (dsr) or of the gateway towards it (ipip,
/// nat). Each next hop is asked once.
fn resolve_next_hops(
    config: &Config,
    ifaces: &[Interface],
    hops: &mut HashMap<Ipv4Addr, NextHop>,
) -> Result<()> {
    let mut asked: HashMap<(usize, Ipv4Addr), [u8; 6]> = HashMap::new();
    for group in &config.target_groups {
        for target in &group.targets {
            if hops.contains_key(&target.address) {
                continue;
            }
            let route = net::route_to(target.address)?;
            let Some(interface) = ifaces.iter().position(|i| i.name == route.dev) else {
                let names: Vec<&str> = ifaces.iter().map(|i| i.name.as_str()).collect();
                bail!(
                    "target {} of group {} is reached through {}, which is not one of lb's interfaces ({}): run lb on it too (-i {}), or route the target through one of them",
                    target.address,
                    group.name,
                    route.dev,
                    names.join(", "),
                    route.dev
                );
            };
            let iface = &ifaces[interface];
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
            let mac = match asked.get(&(interface, hop)) {
                Some(mac) => *mac,
                None => net::resolve_mac(hop, &iface.name, ARP_TIMEOUT).with_context(|| {
                    format!(
                        "resolving the MAC of target {} of group {}",
                        target.address, group.name
                    )
                })?,
            };
            asked.insert((interface, hop), mac);
            hops.insert(target.address, NextHop { interface, mac });
        }
    }
    Ok(())
}
