//! `lb target`: prepares a target host for direct server return, the step DSR users most often
//! get wrong.
//!
//! - dsr and ipip: each VIP on loopback (so the target accepts packets for it and answers from
//!   it), and `arp_ignore=1` / `arp_announce=2` so the target never answers ARP for a VIP (which
//!   would steal the VIP from the balancer) nor announces it.
//! - ipip: loose `rp_filter` where it is strict, and lb's XDP decap program on the interface.
//! - a target port that differs from its listener's: lb's TC egress program `lb_reply_ports`,
//!   which gives replies from (VIP, target port, protocol) the listener's port back.
//!
//! What a host needs comes from flags (`--mode`, `--vip`, `--port`) or from the balancer's own
//! config (`-c`), from which it takes the targets that are this host. Every step can be checked
//! without changing anything (`--check`) and reverted (`--undo`): sysctls go back to the values
//! saved when lb first changed them. With `-c`, a run converges: what an earlier run set up
//! and the file no longer asks for is removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsFd as _,
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TcAttachType, Xdp, tc},
};
use lb_common::ListenerKey6;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, Forwarding, protocol_name},
    maps::{be, be6, from_be6},
    net::{self, Interface},
    xdp::{XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, netlink_set_xdp},
};

pub const DECAP_PROGRAM: &str = "lb_decap";
pub const REPLY_PORTS_PROGRAM: &str = "lb_reply_ports";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Apply,
    Check,
    Undo,
}

/// A reply port translation: replies from `vip`:`target_port` over `proto` leave with
/// `listener_port` as their source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplyPort {
    pub vip: IpAddr,
    pub target_port: u16,
    pub proto: u8,
    pub listener_port: u16,
}

impl ReplyPort {
    /// Its key in `REPLY_PORTS`, which holds an IPv4 VIP as its IPv4-mapped IPv6 address.
    fn key(&self) -> ListenerKey6 {
        let vip = match self.vip {
            IpAddr::V4(v) => v.to_ipv6_mapped(),
            IpAddr::V6(v) => v,
        };
        ListenerKey6 {
            addr: be6(vip),
            port: self.target_port.to_be(),
            proto: self.proto,
            pad: 0,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}/{} answers as :{}",
            SocketAddr::new(self.vip, self.target_port),
            protocol_name(self.proto),
            self.listener_port
        )
    }
}

/// What a target host needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub vips: BTreeSet<IpAddr>,
    /// Some target of this host is in an ipip group: it needs the decap.
    pub ipip: bool,
    /// Some target of this host is in a nat group: it needs nothing from lb (but a route back
    /// to the clients through the balancer).
    pub nat: bool,
    pub reply_ports: BTreeSet<ReplyPort>,
}

impl Plan {
    /// The plan of the flag form: `mode` and `vips` as given, each of `ports` (listener port,
    /// target port, protocol) for every VIP.
    pub fn from_flags(mode: Forwarding, vips: &[IpAddr], ports: &[(u16, u16, u8)]) -> Self {
        Plan {
            vips: if mode == Forwarding::Nat {
                BTreeSet::new()
            } else {
                vips.iter().copied().collect()
            },
            ipip: mode == Forwarding::Ipip,
            nat: mode == Forwarding::Nat,
            reply_ports: vips
                .iter()
                .flat_map(|&vip| {
                    ports
                        .iter()
                        .map(move |&(listener_port, target_port, proto)| ReplyPort {
                            vip,
                            target_port,
                            proto,
                            listener_port,
                        })
                })
                .filter(|r| r.target_port != r.listener_port)
                .collect(),
        }
    }

    /// What the targets of `config` whose address is one of `host` need: their listeners' VIPs,
    /// the decap if any is in an ipip group, and the reply ports of translated listeners.
    pub fn from_config(config: &Config, host: &[IpAddr]) -> Self {
        let mut plan = Plan::default();
        for l in &config.listeners {
            let Some(group) = config.target_group(&l.target_group) else {
                continue;
            };
            for t in group.targets.iter().filter(|t| host.contains(&t.address)) {
                if group.forwarding == Forwarding::Nat {
                    plan.nat = true;
                    continue;
                }
                plan.vips.insert(l.address);
                plan.ipip |= group.forwarding == Forwarding::Ipip;
                if t.port != l.port {
                    for &proto in l.protocol.ip_protocols() {
                        plan.reply_ports.insert(ReplyPort {
                            vip: l.address,
                            target_port: t.port,
                            proto,
                            listener_port: l.port,
                        });
                    }
                }
            }
        }
        plan
    }

