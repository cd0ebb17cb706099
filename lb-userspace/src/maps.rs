//! The data plane's maps: what goes in them for a config, and writing it there.
//!
//! [`MapState::build`] turns a validated config (plus the interface and the targets' MACs) into
//! exactly the entries the XDP program reads; it does no I/O, so tests can build states with
//! made-up MACs. [`Dataplane`] owns the loaded program and writes a state into its maps.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::Xdp,
};
use lb_common::{
    Counters, DropReason, FORWARDING_DSR, FORWARDING_IPIP, Flow, FlowKey, Group, Listener,
    ListenerKey, SETTINGS_KEY, Settings, TARGET_ACTIVE, Target,
};

use crate::{
    config::{self, Config, Forwarding},
    maglev,
    net::Interface,
};

/// Name of the balancer program in the embedded object.
pub const BALANCER_PROGRAM: &str = "lb_balancer";

/// Everything the data plane needs, indexed as the maps are.
#[derive(Clone, Debug, PartialEq)]
pub struct MapState {
    pub settings: Settings,
    pub listeners: Vec<(ListenerKey, Listener)>,
    pub vips: Vec<u32>,
    /// Index = target id. A target in two groups has two ids.
    pub targets: Vec<Target>,
    /// Index = group id, in config order.
    pub groups: Vec<GroupState>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    pub forwarding: u32,
    /// Maglev table of target ids; empty when the group has no target.
    pub table: Vec<u32>,
    pub target_count: u32,
}

impl MapState {
    /// `next_hop_mac` gives, for a target of a group, the MAC its frames are sent to.
    pub fn build(
        config: &Config,
        iface: &Interface,
        mut next_hop_mac: impl FnMut(&config::TargetGroup, &config::Target) -> Result<[u8; 6]>,
    ) -> Result<Self> {
        let settings = Settings {
            iface_mac: iface.mac,
            pad: 0,
            iface_addr: be(iface.primary_ipv4()?),
            maglev_size: config.settings.maglev_table_size,
            hash_seed: config.settings.hash_seed,
            mtu: iface.mtu,
        };
        let mut targets = Vec::new();
        let mut groups = Vec::new();
        for (gid, group) in config.target_groups.iter().enumerate() {
            let first_id = targets.len() as u32;
            for t in &group.targets {
                targets.push(Target {
                    addr: be(t.address),
                    group: gid as u32,
                    mac: next_hop_mac(group, t)?,
                    state: TARGET_ACTIVE,
                });
            }
            let entries: Vec<maglev::Entry> = group
                .targets
                .iter()
                .map(|t| maglev::Entry {
                    address: t.address,
                    port: t.port,
                    weight: t.weight,
                })
                .collect();
            let table = maglev::build(
                &entries,
                config.settings.maglev_table_size,
                config.settings.hash_seed,
            )
            .into_iter()
            .map(|i| first_id + i)
            .collect();
            groups.push(GroupState {
                forwarding: match group.forwarding {
                    Forwarding::Dsr => FORWARDING_DSR,
                    Forwarding::Ipip => FORWARDING_IPIP,
                },
                table,
                target_count: group.targets.len() as u32,
            });
        }
        let mut listeners = Vec::new();
        let mut vips = Vec::new();
        for (id, l) in config.listeners.iter().enumerate() {
            let group = config
                .target_groups
                .iter()
                .position(|g| g.name == l.target_group)
                .ok_or_else(|| anyhow!("listener {} has no target group", l.name))?;
            for &proto in l.protocol.ip_protocols() {
                listeners.push((
                    ListenerKey {
                        addr: be(l.address),
                        port: l.port.to_be(),
                        proto,
                        pad: 0,
                    },
                    Listener {
                        id: id as u32,
                        group: group as u32,
                    },
                ));
            }
            if !vips.contains(&be(l.address)) {
                vips.push(be(l.address));
            }
        }
        Ok(MapState {
            settings,
            listeners,
            vips,
            targets,
            groups,
        })
    }
}

/// An IPv4 address as the maps hold it: network byte order in a native `u32`.
pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The loaded balancer: its program and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    maglev_size: u32,
}

