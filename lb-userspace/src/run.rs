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
    config::{self, Config, Forwarding},
    health::{self, HealthCheck, ProbeResult, TargetState},
    instance::Instance,
    lifecycle::{Registry, TargetKey, Transition},
    maps::{Dataplane, MapState},
    net::{self, Interface},
    xdp::{self, ModeChoice},
};

/// How long to wait for a target's (or gateway's) ARP reply.
const ARP_TIMEOUT: Duration = Duration::from_secs(3);

pub fn run(config_path: &Path, interface: &str, mode: ModeChoice) -> Result<()> {
    let config = config::load(config_path)?;
    xdp::check_kernel()?;
    let iface = Interface::lookup(interface)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let mut controller = Controller::start(config_path, config, iface, mode)?;
        let result = controller.serve().await;
        controller.stop()?;
        result
    })
}

struct Controller {
    config_path: PathBuf,
    config: Config,
    iface: Interface,
    dataplane: Dataplane,
    link: Option<aya::programs::xdp::XdpLinkId>,
    registry: Registry,
    /// What the maps hold now.
    state: MapState,
    /// Next-hop MAC of each target address, resolved once.
    macs: HashMap<Ipv4Addr, [u8; 6]>,
    probes: HashMap<TargetKey, Probe>,
    results_tx: mpsc::Sender<ProbeResult<TargetKey>>,
    results_rx: mpsc::Receiver<ProbeResult<TargetKey>>,
    tls: tokio_rustls::TlsConnector,
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
    fn start(
        config_path: &Path,
        config: Config,
        iface: Interface,
        mode: ModeChoice,
    ) -> Result<Self> {
        let instance = Instance::claim(&iface.name, config_path)?;
        let mut macs = HashMap::new();
        resolve_macs(&config, &iface, &mut macs)?;
        let mut registry = Registry::new(
            lb_common::MAX_LISTENERS,
            config.settings.max_target_groups,
            lb_common::MAX_TARGETS,
        );
        registry
            .sync(&config, std::time::Instant::now())
            .map_err(|e| anyhow!(e))?;
        let state = MapState::build(&config, &registry, &iface, cached_mac(&macs, &iface))?;
        let mut dataplane = Dataplane::load(&config.settings)?;
        dataplane.apply(&MapState::default(), &state)?;
        let (link, attached) = xdp::attach(dataplane.program_mut(), &iface, mode)?;
        let (results_tx, results_rx) = mpsc::channel(1024);
        let mut controller = Controller {
            config_path: config_path.to_owned(),
            config,
            iface,
            dataplane,
            link: Some(link),
            registry,
            state,
            macs,
            probes: HashMap::new(),
            results_tx,
            results_rx,
            tls: health::tls_connector(),
            _instance: instance,
        };
        info!(
            "forwarding on {} ({attached} XDP): {}",
            controller.iface.name,
            controller.config.summary()
        );
        controller.log_listeners();
        controller.sync_probes();
        Ok(controller)
    }

    async fn serve(&mut self) -> Result<()> {
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                _ = hangup.recv() => self.reload(),
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

    /// Detaches the program: the interface is left as it was.
    fn stop(&mut self) -> Result<()> {
        self.probes.clear();
        if let Some(link) = self.link.take() {
            self.dataplane
                .program_mut()
                .detach(link)
                .with_context(|| format!("detaching from {}", self.iface.name))?;
            info!("detached from {}", self.iface.name);
        }
        Ok(())
    }

    fn on_probe(&mut self, result: ProbeResult<TargetKey>) -> Result<()> {
        let Some(group) = self.config.target_group(&result.target.group) else {
            return Ok(());
        };
        let check = &group.health_check;
        let open_before = self.fail_open_groups();
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
            for group in self.fail_open_groups() {
                if !open_before.contains(&group) {
                    warn!(
                        "target group {group} has no healthy target: failing open to all registered targets"
                    );
                }
            }
        }
        Ok(())
    }

    fn fail_open_groups(&self) -> Vec<String> {
        self.config
            .target_groups
            .iter()
            .filter(|g| self.registry.fails_open(&g.name))
            .map(|g| g.name.clone())
            .collect()
    }

    /// Applies a new config from the same file; an invalid one changes nothing.
    fn reload(&mut self) {
        let result = config::load(&self.config_path)
            .map_err(|e| anyhow!("{e}"))
            .and_then(|new| self.apply_config(new));
        match result {
            Ok(()) => info!(
                "reloaded {}: {}",
                self.config_path.display(),
                self.config.summary()
            ),
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
                key.clone(),
                addr,
                Arc::new(check.clone()),
                self.tls.clone(),
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