    fn steps(&self, iface: &str) -> Vec<Step> {
        let mut steps: Vec<Step> = self.vips.iter().map(|&v| Step::VipOnLoopback(v)).collect();
        // IPv4 VIPs only: neighbour discovery answers for addresses on the asking interface
        // only, so an IPv6 VIP on lo stays unannounced as it is.
        let announced = ipv4_only(&self.vips).next().is_some();
        for scope in ["all", iface].into_iter().filter(|_| announced) {
            for (name, want) in [("arp_ignore", "1"), ("arp_announce", "2")] {
                steps.push(Step::Sysctl {
                    key: format!("net.ipv4.conf.{scope}.{name}"),
                    want: want.into(),
                });
            }
        }
        if self.ipip {
            steps.push(Step::RpFilterLoose(iface.to_owned()));
            steps.push(Step::Decap(iface.to_owned()));
        }
        if !self.reply_ports.is_empty() {
            steps.push(Step::ReplyPorts {
                iface: iface.to_owned(),
                ports: self.reply_ports.clone(),
            });
        }
        steps
    }
}

/// One thing a target host needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Step {
    VipOnLoopback(IpAddr),
    Sysctl {
        key: String,
        want: String,
    },
    /// Loose reverse-path filtering on the interface where the effective mode is strict.
    RpFilterLoose(String),
    Decap(String),
    /// `lb_reply_ports` on the interface's egress, holding exactly these translations.
    ReplyPorts {
        iface: String,
        ports: BTreeSet<ReplyPort>,
    },
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::VipOnLoopback(vip) => {
                format!("VIP {vip}/{} on lo", if vip.is_ipv6() { 128 } else { 32 })
            }
            Step::Sysctl { key, want } => format!("{key} = {want}"),
            Step::RpFilterLoose(iface) => format!("rp_filter on {iface} not strict"),
            Step::Decap(iface) => format!("XDP decap ({DECAP_PROGRAM}) on {iface}"),
            Step::ReplyPorts { iface, ports } => format!(
                "reply ports ({REPLY_PORTS_PROGRAM}) on {iface} egress: {}",
                ports
                    .iter()
                    .map(ReplyPort::describe)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Whether `other` sets up the same thing (perhaps with other contents): a step recorded by
    /// an earlier run is stale only if no step of this run is its own.
    fn same_thing(&self, other: &Step) -> bool {
        match (self, other) {
            (Step::Sysctl { key: a, .. }, Step::Sysctl { key: b, .. }) => a == b,
            (Step::ReplyPorts { iface: a, .. }, Step::ReplyPorts { iface: b, .. }) => a == b,
            _ => self == other,
        }
    }

    fn is_done(&self) -> Result<bool> {
        Ok(match self {
            Step::VipOnLoopback(vip) => Interface::lookup("lo")?.holds(*vip),
            Step::Sysctl { key, want } => read_sysctl(key)? == *want,
            Step::RpFilterLoose(iface) => effective_rp_filter(iface)? != "1",
            Step::Decap(iface) => decap_attached(iface)?,
            Step::ReplyPorts { iface, ports } => match attached_reply_ports(iface)? {
                Some(Ok(map)) => read_reply_ports(map)? == *ports,
                Some(Err(Outdated)) | None => false,
            },
        })
    }

    fn apply(&self, saved: &mut SavedState) -> Result<()> {
        match self {
            Step::VipOnLoopback(vip) => vip_on_loopback(*vip, true),
            Step::Sysctl { key, want } => {
                saved.remember(key)?;
                write_sysctl(key, want)
            }
            Step::RpFilterLoose(iface) => {
                let key = format!("net.ipv4.conf.{iface}.rp_filter");
                saved.remember(&key)?;
                write_sysctl(&key, "2")
            }
            Step::Decap(iface) => attach_decap(iface),
            Step::ReplyPorts { iface, ports } => install_reply_ports(iface, ports),
        }
    }

    /// Whether undoing makes sense although the step is not (fully) done: sysctls go back to
    /// their saved values whatever they are now, and a reply-port program that holds other
    /// translations is still lb's to remove.
    fn undo_when_not_done(&self) -> bool {
        matches!(
            self,
            Step::Sysctl { .. } | Step::RpFilterLoose(_) | Step::ReplyPorts { .. }
        )
    }

    fn undo(&self, saved: &SavedState) -> Result<()> {
        match self {
            Step::VipOnLoopback(vip) => vip_on_loopback(*vip, false),
            Step::Sysctl { key, .. } => saved.restore(key),
            Step::RpFilterLoose(iface) => {
                saved.restore(&format!("net.ipv4.conf.{iface}.rp_filter"))
            }
            Step::Decap(iface) => detach_decap(iface),
            Step::ReplyPorts { iface, .. } => detach_reply_ports(iface),
        }
    }
}

