//! `lb run`: the controller. Loads the data plane, keeps its maps in line with the config, the
//! targets' health and their lifecycle, and reloads the config on SIGHUP.

use std::{
    collections::HashMap,
    net::SocketAddr,
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
    config::{self, Config},
    health::{self, HealthCheck, ProbeResult, TargetState},
    instance::{self, Instance},
    lifecycle::{Registry, TargetKey, Transition},
    maps::{Dataplane, MapState},
    metrics::{self, Status, Telemetry},
    net::{self, Interface, format_mac},
    next_hop::{self, NextHops},
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

/// How long `lb run` waits at start for the MACs of its targets (or gateways), so that they
/// take flows from the first moment; those that come later join when they come.
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
            Ok(Exit::InterfaceGone(name)) => {
                controller.shut_down()?;
                Err(anyhow!(
                    "interface {name} was removed: lb detached and stopped; start it again once the interface is back"
                ))
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
    /// One of lb's interfaces was removed.
    InterfaceGone(String),
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
    /// Each target's interface and MAC, as the kernel says.
    next_hops: NextHops,
    /// The kernel's neighbour and link changes.
    network: mpsc::UnboundedReceiver<next_hop::Event>,
    /// Per interface: whether it was up (with a carrier) when last heard of.
    links_up: Vec<bool>,
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
        let netlink = net::netlink()?;
        // Adopt only what an lb on these very interfaces left: a link pinned for `eth0` whose
        // program is not the one attached to this namespace's eth0 is another lb's (one given
        // the same --pin-dir, here or in another namespace).
        for iface in ifaces.iter().filter(|i| pinned.contains(&i.name)) {
            let pin = link_pin(pin_dir, &iface.name);
            let link = xdp::pinned_link(&pin)?;
            let attached = net::xdp_program(&netlink, iface.index).await?;
            if link.ifindex != 0 && attached != Some(link.program) {
                bail!(
                    "the XDP link pinned at {} is not the program attached to {}: the pins in {} belong to another lb; give this one its own --pin-dir",
                    pin.display(),
                    iface.name,
                    pin_dir.display()
                );
            }
        }
        let adopting = !pinned.is_empty();
        let stale_links: Vec<String> = pinned.into_iter().filter(|i| !names.contains(i)).collect();
        let (mut next_hops, mut network) = NextHops::connect(netlink)?;

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
        // With the targets still draining from a predecessor's config.
        let routes = next_hops
            .route(&config, &not_in(&registry, &config), &ifaces)
            .await?;
        next_hops.use_routes(routes);
        next_hops.learn(&ifaces).await?;
        wait_for_macs(&mut next_hops, &mut network, &ifaces).await;
        forward_for_nat(&config, &ifaces)?;

        let mut dataplane = Dataplane::load(&config.settings, Some(pin_dir))?;
        let current = if adopting {
            dataplane.read_state()?
        } else {
            MapState::default()
        };
        let state = MapState::build(&config, &registry, &ifaces, |k| next_hops.get(&k.addr.ip()))?;
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
        let links_up = vec![true; ifaces.len()];
        let mut controller = Controller {
            config_path: config_path.to_owned(),
            config,
            ifaces,
            pin_dir: pin_dir.to_owned(),
            snapshot_path,
            dataplane,
            registry,
            state,
            next_hops,
            network,
            links_up,
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
                _ = hangup.recv() => self.reload().await,
                Some(event) = self.network.recv() => {
                    if let Some(exit) = self.on_network(event).await? {
                        return Ok(exit);
                    }
                }
                Some(request) = self.admin_rx.recv() => self.answer(request),
                Some(result) = self.results_rx.recv() => self.on_probe(result)?,
                _ = reconcile.tick() => self.dataplane.reconcile_connections(&self.state),
                _ = tick.tick() => {
                    self.next_hops.probe_unknown(&self.ifaces);
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

    /// A change of the network the kernel announced: a neighbour's MAC (written to the maps at
    /// once), an interface going down or up, or going away (which stops lb).
    async fn on_network(&mut self, event: next_hop::Event) -> Result<Option<Exit>> {
        use next_hop::Event;
        match event {
            Event::Neighbour {
                ifindex, addr, mac, ..
            } => {
                if self.next_hops.on_event(&self.ifaces, &event) {
                    let dev = self.iface_name(ifindex);
                    match mac {
                        Some(mac) => info!("{addr} on {dev} is at {} now", format_mac(&mac)),
                        None => warn!(
                            "{addr} on {dev}: its MAC is no longer known (no ARP answer, or flushed): the targets behind it take no new flows until it answers"
                        ),
                    }
                    self.refresh()?;
                }
            }
            Event::Lost => {
                warn!(
                    "the kernel's neighbour events overflowed lb's socket: reading its neighbour table again"
                );
                self.next_hops.learn(&self.ifaces).await?;
                self.refresh()?;
            }
            Event::Link { ifindex, up } => {
                if let Some(i) = net::position_of(&self.ifaces, ifindex)
                    && self.links_up[i] != up
                {
                    self.links_up[i] = up;
                    let name = &self.ifaces[i].name;
                    if up {
                        info!("{name} is up again");
                        self.next_hops.probe_unknown(&self.ifaces);
                    } else {
                        warn!("{name} is down: nothing is forwarded on it until it is up again");
                    }
                }
            }
            Event::LinkRemoved { ifindex } => {
                if let Some(i) = net::position_of(&self.ifaces, ifindex) {
                    return Ok(Some(Exit::InterfaceGone(self.ifaces[i].name.clone())));
                }
            }
        }
        Ok(None)
    }

    /// The name of lb's interface `ifindex`.
    fn iface_name(&self, ifindex: u32) -> &str {
        net::position_of(&self.ifaces, ifindex).map_or("?", |i| self.ifaces[i].name.as_str())
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
            if t.to == TargetState::Unhealthy {
                self.next_hops.recheck(&t.target.addr.ip(), &self.ifaces);
            }
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
    async fn reload(&mut self) {
        let result = match config::load(&self.config_path) {
            Ok(new) => self.apply_config(new).await,
            Err(e) => Err(anyhow!("{e}")),
        };
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

    async fn apply_config(&mut self, new: Config) -> Result<()> {
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
        if new.settings.ipv6 && !self.config.settings.ipv6 {
            bail!(
                "the first listener with an IPv6 VIP needs a restart of lb: its IPv6 tables are sized when it starts, and it started without"
            );
        }
        // Everything that can fail comes before anything changes. New targets' MACs are asked
        // for, not waited for: each joins when the kernel has it.
        // Targets the new config drops drain, and keep their routes meanwhile.
        let routes = self
            .next_hops
            .route(&new, &not_in(&self.registry, &new), &self.ifaces)
            .await?;
        forward_for_nat(&new, &self.ifaces)?;
        let transitions = self
            .registry
            .sync(&new, std::time::Instant::now())
            .map_err(|e| anyhow!(e))?;
        self.next_hops.use_routes(routes);
        if let Err(e) = self.next_hops.learn(&self.ifaces).await {
            warn!("{e:#}: the new targets' MACs come with the kernel's events instead");
        }
        self.config = new;
        self.refresh()?;
        log_transitions(&transitions);
        self.sync_probes();
        Ok(())
    }

    /// Rebuilds the map contents and writes what changed.
    fn refresh(&mut self) -> Result<()> {
        let next_hops = &self.next_hops;
        let new = MapState::build(&self.config, &self.registry, &self.ifaces, |k| {
            next_hops.get(&k.addr.ip())
        })?;
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
                wanted.insert(key.clone(), (SocketAddr::new(key.addr.ip(), port), check));
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
                    "listener {} {}/{:?} -> target group {} ({}, {} targets, {:?} health check every {})",
                    l.name,
                    l.endpoint(),
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

/// With a nat listener, the balancer is a router of its family: its FIB lookups answer only
/// on interfaces where that family's forwarding is on, and the kernel, for a packet whose next
/// hop is not known yet, forwards IPv6 only where it is on for all (which turns it on for
/// every interface). A router ignores router advertisements unless `accept_ra` is 2, so an
/// interface that took them (1) keeps taking them.
fn forward_for_nat(config: &Config, ifaces: &[Interface]) -> Result<()> {
    let [v4, v6] = config.nat_families();
    let mut settings = Vec::new();
    if v4 {
        settings.extend(
            ifaces
                .iter()
                .map(|i| (format!("net.ipv4.conf.{}.forwarding", i.name), "", "1")),
        );
    }
    if v6 {
        settings.extend(
            ifaces
                .iter()
                .map(|i| (format!("net.ipv6.conf.{}.accept_ra", i.name), "1", "2")),
        );
        settings.push(("net.ipv6.conf.all.forwarding".into(), "", "1"));
    }
    // (key, the value it is changed from, or any value other than the wanted one if empty,
    // the wanted value)
    for (key, from, want) in settings {
        let now = crate::target::read_sysctl(&key)?;
        if now != want && (from.is_empty() || now == from) {
            crate::target::write_sysctl(&key, want)?;
            info!("nat: {key} = {want} (was {now}), so that this host routes what it translates");
        }
    }
    Ok(())
}

/// The addresses of the targets `registry` holds that `config` does not: those that drain.
fn not_in(registry: &Registry, config: &Config) -> Vec<std::net::IpAddr> {
    let configured: std::collections::HashSet<std::net::IpAddr> = config
        .target_groups
        .iter()
        .flat_map(|g| &g.targets)
        .map(|t| t.address)
        .collect();
    registry
        .targets()
        .map(|(k, _)| k.addr.ip())
        .filter(|a| !configured.contains(a))
        .collect()
}

/// Waits up to `ARP_TIMEOUT` until the kernel has told the MAC of every neighbour lb needs,
/// asking again every half second; then says which it still lacks.
async fn wait_for_macs(
    hops: &mut NextHops,
    network: &mut mpsc::UnboundedReceiver<next_hop::Event>,
    ifaces: &[Interface],
) {
    let deadline = tokio::time::sleep(ARP_TIMEOUT);
    tokio::pin!(deadline);
    let mut retry = tokio::time::interval(Duration::from_millis(500));
    while !hops.unknown().is_empty() {
        tokio::select! {
            _ = &mut deadline => break,
            _ = retry.tick() => hops.probe_unknown(ifaces),
            Some(event) = network.recv() => {
                hops.on_event(ifaces, &event);
            }
        }
    }
    for (interface, neighbour) in hops.unknown() {
        warn!(
            "no ARP reply from {neighbour} on {} within {}s: the targets behind it take no new flows until it answers",
            ifaces[interface].name,
            ARP_TIMEOUT.as_secs()
        );
    }
}
