//! `lb target`: prepares a target host for direct server return, the step DSR users most often
//! get wrong.
//!
//! - dsr and ipip: each VIP on loopback (so the target accepts packets for it and answers from
//!   it), and `arp_ignore=1` / `arp_announce=2` so the target never answers ARP for a VIP (which
//!   would steal the VIP from the balancer) nor announces it.
//! - ipip: loose `rp_filter` where it is strict, and lb's XDP decap program on the interface.
//!
//! Every step can be checked without changing anything (`--check`) and reverted (`--undo`):
//! sysctls go back to the values saved when lb first changed them.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use aya::{Ebpf, maps::HashMap, programs::Xdp};

use crate::{
    config::Forwarding,
    maps::be,
    net::Interface,
    xdp::{XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE, netlink_set_xdp},
};

pub const DECAP_PROGRAM: &str = "lb_decap";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Apply,
    Check,
    Undo,
}

/// One thing a target host needs.
enum Step {
    VipOnLoopback(Ipv4Addr),
    Sysctl {
        key: String,
        want: &'static str,
    },
    /// Loose reverse-path filtering on the interface where the effective mode is strict.
    RpFilterLoose(String),
    Decap(String),
}

impl Step {
    fn describe(&self) -> String {
        match self {
            Step::VipOnLoopback(vip) => format!("VIP {vip}/32 on lo"),
            Step::Sysctl { key, want } => format!("{key} = {want}"),
            Step::RpFilterLoose(iface) => format!("rp_filter on {iface} not strict"),
            Step::Decap(iface) => format!("XDP decap ({DECAP_PROGRAM}) on {iface}"),
        }
    }

    fn is_done(&self) -> Result<bool> {
        Ok(match self {
            Step::VipOnLoopback(vip) => Interface::lookup("lo")?.ipv4.contains(vip),
            Step::Sysctl { key, want } => read_sysctl(key)? == *want,
            Step::RpFilterLoose(iface) => effective_rp_filter(iface)? != "1",
            Step::Decap(iface) => attached_program(iface)?.as_deref() == Some(DECAP_PROGRAM),
        })
    }

    fn apply(&self, saved: &mut SavedState) -> Result<()> {
        match self {
            Step::VipOnLoopback(vip) => ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"]),
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
        }
    }

    fn undo(&self, saved: &SavedState) -> Result<()> {
        match self {
            Step::VipOnLoopback(vip) => ip(&["addr", "del", &format!("{vip}/32"), "dev", "lo"]),
            Step::Sysctl { key, .. } => saved.restore(key),
            Step::RpFilterLoose(iface) => {
                saved.restore(&format!("net.ipv4.conf.{iface}.rp_filter"))
            }
            Step::Decap(iface) => detach_decap(iface),
        }
    }
}

fn steps(iface: &str, mode: Forwarding, vips: &[Ipv4Addr]) -> Vec<Step> {
    let mut steps: Vec<Step> = vips.iter().map(|&v| Step::VipOnLoopback(v)).collect();
    for scope in ["all", iface] {
        steps.push(Step::Sysctl {
            key: format!("net.ipv4.conf.{scope}.arp_ignore"),
            want: "1",
        });
        steps.push(Step::Sysctl {
            key: format!("net.ipv4.conf.{scope}.arp_announce"),
            want: "2",
        });
    }
    if mode == Forwarding::Ipip {
        steps.push(Step::RpFilterLoose(iface.to_owned()));
        steps.push(Step::Decap(iface.to_owned()));
    }
    steps
}

/// Runs `lb target`; returns whether the host is (or, after --undo, was left) as asked.
pub fn run(iface: &str, mode: Forwarding, vips: &[Ipv4Addr], action: Action) -> Result<bool> {
    Interface::lookup(iface)?;
    if vips.is_empty() {
        bail!("give at least one --vip");
    }
    let steps = steps(iface, mode, vips);
    let mut saved = SavedState::load(iface)?;
    let mut all_ok = true;
    for step in &steps {
        let done = step.is_done()?;
        match action {
            Action::Check => {
                println!(
                    "{} {}",
                    if done { "ok     " } else { "missing" },
                    step.describe()
                );
                all_ok &= done;
            }
            Action::Apply if done => println!("ok      {}", step.describe()),
            Action::Apply => {
                step.apply(&mut saved)
                    .with_context(|| format!("setting {}", step.describe()))?;
                println!("set     {}", step.describe());
            }
            Action::Undo
                if !done && !matches!(step, Step::Sysctl { .. } | Step::RpFilterLoose(_)) => {}
            Action::Undo => {
                step.undo(&saved)
                    .with_context(|| format!("reverting {}", step.describe()))?;
                println!("undone  {}", step.describe());
            }
        }
    }
    match action {
        Action::Apply => saved.store()?,
        Action::Undo => saved.forget()?,
        Action::Check => {}
    }
    Ok(all_ok)
}

// ---------------------------------------------------------------------------------------------

fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

fn read_sysctl(key: &str) -> Result<String> {
    let path = sysctl_path(key);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
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

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Name of the XDP program attached to `iface`, if any.
fn attached_program(iface: &str) -> Result<Option<String>> {
    let out = Command::new("ip")
        .args(["-j", "-d", "link", "show", "dev", iface])
        .output()
        .context("running `ip link show`")?;
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let xdp = links.first().map(|l| &l["xdp"]);
    Ok(xdp.and_then(|x| {
        x["prog"]["name"]
            .as_str()
            .or_else(|| x["attached"][0]["prog"]["name"].as_str())
            .map(str::to_owned)
    }))
}

/// Loads the decap object, tells it this host's addresses, and attaches it through netlink so
/// it stays after `lb target` exits.
fn attach_decap(iface: &str) -> Result<()> {
    let iface = Interface::lookup(iface)?;
    let mut ebpf = Ebpf::load(crate::DECAP_OBJECT).map_err(crate::xdp::explain_load_error)?;
    let mut local: HashMap<_, u32, u8> = HashMap::try_from(
        ebpf.map_mut("LOCAL_ADDRS")
            .context("LOCAL_ADDRS missing from the decap object")?,
    )?;
    for addr in &iface.ipv4 {
        local.insert(be(*addr), 1, 0)?;
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
}

impl SavedState {
    fn load(iface: &str) -> Result<Self> {
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        let path = PathBuf::from(format!("/run/lb/target-{netns}-{iface}.json"));
        let values = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        Ok(SavedState { path, values })
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
        std::fs::write(&self.path, serde_json::to_vec_pretty(&self.values)?)
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