/// Runs `lb target` for `plan`; returns whether the host is (or, after --undo, was left) as
/// asked. `converge` (the `-c` form, where the plan is all the host should have): steps an
/// earlier run set up that the plan no longer has are undone (or with --check, reported).
pub fn run(iface: &str, plan: &Plan, action: Action, converge: bool) -> Result<bool> {
    Interface::lookup(iface)?;
    if action != Action::Check {
        crate::xdp::check_privileges("lb target")?;
    }
    if plan.nat {
        println!(
            "nat: targets of nat groups need no VIP, agent or sysctl from lb; their route to the clients must go through the balancer (make it their default gateway)"
        );
    }
    if plan.vips.is_empty() && !plan.nat && !(converge && action == Action::Undo) {
        bail!("nothing to prepare: no VIP is served by this host");
    }
    let steps = plan.steps(iface);
    let mut saved = SavedState::load(iface)?;
    let stale: Vec<Step> = if converge {
        saved
            .steps
            .iter()
            .filter(|old| !steps.iter().any(|new| new.same_thing(old)))
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let mut all_ok = true;
    match action {
        Action::Check => {
            for step in &steps {
                let done = step.is_done()?;
                println!(
                    "{} {}",
                    if done { "ok     " } else { "missing" },
                    step.describe()
                );
                all_ok &= done;
            }
            for step in &stale {
                if step.is_done()? {
                    println!("extra   {} (no longer asked for)", step.describe());
                    all_ok = false;
                }
            }
        }
        Action::Apply => {
            // Stale steps first: a sysctl or a program the new steps share is not stale.
            for step in &stale {
                if step.undo_when_not_done() || step.is_done()? {
                    step.undo(&saved)
                        .with_context(|| format!("removing {}", step.describe()))?;
                    println!("removed {} (no longer asked for)", step.describe());
                }
                saved.steps.retain(|s| s != step);
            }
            for step in &steps {
                if step.is_done()? {
                    println!("ok      {}", step.describe());
                } else {
                    step.apply(&mut saved)
                        .with_context(|| format!("setting {}", step.describe()))?;
                    println!("set     {}", step.describe());
                }
                saved.steps.retain(|s| !s.same_thing(step));
                saved.steps.push(step.clone());
            }
            saved.store()?;
        }
        Action::Undo => {
            for step in steps.iter().chain(&stale) {
                if step.undo_when_not_done() || step.is_done()? {
                    step.undo(&saved)
                        .with_context(|| format!("reverting {}", step.describe()))?;
                    println!("undone  {}", step.describe());
                }
                saved.steps.retain(|s| !s.same_thing(step));
            }
            if converge || saved.steps.is_empty() {
                saved.forget()?;
            } else {
                saved.store()?;
            }
        }
    }
    Ok(all_ok)
}

// ---------------------------------------------------------------------------------------------

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

pub fn read_sysctl(key: &str) -> Result<String> {
    let path = sysctl_path(key);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, value)
        .with_context(|| format!("writing {} (lb target needs root)", path.display()))
}