impl Dataplane {
    /// Loads the embedded balancer with maps sized for `settings`. Not yet attached anywhere.
    pub fn load(settings: &config::Settings) -> Result<Self> {
        let maglev_slots = settings.max_target_groups * 2 * settings.maglev_table_size;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS", settings.connection_table_size)
            .map_max_entries("GROUPS", settings.max_target_groups)
            .map_max_entries("MAGLEV", maglev_slots)
            .load(crate::BALANCER_OBJECT)
            .map_err(crate::xdp::explain_load_error)?;
        let program: &mut Xdp = ebpf
            .program_mut(BALANCER_PROGRAM)
            .context("balancer program missing from the embedded object")?
            .try_into()?;
        program.load().map_err(crate::xdp::explain_program_error)?;
        Ok(Dataplane {
            ebpf,
            maglev_size: settings.maglev_table_size,
        })
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(BALANCER_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load")
    }

    /// Writes a complete state. Listeners go in last, so traffic is only claimed once
    /// everything it needs is in place.
    pub fn write(&mut self, state: &MapState) -> Result<()> {
        if state.settings.maglev_size != self.maglev_size {
            return Err(anyhow!(
                "maglev_table_size changed from {} to {}: restart lb to apply it",
                self.maglev_size,
                state.settings.maglev_size
            ));
        }
        let mut settings: Array<_, Settings> = self.map("SETTINGS")?;
        settings.set(SETTINGS_KEY, state.settings, 0)?;

        let mut targets: Array<_, Target> = self.map("TARGETS")?;
        for (id, t) in state.targets.iter().enumerate() {
            targets.set(id as u32, *t, 0)?;
        }
        for (gid, g) in state.groups.iter().enumerate() {
            self.write_group(gid as u32, g)?;
        }
        let mut vips: HashMap<_, u32, u32> = self.map("VIPS")?;
        for vip in &state.vips {
            vips.insert(vip, 1, 0)?;
        }
        let mut listeners: HashMap<_, ListenerKey, Listener> = self.map("LISTENERS")?;
        for (key, value) in &state.listeners {
            listeners.insert(key, value, 0)?;
        }
        Ok(())
    }

    /// Fills the group's inactive table half, then makes it live with one write.
    fn write_group(&mut self, gid: u32, group: &GroupState) -> Result<()> {
        let size = self.maglev_size;
        let current = self.map::<Array<_, Group>>("GROUPS")?.get(&gid, 0)?;
        let half = if current.targets == 0 {
            0
        } else {
            current.active_half ^ 1
        };
        let mut maglev: Array<_, u32> = self.map("MAGLEV")?;
        let base = (gid * 2 + half) * size;
        for (slot, id) in group.table.iter().enumerate() {
            maglev.set(base + slot as u32, id, 0)?;
        }
        let live = Group {
            active_half: half,
            targets: group.target_count,
            forwarding: group.forwarding,
            pad: 0,
        };
        self.map::<Array<_, Group>>("GROUPS")?.set(gid, live, 0)?;
        Ok(())
    }

    /// The connection table's entry for a flow, if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Flow>> {
        let flows: HashMap<&MapData, FlowKey, Flow> = self.map_ref("FLOWS")?;
        match flows.get(key, 0) {
            Ok(flow) => Ok(Some(flow)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Counters of listener `id`, summed over CPUs.
    pub fn listener_counters(&self, id: u32) -> Result<Counters> {
        self.sum_counters("LISTENER_STATS", id)
    }

    /// Counters of target `id`, summed over CPUs.
    pub fn target_counters(&self, id: u32) -> Result<Counters> {
        self.sum_counters("TARGET_STATS", id)
    }

    /// Drops per reason, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<(DropReason, u64)>> {
        let drops: PerCpuArray<&MapData, u64> = self.map_ref("DROPS")?;
        DropReason::ALL
            .iter()
            .map(|&r| Ok((r, drops.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    fn sum_counters(&self, map: &str, id: u32) -> Result<Counters> {
        let stats: PerCpuArray<&MapData, Counters> = self.map_ref(map)?;
        let per_cpu: PerCpuValues<Counters> = stats.get(&id, 0)?;
        Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        }))
    }

    fn map<'a, T>(&'a mut self, name: &str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the embedded object"))?;
        Ok(T::try_from(map)?)
    }

    fn map_ref<'a, T>(&'a self, name: &str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the embedded object"))?;
        Ok(T::try_from(map)?)
    }
}