/// The kernel applies the larger of the `all` and per-interface values.
fn effective_rp_filter(iface: &str) -> Result<String> {
    let all = read_sysctl("net.ipv4.conf.all.rp_filter")?;
    let dev = read_sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"))?;
    Ok(all.max(dev))
}

/// The IPv4 addresses of `vips`.
fn ipv4_only<'a>(vips: impl IntoIterator<Item = &'a IpAddr>) -> impl Iterator<Item = Ipv4Addr> {
    vips.into_iter().filter_map(|v| match v {
        IpAddr::V4(v) => Some(*v),
        IpAddr::V6(_) => None,
    })
}

/// Puts `vip` on lo as a /32 or /128 (or takes it away). An IPv6 one needs no duplicate
/// address detection there: the kernel does none on loopback.
fn vip_on_loopback(vip: IpAddr, present: bool) -> Result<()> {
    let lo = Interface::lookup("lo")?.index;
    net::with_netlink(async |handle| net::set_host_address(handle, lo, vip, present).await)
}

/// Name of the XDP program attached to `iface`, if any.
/// Whether `iface` runs this lb's decap: `lb_decap` with `LOCAL_ADDRS6` (an lb before IPv6
/// had an `lb_decap` that opens IPv4 tunnels only).
fn decap_attached(iface: &str) -> Result<bool> {
    let index = Interface::lookup(iface)?.index;
    let Some(id) = net::with_netlink(async |handle| net::xdp_program(handle, index).await)? else {
        return Ok(false);
    };
    for program in aya::programs::loaded_programs() {
        let program = program.context("listing the kernel's BPF programs")?;
        if program.id() != id {
            continue;
        }
        if program.name_as_str() != Some(DECAP_PROGRAM) {
            return Ok(false);
        }
        for map_id in program.map_ids()?.unwrap_or_default() {
            if MapData::from_id(map_id)?.info()?.name_as_str() == Some("LOCAL_ADDRS6") {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    Ok(false)
}

/// Loads the decap object, tells it this host's addresses, and attaches it through netlink so
/// it stays after `lb target` exits.
fn attach_decap(iface: &str) -> Result<()> {
    let iface = Interface::lookup(iface)?;
    let mut ebpf = Ebpf::load(crate::TARGET_OBJECT).map_err(crate::xdp::explain_load_error)?;
    let mut local: HashMap<_, u32, u8> = HashMap::try_from(
        ebpf.map_mut("LOCAL_ADDRS")
            .context("LOCAL_ADDRS missing from the decap object")?,
    )?;
    for addr in &iface.ipv4 {
        local.insert(be(*addr), 1, 0)?;
    }
    let mut local6: HashMap<_, [u32; 4], u8> = HashMap::try_from(
        ebpf.map_mut("LOCAL_ADDRS6")
            .context("LOCAL_ADDRS6 missing from the decap object")?,
    )?;
    for addr in &iface.ipv6 {
        local6.insert(be6(*addr), 1, 0)?;
    }
    let program: &mut Xdp = ebpf
        .program_mut(DECAP_PROGRAM)
        .context("decap program missing from the decap object")?
        .try_into()?;
    program.load().map_err(crate::xdp::explain_program_error)?;
    let fd = program.fd()?.as_fd();
    // Native (driver) mode first, generic where the driver has none.
    netlink_set_xdp(iface.index, Some(fd), XDP_FLAGS_DRV_MODE)
        .or_else(|_| netlink_set_xdp(iface.index, Some(fd), XDP_FLAGS_SKB_MODE))
        .with_context(|| format!("attaching the decap program to {}", iface.name))?;
    Ok(())
}

/// The `REPLY_PORTS` map of the `lb_reply_ports` program on `iface`'s egress, if one is there
/// (`Err(Outdated)` inside: one of an lb before IPv6, whose map is keyed by IPv4 VIP alone).
///
/// tc lists the filter with its program's id; the kernel gives the program's maps by id. So
/// `--check` and a converging run read what the host really does, not a record of it.
fn attached_reply_ports(iface: &str) -> Result<Option<Result<MapData, Outdated>>> {
    let out = Command::new("tc")
        .args(["-j", "filter", "show", "dev", iface, "egress"])
        .output()
        .context("running `tc` (is iproute2 installed?)")?;
    let filters: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let Some(id) = filters.iter().find_map(|f| {
        let options = &f["options"];
        (options["bpf_name"]
            .as_str()
            .is_some_and(|n| n.starts_with(REPLY_PORTS_PROGRAM)))
        .then(|| options["prog"]["id"].as_u64())
        .flatten()
    }) else {
        return Ok(None);
    };
    let program = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() as u64 == id)
        .with_context(|| format!("the program (id {id}) tc lists on {iface} is gone"))?;
    for map_id in program.map_ids()?.unwrap_or_default() {
        let map = MapData::from_id(map_id)?;
        let info = map.info()?;
        if info.name_as_str() == Some("REPLY_PORTS") {
            let current = info.key_size() as usize == size_of::<ListenerKey6>();
            return Ok(Some(if current { Ok(map) } else { Err(Outdated) }));
        }
    }
    bail!("the {REPLY_PORTS_PROGRAM} program on {iface} has no REPLY_PORTS map")
}

/// Puts every one of `ports` into a `REPLY_PORTS` map, as the program reads them.
fn write_reply_ports<T: std::borrow::BorrowMut<MapData>>(
    map: &mut HashMap<T, ListenerKey6, u16>,
    ports: &BTreeSet<ReplyPort>,
) -> Result<()> {
    for r in ports {
        map.insert(r.key(), r.listener_port.to_be(), 0)?;
    }
    Ok(())
}

fn reply_ports_map(map: MapData) -> Result<HashMap<MapData, ListenerKey6, u16>> {
    Ok(HashMap::try_from(aya::maps::Map::HashMap(map))?)
}

fn read_reply_ports(map: MapData) -> Result<BTreeSet<ReplyPort>> {
    let mut ports = BTreeSet::new();
    for entry in reply_ports_map(map)?.iter() {
        let (key, listener_port) = entry?;
        let vip = from_be6(key.addr);
        ports.insert(ReplyPort {
            vip: vip.to_ipv4_mapped().map_or(IpAddr::V6(vip), IpAddr::V4),
            target_port: u16::from_be(key.port),
            proto: key.proto,
            listener_port: u16::from_be(listener_port),
        });
    }
    Ok(ports)
}

/// Makes `lb_reply_ports` on `iface`'s egress hold exactly `ports`: the attached program's map
/// is updated in place (no reply goes untranslated meanwhile), or the program is loaded and
/// attached through netlink, where the kernel keeps it after `lb target` exits.
fn install_reply_ports(iface: &str, ports: &BTreeSet<ReplyPort>) -> Result<()> {
    let attached = attached_reply_ports(iface)?;
    if let Some(Ok(map)) = attached {
        let mut map = reply_ports_map(map)?;
        let stale: Vec<ListenerKey6> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !ports.iter().any(|p| p.key() == *k))
            .collect();
        write_reply_ports(&mut map, ports)?;
        for key in stale {
            map.remove(&key)?;
        }
        return Ok(());
    }
    let mut ebpf = load_reply_ports(ports)?;
    // An outdated program is replaced: replies go untranslated only between its detach and
    // the new one's attach, with the new one loaded and filled already.
    if let Some(Err(Outdated)) = attached {
        detach_reply_ports(iface)?;
    }
    if let Err(e) = tc::qdisc_add_clsact(iface)
        && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
    {
        return Err(e).with_context(|| format!("adding the clsact qdisc to {iface}"));
    }
    let program = reply_ports_program(&mut ebpf)?;
    let link = program
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
        )
        .with_context(|| format!("attaching {REPLY_PORTS_PROGRAM} to {iface} egress"))?;
    // The filter stays in the kernel: dropping the link would remove it.
    std::mem::forget(program.take_link(link)?);
    Ok(())
}

/// An `lb_reply_ports` of an lb before IPv6 (its map keyed by IPv4 VIP alone): `lb target`
/// replaces it, `--check` reports the reply ports missing.
#[derive(Debug)]
struct Outdated;

/// The target object with `lb_reply_ports` loaded (not attached anywhere) and its map holding
/// `ports`.
pub fn load_reply_ports(ports: &BTreeSet<ReplyPort>) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(crate::TARGET_OBJECT).map_err(crate::xdp::explain_load_error)?;
    let mut map: HashMap<_, ListenerKey6, u16> = HashMap::try_from(
        ebpf.map_mut("REPLY_PORTS")
            .context("REPLY_PORTS missing from the target object")?,
    )?;
    write_reply_ports(&mut map, ports)?;
    reply_ports_program(&mut ebpf)?
        .load()
        .map_err(crate::xdp::explain_program_error)?;
    Ok(ebpf)
}

/// `lb_reply_ports` of an object from [`load_reply_ports`].
pub fn reply_ports_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    Ok(ebpf
        .program_mut(REPLY_PORTS_PROGRAM)
        .context("reply ports program missing from the target object")?
        .try_into()?)
}

fn detach_reply_ports(iface: &str) -> Result<()> {
    match tc::qdisc_detach_program(iface, TcAttachType::Egress, REPLY_PORTS_PROGRAM) {
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        result => result.with_context(|| format!("detaching {REPLY_PORTS_PROGRAM} from {iface}")),
    }
}

fn detach_decap(iface: &str) -> Result<()> {
    let index = Interface::lookup(iface)?.index;
    for flags in [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE] {
        netlink_set_xdp(index, None, flags)
            .with_context(|| format!("detaching the decap program from {iface}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Sysctl values as they were before lb first changed them, for `--undo`.
///
/// Kept under /run (gone at reboot, like the changes themselves), one file per network
/// namespace and interface.
struct SavedState {
    path: PathBuf,
    values: BTreeMap<String, String>,
    /// What the runs so far set up (or found in place) and have not undone: what a converging
    /// run compares its plan with.
    steps: Vec<Step>,
}

#[derive(Default, Deserialize, Serialize)]
struct SavedFile {
    #[serde(default)]
    sysctls: BTreeMap<String, String>,
    #[serde(default)]
    steps: Vec<Step>,
}

impl SavedState {
    fn load(iface: &str) -> Result<Self> {
        let path = crate::instance::state_file(iface, "target");
        let file: SavedFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => SavedFile::default(),
        };
        Ok(SavedState {
            path,
            values: file.sysctls,
            steps: file.steps,
        })
    }

    /// Saves the current value of `key`, unless an earlier run saved the original already.
    fn remember(&mut self, key: &str) -> Result<()> {
        if !self.values.contains_key(key) {
            self.values.insert(key.to_owned(), read_sysctl(key)?);
        }
        Ok(())
    }

    fn restore(&self, key: &str) -> Result<()> {
        match self.values.get(key) {
            Some(value) => write_sysctl(key, value),
            None => Ok(()),
        }
    }

    fn store(&self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = SavedFile {
            sysctls: self.values.clone(),
            steps: self.steps.clone(),
        };
        std::fs::write(&self.path, serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn forget(&self) -> Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.path.display()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_plan_takes_only_this_hosts_targets_and_their_translations() {
        let config = crate::config::parse(
            Path::new("t.yaml"),
            crate::config::tests::ONE_HOST_TWO_PORTS,
        )
        .unwrap();
        let vip = Ipv4Addr::new(203, 0, 113, 30);
        let plan = Plan::from_config(&config, &[Ipv4Addr::new(198, 51, 100, 11).into()]);
        let answers: Vec<(u16, u16)> = plan
            .reply_ports
            .iter()
            .map(|r| (r.target_port, r.listener_port))
            .collect();
        assert_eq!(plan.vips, BTreeSet::from([IpAddr::V4(vip)]));
        assert_eq!(answers, [(7001, 7000), (7002, 7000)]);
        assert!(!plan.ipip && !plan.nat);
        let elsewhere = Plan::from_config(&config, &[Ipv4Addr::new(198, 51, 100, 12).into()]);
        assert_eq!(elsewhere, Plan::default());
    }
}
