//! The data plane's maps: what goes in them for a config, and writing it there.
//!
//! [`MapState::build`] turns a validated config (plus the interfaces and the targets' MACs) into
//! exactly the entries the XDP program reads; it does no I/O, so tests can build states with
//! made-up MACs. [`Dataplane`] owns the loaded program and writes a state into its maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, MapData, PerCpuArray, PerCpuValues, ProgramArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::Xdp,
};
use lb_common::{
    ALGORITHM_LEAST_CONNECTIONS, ALGORITHM_MAGLEV, ALGORITHM_ROUND_ROBIN, ALGORITHM_SOURCE_IP,
    Counters, DropReason, Egress, FLOW_CLOSING, FLOW_ENDED, FLOW_FLAGS, FLOW_REVERSE, FLOW_WAYS,
    FORWARDING_DSR, FORWARDING_IPIP, FORWARDING_NAT, FlowBucket, FlowBucket6, FlowEntry,
    FlowHasher, FlowKey, FlowKey6, FlowKeyOf, FlowTable, Group, IcmpCounter, LISTENER_ALLOW_LIST,
    LISTENER_PROBES, LISTENER_RATE_LIMITED, LISTENER_SLOTS, Listener, ListenerKey, ListenerKey6,
    ListenerKeyOf, ListenerSlot, ListenerSlot6, ListenerTable, MAP_LAYOUT, MAX_INTERFACES,
    MAX_SOURCE_PREFIXES, MAX_TARGETS, NewFlowLimits, RateLimit, SETTINGS_KEY, STAGE_PROGRAMS,
    Settings, SourceKey, SourceKey6, Sticky, TARGET_ACTIVE, TARGET_DRAINING, TARGET_FREE,
    TARGET_UNHEALTHY, Target, refused_index,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    config::{self, Config, Forwarding},
    health::TargetState,
    lifecycle::{Registry, TargetKey},
    maglev,
    net::Interface,
    round_robin,
};

/// Name of the balancer program in the embedded object.
pub const BALANCER_PROGRAM: &str = "lb_balancer";

/// Every map of the balancer and the size of its values: all are pinned, so that a successor
/// adopts them, which it can only if its maps have the same layout. `STAGES` too, though each
/// lb fills it with its own programs: the kernel empties a program array that nothing holds
/// any more, and a balancer whose lb died must go on handing frames to its stages.
const MAPS: [(&str, usize); 31] = [
    ("STAGES", size_of::<u32>()),
    ("LISTENER_SLOTS", size_of::<ListenerSlot>()),
    ("LISTENER_SLOTS6", size_of::<ListenerSlot6>()),
    ("FLOWS6", size_of::<FlowBucket6>()),
    ("STICKY6", size_of::<Sticky>()),
    ("ALLOWED_SOURCES6", size_of::<u8>()),
    ("DENIED_SOURCES6", size_of::<u8>()),
    ("SOURCE_BUCKETS6", size_of::<u64>()),
    ("LISTENERS_BY_ID", size_of::<ListenerSlot>()),
    ("LISTENERS_BY_ID6", size_of::<ListenerSlot6>()),
    ("HANDOFF", size_of::<lb_common::Handoff>()),
    ("LISTENER_TABLE", size_of::<ListenerTable>()),
    ("FLOWS", size_of::<FlowBucket>()),
    ("FLOW_TABLE", size_of::<FlowTable>()),
    ("TARGETS", size_of::<Target>()),
    ("GROUPS", size_of::<Group>()),
    ("MAGLEV", size_of::<u32>()),
    ("ROUND_ROBIN", size_of::<u64>()),
    ("ACTIVE", size_of::<u64>()),
    ("STICKY", size_of::<Sticky>()),
    ("ALLOWED_SOURCES", size_of::<u8>()),
    ("DENIED_SOURCES", size_of::<u8>()),
    ("NEW_FLOW_LIMITS", size_of::<NewFlowLimits>()),
    ("LISTENER_BUCKETS", size_of::<u64>()),
    ("SOURCE_BUCKETS", size_of::<u64>()),
    ("SETTINGS", size_of::<Settings>()),
    ("LISTENER_STATS", size_of::<Counters>()),
    ("TARGET_STATS", size_of::<Counters>()),
    ("DROPS", size_of::<u64>()),
    ("LISTENER_REFUSED", size_of::<u64>()),
    ("ICMP", size_of::<u64>()),
];

/// The MAC of a target whose next hop is not known: no frame is ever sent to it, since such a
/// target takes no flows, but the maps hold this until the MAC is learnt.
pub const UNRESOLVED_MAC: [u8; 6] = [0; 6];

/// Where the frames for a target go: out of which of the balancer's interfaces (an index into
/// the list `lb run` was given), to which MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub interface: usize,
    pub mac: [u8; 6],
}

/// Everything the data plane needs, keyed as the maps are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapState {
    pub settings: Option<Settings>,
    pub listeners: HashMap<ListenerKey, Listener>,
    pub vips: HashSet<u32>,
    /// The same for IPv6 VIPs.
    pub listeners6: HashMap<ListenerKey6, Listener>,
    pub vips6: HashSet<[u32; 4]>,
    /// By target id. A target in two groups has two ids.
    pub targets: BTreeMap<u32, Target>,
    /// By group id.
    pub groups: BTreeMap<u32, GroupState>,
    /// The keys of the source tries: listeners' allowed prefixes, and the denied ones.
    pub allowed_sources: BTreeSet<(u32, SourceKey)>,
    pub denied_sources: BTreeSet<(u32, SourceKey)>,
    pub allowed_sources6: BTreeSet<(u32, SourceKey6)>,
    pub denied_sources6: BTreeSet<(u32, SourceKey6)>,
    /// The limits on new flows of each listener that has any, by listener id.
    pub limits: BTreeMap<u32, NewFlowLimits>,
}

/// The source-trie key of prefix `net` for listener `id` (0 in the deny-list): its prefix
/// length, and the data (see [`SourceKey`]).
fn source_key(id: u32, net: &Ipv4Net) -> (u32, SourceKey) {
    (32 + net.prefix_len() as u32, [id, be(net.network())])
}

/// The same for an IPv6 prefix (see [`SourceKey6`]).
fn source_key6(id: u32, net: &Ipv6Net) -> (u32, SourceKey6) {
    let [a, b, c, d] = be6(net.network());
    (32 + net.prefix_len() as u32, [id, a, b, c, d])
}

impl MapState {
    /// Adds prefix `net` of listener `id` (0: the deny-list) to the allowed (or `denied`)
    /// sources of its family.
    fn add_source(&mut self, denied: bool, id: u32, net: &IpNet) {
        match (net, denied) {
            (IpNet::V4(n), false) => self.allowed_sources.insert(source_key(id, n)),
            (IpNet::V4(n), true) => self.denied_sources.insert(source_key(id, n)),
            (IpNet::V6(n), false) => self.allowed_sources6.insert(source_key6(id, n)),
            (IpNet::V6(n), true) => self.denied_sources6.insert(source_key6(id, n)),
        };
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    pub forwarding: u32,
    pub algorithm: u32,
    /// Target ids: a Maglev table, a round-robin sequence, or each target once (least
    /// connections); empty when no target takes new flows.
    pub table: Vec<u32>,
    /// How many targets the table holds.
    pub target_count: u32,
    /// 0, or how many seconds a client keeps its target.
    pub stickiness_s: u32,
}

impl MapState {
    /// The maps for `config`, with the ids and states of `registry` (which must be in sync with
    /// it), for a balancer on `interfaces`. `next_hop` says where a target's frames are sent:
    /// a target without one (its MAC is not known) takes no new flows.
    pub fn build(
        config: &Config,
        registry: &Registry,
        interfaces: &[Interface],
        next_hop: impl Fn(&TargetKey) -> Option<NextHop>,
    ) -> Result<Self> {
        if interfaces.len() > MAX_INTERFACES {
            return Err(anyhow!(
                "lb runs on at most {MAX_INTERFACES} interfaces, not {}",
                interfaces.len()
            ));
        }
        let mut egress = [Egress::default(); MAX_INTERFACES];
        for (out, iface) in egress.iter_mut().zip(interfaces) {
            *out = Egress {
                ifindex: iface.index,
                addr: be(iface.primary_ipv4()?),
                mtu: iface.mtu,
                mac: iface.mac,
                pad: 0,
                addr6: iface.global_ipv6().map(be6).unwrap_or_default(),
            };
        }
        let settings = Settings {
            maglev_size: config.settings.maglev_table_size,
            nat: match config.nat_families() {
                [v4, v6] => {
                    (if v4 { lb_common::NAT_IPV4 } else { 0 })
                        | (if v6 { lb_common::NAT_IPV6 } else { 0 })
                }
            },
            denied_sources: config
                .denied_sources
                .iter()
                .map(|net| if net.network().is_ipv6() { 2 } else { 1 })
                .fold(0, |bits, bit| bits | bit),
            answer_ping: config.settings.answer_ping as u32,
            ipv6: config.settings.ipv6 as u32,
            pad: 0,
            interfaces: egress,
            pick: FlowHasher::from_seed(config.settings.hash_seed),
        };
        let mut state = MapState {
            settings: Some(settings),
            ..MapState::default()
        };
        for group in &config.target_groups {
            let gid = registry
                .group_id(&group.name)
                .ok_or_else(|| anyhow!("target group {} has no id", group.name))?;
            let usable: Vec<(&TargetKey, u32, u32)> = registry
                .usable(&group.name)
                .filter(|(k, _)| next_hop(k).is_some())
                .map(|(k, e)| (k, e.id, e.weight))
                .collect();
            let usable_ids: HashSet<u32> = usable.iter().map(|&(_, id, _)| id).collect();
            for (key, entry) in registry.targets().filter(|(k, _)| k.group == group.name) {
                let known = next_hop(key);
                // Without a MAC, not even a draining target's established flows may go on.
                let state_flag = match entry.state() {
                    _ if known.is_none() => TARGET_UNHEALTHY,
                    TargetState::Draining => TARGET_DRAINING,
                    _ if usable_ids.contains(&entry.id) => TARGET_ACTIVE,
                    _ => TARGET_UNHEALTHY,
                };
                let hop = known.unwrap_or(NextHop {
                    interface: 0,
                    mac: UNRESOLVED_MAC,
                });
                if hop.interface >= interfaces.len() {
                    return Err(anyhow!(
                        "{key} is sent out of interface {} of {}",
                        hop.interface,
                        interfaces.len()
                    ));
                }
                state.targets.insert(
                    entry.id,
                    Target {
                        group: gid,
                        mac: hop.mac,
                        state: state_flag,
                        port: key.addr.port().to_be(),
                        egress: hop.interface as u16,
                        weight: entry.weight as u16,
                        ..target_address(key.addr.ip())
                    },
                );
            }
            let entries: Vec<maglev::Entry> = usable
                .iter()
                .map(|(k, _, weight)| maglev::Entry {
                    address: k.addr.ip(),
                    port: k.addr.port(),
                    weight: *weight,
                })
                .collect();
            let algorithm = match group.algorithm {
                config::Algorithm::Maglev => ALGORITHM_MAGLEV,
                config::Algorithm::SourceIp => ALGORITHM_SOURCE_IP,
                config::Algorithm::RoundRobin => ALGORITHM_ROUND_ROBIN,
                config::Algorithm::LeastConnections => ALGORITHM_LEAST_CONNECTIONS,
            };
            // In the order Maglev fills in, so a sequence depends only on the targets.
            let mut order: Vec<usize> = (0..entries.len()).collect();
            order.sort_by_key(|&i| entries[i]);
            let table = if algorithm == ALGORITHM_ROUND_ROBIN {
                let weights: Vec<u32> = order.iter().map(|&i| entries[i].weight).collect();
                round_robin::sequence(&weights, settings.maglev_size as usize)
                    .into_iter()
                    .map(|turn| usable[order[turn as usize]].1)
                    .collect()
            } else if algorithm == ALGORITHM_LEAST_CONNECTIONS {
                order.iter().map(|&i| usable[i].1).collect()
            } else {
                maglev::build(&entries, settings.maglev_size, config.settings.hash_seed)
                    .into_iter()
                    .map(|i| usable[i as usize].1)
                    .collect()
            };
            state.groups.insert(
                gid,
                GroupState {
                    forwarding: match group.forwarding {
                        Forwarding::Dsr => FORWARDING_DSR,
                        Forwarding::Ipip => FORWARDING_IPIP,
                        Forwarding::Nat => FORWARDING_NAT,
                    },
                    algorithm,
                    table,
                    target_count: usable.len() as u32,
                    stickiness_s: group.stickiness.map_or(0, |d| d.as_secs() as u32),
                },
            );
        }
        for l in &config.listeners {
            let id = registry
                .listener_id(&l.name)
                .ok_or_else(|| anyhow!("listener {} has no id", l.name))?;
            let group = registry
                .group_id(&l.target_group)
                .ok_or_else(|| anyhow!("listener {} has no target group", l.name))?;
            let limits = (l.max_new_flows_per_second.is_some()
                || l.max_new_flows_per_second_per_source.is_some())
            .then(|| NewFlowLimits {
                listener: RateLimit::per_second(l.max_new_flows_per_second.unwrap_or(0)),
                source: RateLimit::per_second(l.max_new_flows_per_second_per_source.unwrap_or(0)),
            });
            if let Some(limits) = limits {
                state.limits.insert(id, limits);
            }
            for &proto in l.protocol.ip_protocols() {
                let listener = Listener {
                    id,
                    group,
                    idle_timeout_s: l.idle_timeout(proto).as_secs().max(1) as u32,
                    flags: if l.allowed_sources.is_some() {
                        LISTENER_ALLOW_LIST
                    } else {
                        0
                    } | if limits.is_some() {
                        LISTENER_RATE_LIMITED
                    } else {
                        0
                    },
                };
                let port = l.port.to_be();
                match l.address {
                    IpAddr::V4(vip) => {
                        let key = ListenerKey::new(be(vip), port, proto);
                        state.listeners.insert(key, listener);
                    }
                    IpAddr::V6(vip) => {
                        let key = ListenerKey6::new(be6(vip), port, proto);
                        state.listeners6.insert(key, listener);
                    }
                }
            }
            match l.address {
                IpAddr::V4(vip) => state.vips.insert(be(vip)),
                IpAddr::V6(vip) => state.vips6.insert(be6(vip)),
            };
            for net in l.allowed_sources.iter().flatten() {
                state.add_source(false, id, net);
            }
        }
        for net in &config.denied_sources {
            state.add_source(true, 0, net);
        }
        Ok(state)
    }
}

/// One half of a listener table holding every listener key and VIP of its family, each within
/// `LISTENER_PROBES` slots of its home, and the seed that placed them so: the first of a few
/// that does. Keys go in a fixed order, so the same listeners always give the same table.
pub fn place_listeners<K: ListenerKeyOf + aya::Pod + Default>(
    listeners: &HashMap<K, Listener>,
    vips: &HashSet<K::Addr>,
) -> Result<(u32, Vec<ListenerSlot<K>>)> {
    let mut entries: Vec<ListenerSlot<K>> = listeners
        .iter()
        .map(|(&key, &listener)| ListenerSlot { key, listener })
        .chain(vips.iter().map(|&vip| ListenerSlot {
            key: K::vip(vip),
            listener: Listener::default(),
        }))
        .collect();
    if entries.len() > LISTENER_SLOTS as usize / 4 {
        return Err(anyhow!(
            "{} listener keys and VIPs: the listener table holds at most {}",
            entries.len(),
            LISTENER_SLOTS / 4
        ));
    }
    entries.sort_by_key(|e| bytes_of(&e.key).to_vec());
    'seeds: for seed in 0..64 {
        let mut slots = vec![ListenerSlot::<K>::default(); LISTENER_SLOTS as usize];
        for entry in &entries {
            let home = entry.key.home(seed);
            let free = (0..LISTENER_PROBES)
                .map(|i| ((home + i) & (LISTENER_SLOTS - 1)) as usize)
                .find(|&i| slots[i].key.is_empty());
            match free {
                Some(i) => slots[i] = *entry,
                None => continue 'seeds,
            }
        }
        return Ok((seed, slots));
    }
    Err(anyhow!(
        "no seed places {} listener keys and VIPs in the listener table",
        entries.len()
    ))
}

/// The bytes of a map key or value.
fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain bytes without padding.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// A map's shape and the memory the kernel charges for it (`memlock` in its fdinfo).
#[derive(Clone, Debug)]
pub struct MapMemory {
    pub name: &'static str,
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub bytes: u64,
}

/// The map data behind the kinds of map the balancer uses.
fn map_data(map: &aya::maps::Map) -> Option<&MapData> {
    use aya::maps::Map;
    match map {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::LruHashMap(d)
        | Map::LpmTrie(d)
        | Map::ProgramArray(d) => Some(d),
        _ => None,
    }
}

/// An array map mapped into this process (it is `BPF_F_MMAPABLE`): read as memory instead of a
/// system call per entry, and written only with atomic operations, as the data plane writes it.
struct Mapped<T> {
    first: *mut T,
    count: u32,
    bytes: usize,
}

// SAFETY: the mapping lives until `drop`; it is read by copying and written atomically.
unsafe impl<T> Send for Mapped<T> {}
unsafe impl<T> Sync for Mapped<T> {}

impl<T: Copy> Mapped<T> {
    /// Maps the `count` values of the array map `data` (`what`, for errors).
    fn map(data: &MapData, count: u32, what: &str) -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (count as usize * size_of::<T>()).next_multiple_of(page);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
        // SAFETY: a new shared mapping of the map's memory; nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("mapping {what}"));
        }
        Ok(Mapped {
            first: ptr as *mut T,
            count,
            bytes,
        })
    }

    /// Value `index`, or none past the end.
    fn at(&self, index: u32) -> Option<*mut T> {
        // SAFETY: in bounds (checked) of a live mapping.
        (index < self.count).then(|| unsafe { self.first.add(index as usize) })
    }

    /// A copy of value `index`, as the data plane left it at that moment. The data plane writes
    /// while we read: a torn connection-table entry is what its `check` detects.
    fn get(&self, index: u32) -> Option<T> {
        // SAFETY: a valid pointer into the live mapping.
        self.at(index).map(|p| unsafe { p.read_volatile() })
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing refers to any more.
        unsafe { libc::munmap(self.first as *mut libc::c_void, self.bytes) };
    }
}

/// The 64-bit word at `word` of a mapping, as an atomic: the data plane updates it with atomic
/// instructions on the same memory.
fn atomic(word: *mut u64) -> &'static AtomicU64 {
    // SAFETY: 8-byte aligned (map values are) and valid while the mapping lives; the callers
    // use the reference only while they hold the mapping.
    unsafe { AtomicU64::from_ptr(word) }
}

/// What a whole forward entry of the connection table stands for at `now`.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// A flow of `listener` that keeps its target: seen within the idle timeout, not closed,
    /// and its target still takes or drains flows. `counted`: the client has not ended it.
    Live { listener: u32, counted: bool },
    /// Over: idle, closed, or its target or listener gone. `counted`: still counted.
    Stale { counted: bool },
}

/// A connection-table key of either family, as the controller reads the table.
pub trait TableKey: FlowKeyOf + aya::Pod {
    /// The listener of the flow with this key, in `state`.
    fn listener<'a>(&self, state: &'a MapState) -> Option<&'a Listener>;
    /// Its family's connection table in `dataplane`.
    fn table(dataplane: &Dataplane) -> &FlowMap<Self>;
}

impl TableKey for FlowKey {
    fn listener<'a>(&self, state: &'a MapState) -> Option<&'a Listener> {
        state
            .listeners
            .get(&ListenerKey::new(self.dst, self.dport, self.proto))
    }

    fn table(dataplane: &Dataplane) -> &FlowMap<Self> {
        &dataplane.flows
    }
}

impl TableKey for FlowKey6 {
    fn listener<'a>(&self, state: &'a MapState) -> Option<&'a Listener> {
        state
            .listeners6
            .get(&ListenerKey6::new(self.dst, self.dport, self.proto))
    }

    fn table(dataplane: &Dataplane) -> &FlowMap<Self> {
        &dataplane.flows6
    }
}

fn standing<K: TableKey>(flow: &FlowEntry<K>, state: &MapState, now: u64) -> Standing {
    let counted = flow.last_seen_ns & FLOW_ENDED == 0;
    let Some(listener) = flow.key.listener(state) else {
        return Standing::Stale { counted };
    };
    let idle_ns = now.saturating_sub(flow.last_seen_ns & !FLOW_FLAGS);
    let target_live = state.targets.get(&flow.target).is_some_and(|t| {
        t.group == listener.group && (t.state == TARGET_ACTIVE || t.state == TARGET_DRAINING)
    });
    if target_live
        && flow.last_seen_ns & FLOW_CLOSING == 0
        && idle_ns <= listener.idle_timeout_s as u64 * 1_000_000_000
    {
        Standing::Live {
            listener: listener.id,
            counted,
        }
    } else {
        Standing::Stale { counted }
    }
}

/// What to add (wrapping) to each target's count of active connections, counted `before` by
/// the data plane, to make it the connection table's `truth`.
fn corrections(before: &[u64], truth: &HashMap<u32, u64>) -> Vec<(u32, u64)> {
    (0..)
        .zip(before)
        .map(|(id, &counted)| {
            (
                id,
                truth.get(&id).copied().unwrap_or(0).wrapping_sub(counted),
            )
        })
        .filter(|&(_, error)| error != 0)
        .collect()
}

/// The part of two errors of one count, found by consecutive passes, that both show: none if
/// they differ in sign, else the smaller.
fn agreed(last: i64, now: i64) -> i64 {
    if last.signum() == now.signum() {
        now.signum() * last.abs().min(now.abs())
    } else {
        0
    }
}

/// [`Dataplane::survey`] of one connection table, adding to `active`.
fn survey_table<K: TableKey>(
    table: &FlowMap<K>,
    state: &MapState,
    now: u64,
    end_stale: bool,
    active: &mut ActiveFlows,
) {
    for b in 0..table.shape.buckets {
        let Some(bucket) = table.buckets.at(b) else {
            continue;
        };
        for way in 0..FLOW_WAYS {
            // SAFETY: `way` < FLOW_WAYS, within a bucket of the live mapping. A torn copy (the
            // data plane writes meanwhile) is what `is_whole` detects.
            let at = unsafe { (bucket as *mut FlowEntry<K>).add(way) };
            let flow = unsafe { at.read_volatile() };
            if flow.target & FLOW_REVERSE != 0 || !table.shape.is_whole(&flow) {
                continue;
            }
            match standing(&flow, state, now) {
                Standing::Live { listener, counted } => {
                    *active.listeners.entry(listener).or_default() += 1;
                    *active.targets.entry(flow.target).or_default() += 1;
                    if counted {
                        *active.connections.entry(flow.target).or_default() += 1;
                    }
                }
                Standing::Stale { counted: true } if end_stale => {
                    // SAFETY: as above; an atomic on the entry's last-seen word.
                    let seen = unsafe { &raw mut (*at).last_seen_ns };
                    let _ = atomic(seen).compare_exchange(
                        flow.last_seen_ns,
                        flow.last_seen_ns | FLOW_ENDED,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                Standing::Stale { .. } => {}
            }
        }
    }
}

/// The VIP a listener-table key marks, if it marks one (not a listener).
fn vip_of<K: ListenerKeyOf>(key: &K) -> Option<K::Addr> {
    (K::vip(key.address()) == *key).then(|| key.address())
}

/// Fresh random words from the kernel, for a connection table's hash.
fn random_words() -> Result<[u64; 11]> {
    let mut words = [0u64; 11];
    let len = size_of_val(&words);
    // SAFETY: getrandom writes at most `len` bytes into `words`.
    let got = unsafe { libc::getrandom(words.as_mut_ptr().cast(), len, 0) };
    if got != len as isize {
        return Err(std::io::Error::last_os_error()).context("getrandom");
    }
    Ok(words)
}

/// Active flows by listener id and by target id, and active connections by target id: what
/// the connection table says.
#[derive(Debug, Default)]
pub struct ActiveFlows {
    pub listeners: HashMap<u32, u64>,
    pub targets: HashMap<u32, u64>,
    /// Live flows that the client did not end (`FLOW_ENDED`).
    pub connections: HashMap<u32, u64>,
}

/// The clock of `bpf_ktime_get_coarse_ns`, which stamps the connection table.
fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A target's address as `Target` holds it: `addr`, or `ipv6` and `addr6`.
fn target_address(addr: IpAddr) -> Target {
    match addr {
        IpAddr::V4(a) => Target {
            addr: be(a),
            ..Target::default()
        },
        IpAddr::V6(a) => Target {
            ipv6: 1,
            addr6: be6(a),
            ..Target::default()
        },
    }
}

/// An IPv4 address as the maps hold it: network byte order in a native `u32`.
pub fn be(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// An IPv6 address as the maps hold it: four words of it in network byte order.
pub fn be6(addr: Ipv6Addr) -> [u32; 4] {
    let o = addr.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The IPv6 address four words of a map hold (`be6`'s inverse).
pub fn from_be6(words: [u32; 4]) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

/// A family's connection table: its shape and hash, and the table itself, mapped into this
/// process.
pub struct FlowMap<K> {
    pub shape: FlowTable,
    buckets: Mapped<FlowBucket<K>>,
}

/// The loaded balancer: its program and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    maglev_size: u32,
    /// What this process last wrote into each half of each group's Maglev table; unknown (so
    /// written in full) for maps it adopted.
    tables: HashMap<u32, [Option<Vec<u32>>; 2]>,
    /// The same for the two halves of each listener table.
    listener_halves: [Option<Vec<ListenerSlot>>; 2],
    listener_halves6: [Option<Vec<ListenerSlot6>>; 2],
    /// The connection tables, IPv4's and IPv6's.
    flows: FlowMap<FlowKey>,
    flows6: FlowMap<FlowKey6>,
    /// Active connections per target id, mapped into this process.
    active: Mapped<u64>,
    /// By target id: the error its count showed in the last pass of `reconcile_connections`
    /// and that was not corrected.
    unconfirmed: std::sync::Mutex<HashMap<u32, i64>>,
}

impl Dataplane {
    /// Loads the embedded balancer with maps sized for `settings`. Not yet attached anywhere.
    ///
    /// With `pin_dir`, every map is pinned there, and maps already pinned there (by an earlier
    /// lb on the same interface) are adopted with their contents, connection table included.
    pub fn load(settings: &config::Settings, pin_dir: Option<&Path>) -> Result<Self> {
        let maglev_slots = settings.max_target_groups * 2 * settings.maglev_table_size;
        let flow_buckets = settings.connection_table_size.div_ceil(FLOW_WAYS as u32);
        // IPv6's tables hold one entry unless a listener has an IPv6 VIP.
        let ipv6 = |size: u32| if settings.ipv6 { size } else { 1 };
        let flow_buckets6 = ipv6(flow_buckets);
        let sizes = [
            ("FLOWS", flow_buckets, "connection_table_size"),
            (
                "FLOWS6",
                flow_buckets6,
                "connection_table_size (or IPv6 listeners came or went)",
            ),
            ("GROUPS", settings.max_target_groups, "max_target_groups"),
            (
                "ROUND_ROBIN",
                settings.max_target_groups,
                "max_target_groups",
            ),
            (
                "MAGLEV",
                maglev_slots,
                "maglev_table_size or max_target_groups",
            ),
            (
                "STICKY",
                settings.stickiness_table_size,
                "stickiness_table_size",
            ),
            (
                "STICKY6",
                ipv6(settings.stickiness_table_size),
                "stickiness_table_size (or IPv6 listeners came or went)",
            ),
            (
                "SOURCE_BUCKETS",
                settings.rate_limited_sources,
                "rate_limited_sources",
            ),
            (
                "SOURCE_BUCKETS6",
                ipv6(settings.rate_limited_sources),
                "rate_limited_sources (or IPv6 listeners came or went)",
            ),
        ];
        let mut loader = EbpfLoader::new();
        for (map, size, _) in sizes {
            loader.map_max_entries(map, size);
        }
        if let Some(dir) = pin_dir {
            for (map, _) in MAPS {
                loader.map_pin_path(map, dir.join(map));
            }
        }
        let mut ebpf = loader
            .load(crate::BALANCER_OBJECT)
            .map_err(crate::xdp::explain_load_error)?;
        let pinned_in = || pin_dir.map_or_else(String::new, |d| d.display().to_string());
        // What the kernel says of each map: for adopted maps, what their creator made them.
        let info = |map: &str| ebpf.map(map).and_then(map_data).and_then(|d| d.info().ok());
        for (map, value_size) in MAPS {
            if info(map).is_some_and(|i| i.value_size() as usize != value_size) {
                return Err(anyhow!(
                    "the maps pinned in {} were made by an lb whose map {map} differs from this one's: it cannot take them over; stop the running lb (which removes them), then start this one",
                    pinned_in()
                ));
            }
        }
        for (map, size, setting) in sizes {
            if let Some(actual) = info(map).map(|i| i.max_entries())
                && actual != size
            {
                return Err(anyhow!(
                    "the maps pinned in {} hold {actual} {map} entries but the config asks for {size}: settings.{setting} changed, which needs a fresh start (stop lb, which removes them)",
                    pinned_in()
                ));
            }
        }
        let mut shape: Array<_, FlowTable> = Array::try_from(
            ebpf.map_mut("FLOW_TABLE")
                .context("map FLOW_TABLE missing from the embedded object")?,
        )?;
        // One shape per family (IPv4's first). An adopted table keeps its hash: its flows are
        // where that hash put them.
        let mut shapes = [FlowTable::default(); 2];
        for ((family, table), flow_buckets) in shapes
            .iter_mut()
            .enumerate()
            .zip([flow_buckets, flow_buckets6])
        {
            *table = shape.get(&(family as u32), 0)?;
            if table.buckets == 0 {
                *table = FlowTable {
                    buckets: flow_buckets,
                    layout: MAP_LAYOUT,
                    hasher: FlowHasher::new(random_words()?),
                };
                shape.set(family as u32, *table, 0)?;
            } else if table.layout != MAP_LAYOUT || table.buckets != flow_buckets {
                return Err(anyhow!(
                    "the maps pinned in {} were made by an lb whose maps hold or mean other things (layout {}, {} connection-table buckets; this lb: layout {MAP_LAYOUT}, {flow_buckets}): it cannot take them over; stop the running lb (which removes them), then start this one",
                    pinned_in(),
                    table.layout,
                    table.buckets
                ));
            }
        }
        let program: &mut Xdp = ebpf
            .program_mut(BALANCER_PROGRAM)
            .context("balancer program missing from the embedded object")?
            .try_into()?;
        program.load().map_err(crate::xdp::explain_program_error)?;
        // The programs it hands frames on to, each verified on its own, in place of those of
        // the lb this one takes over from, if any.
        let mut stages = Vec::new();
        for name in STAGE_PROGRAMS {
            let stage: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the embedded object"))?
                .try_into()?;
            stage.load().map_err(crate::xdp::explain_program_error)?;
            stages.push(stage.fd()?.try_clone()?);
        }
        let mut array = ProgramArray::try_from(
            ebpf.map_mut("STAGES")
                .context("map STAGES missing from the embedded object")?,
        )?;
        for (index, fd) in (0..).zip(&stages) {
            array.set(index, fd, 0)?;
        }
        let flows = FlowMap {
            shape: shapes[0],
            buckets: Mapped::map(
                ebpf.map("FLOWS").and_then(map_data).context("map FLOWS")?,
                shapes[0].buckets,
                "the connection table",
            )?,
        };
        let flows6 = FlowMap {
            shape: shapes[1],
            buckets: Mapped::map(
                ebpf.map("FLOWS6")
                    .and_then(map_data)
                    .context("map FLOWS6")?,
                shapes[1].buckets,
                "the IPv6 connection table",
            )?,
        };
        let active = Mapped::map(
            ebpf.map("ACTIVE")
                .and_then(map_data)
                .context("map ACTIVE")?,
            MAX_TARGETS,
            "the active connections",
        )?;
        Ok(Dataplane {
            ebpf,
            maglev_size: settings.maglev_table_size,
            tables: HashMap::new(),
            listener_halves: [None, None],
            listener_halves6: [None, None],
            flows,
            flows6,
            active,
            unconfirmed: Default::default(),
        })
    }

    /// Removes the pins of every map in `dir` (the maps go when the last user lets go).
    pub fn unpin(dir: &Path) -> Result<()> {
        for (map, _) in MAPS {
            match std::fs::remove_file(dir.join(map)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("unpinning {}", dir.join(map).display()));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// What the maps hold now, as far as [`Dataplane::apply`] needs it to write a difference:
    /// listeners, VIPs, targets and source prefixes. Groups are left out, so every table is
    /// written again.
    pub fn read_state(&self) -> Result<MapState> {
        let table: Array<&MapData, ListenerTable> = self.map_ref("LISTENER_TABLE")?;
        let half = table.get(&0, 0)?.active_half & 1;
        let (listeners, vips) = self.read_listeners::<ListenerKey>("LISTENER_SLOTS", half)?;
        let (listeners6, vips6) = self.read_listeners::<ListenerKey6>("LISTENER_SLOTS6", half)?;
        let targets: Array<&MapData, Target> = self.map_ref("TARGETS")?;
        let limits: Array<&MapData, NewFlowLimits> = self.map_ref("NEW_FLOW_LIMITS")?;
        let limits = listeners
            .values()
            .chain(listeners6.values())
            .filter(|l| l.flags & LISTENER_RATE_LIMITED != 0)
            .map(|l| Ok((l.id, limits.get(&l.id, 0)?)))
            .collect::<Result<_>>()?;
        Ok(MapState {
            settings: None,
            listeners,
            vips,
            listeners6,
            vips6,
            allowed_sources: self.read_sources("ALLOWED_SOURCES")?,
            denied_sources: self.read_sources("DENIED_SOURCES")?,
            allowed_sources6: self.read_sources("ALLOWED_SOURCES6")?,
            denied_sources6: self.read_sources("DENIED_SOURCES6")?,
            limits,
            targets: targets
                .iter()
                .enumerate()
                .filter_map(|(id, t)| match t {
                    Ok(t) if t.state == TARGET_FREE => None,
                    Ok(t) => Some(Ok((id as u32, t))),
                    Err(e) => Some(Err(e)),
                })
                .collect::<Result<_, _>>()?,
            groups: BTreeMap::new(),
        })
    }

    /// The listeners and VIPs in half `half` of listener table `map`.
    #[allow(clippy::type_complexity)]
    fn read_listeners<K>(
        &self,
        map: &str,
        half: u32,
    ) -> Result<(HashMap<K, Listener>, HashSet<K::Addr>)>
    where
        K: ListenerKeyOf + aya::Pod + std::hash::Hash + Eq,
        K::Addr: std::hash::Hash + Eq,
        ListenerSlot<K>: aya::Pod,
    {
        let slots: Array<&MapData, ListenerSlot<K>> = self.map_ref(map)?;
        let (mut listeners, mut vips) = (HashMap::new(), HashSet::new());
        for index in half * LISTENER_SLOTS..(half + 1) * LISTENER_SLOTS {
            let slot = slots.get(&index, 0)?;
            if slot.key.is_empty() {
                continue;
            }
            match vip_of(&slot.key) {
                Some(vip) => vips.insert(vip),
                None => listeners.insert(slot.key, slot.listener).is_some(),
            };
        }
        Ok((listeners, vips))
    }

    /// The prefixes in source trie `map`.
    fn read_sources<D: aya::Pod + Ord>(&self, map: &str) -> Result<BTreeSet<(u32, D)>> {
        let trie: LpmTrie<&MapData, D, u8> = self.map_ref(map)?;
        let keys = trie.keys().map(|k| k.map(|k| (k.prefix_len(), k.data())));
        Ok(keys.collect::<Result<_, _>>()?)
    }

    /// The balancer's programs, by name: the one attached first, then the stages it hands
    /// frames on to.
    pub fn programs(&self) -> impl Iterator<Item = (&'static str, &Xdp)> {
        std::iter::once(BALANCER_PROGRAM)
            .chain(STAGE_PROGRAMS)
            .filter_map(|name| Some((name, self.ebpf.program(name)?.try_into().ok()?)))
    }

    pub fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(BALANCER_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Dataplane::load")
    }

    /// Writes what differs between `old` (what the maps hold now) and `new`. Additions go in
    /// dependency order (targets, groups, VIPs, listeners) and removals in reverse, so the data
    /// plane never finds a listener whose group or target is missing.
    pub fn apply(&mut self, old: &MapState, new: &MapState) -> Result<()> {
        if let Some(settings) = new.settings
            && new.settings != old.settings
        {
            if settings.maglev_size != self.maglev_size {
                return Err(anyhow!(
                    "maglev_table_size changed from {} to {}: restart lb to apply it",
                    self.maglev_size,
                    settings.maglev_size
                ));
            }
            let mut map: Array<_, Settings> = self.map("SETTINGS")?;
            map.set(SETTINGS_KEY, settings, 0)?;
        }

        let mut targets: Array<_, Target> = self.map("TARGETS")?;
        for (id, t) in &new.targets {
            if old.targets.get(id) != Some(t) {
                targets.set(*id, *t, 0)?;
            }
        }
        for (gid, g) in &new.groups {
            if old.groups.get(gid) != Some(g) {
                self.write_group(*gid, g)?;
            }
        }
        // Prefixes are added before the listeners that need them and removed after: a source
        // allowed before and after a reload is allowed at every instant in between.
        let sources = [
            (
                "ALLOWED_SOURCES",
                &old.allowed_sources,
                &new.allowed_sources,
            ),
            ("DENIED_SOURCES", &old.denied_sources, &new.denied_sources),
        ];
        let sources6 = [
            (
                "ALLOWED_SOURCES6",
                &old.allowed_sources6,
                &new.allowed_sources6,
            ),
            (
                "DENIED_SOURCES6",
                &old.denied_sources6,
                &new.denied_sources6,
            ),
        ];
        for (map, before, after) in sources {
            self.write_sources(map, after.difference(before), true)?;
        }
        for (map, before, after) in sources6 {
            self.write_sources(map, after.difference(before), true)?;
        }
        // A listener's limits are in place before the listener that is flagged to read them.
        let mut limits: Array<_, NewFlowLimits> = self.map("NEW_FLOW_LIMITS")?;
        for (id, l) in &new.limits {
            if old.limits.get(id) != Some(l) {
                limits.set(*id, *l, 0)?;
            }
        }
        if new.listeners != old.listeners
            || new.vips != old.vips
            || new.listeners6 != old.listeners6
            || new.vips6 != old.vips6
        {
            self.write_listeners(new)?;
        }
        for (map, before, after) in sources {
            self.write_sources(map, before.difference(after), false)?;
        }
        for (map, before, after) in sources6 {
            self.write_sources(map, before.difference(after), false)?;
        }
        let empty = GroupState {
            forwarding: FORWARDING_DSR,
            algorithm: ALGORITHM_MAGLEV,
            table: Vec::new(),
            target_count: 0,
            stickiness_s: 0,
        };
        for gid in old.groups.keys().filter(|g| !new.groups.contains_key(g)) {
            self.write_group(*gid, &empty)?;
        }
        let mut targets: Array<_, Target> = self.map("TARGETS")?;
        for id in old
            .targets
            .keys()
            .filter(|id| !new.targets.contains_key(id))
        {
            let free = Target {
                state: TARGET_FREE,
                ..Target::default()
            };
            targets.set(*id, free, 0)?;
        }
        Ok(())
    }

    /// Adds `keys` to source trie `map`, or removes them.
    fn write_sources<'k, D: aya::Pod + 'k>(
        &mut self,
        map: &str,
        keys: impl Iterator<Item = &'k (u32, D)>,
        add: bool,
    ) -> Result<()> {
        let mut trie: LpmTrie<_, D, u8> = self.map(map)?;
        for &(len, data) in keys {
            let key = Key::new(len, data);
            if add {
                trie.insert(&key, 1, 0).with_context(|| {
                    format!("{map}: adding a prefix (it holds at most {MAX_SOURCE_PREFIXES})")
                })?;
            } else {
                trie.remove(&key)?;
            }
        }
        Ok(())
    }

    /// Fills both listener tables' inactive halves and makes them live with one write (see
    /// [`ListenerTable`]).
    fn write_listeners(&mut self, state: &MapState) -> Result<()> {
        let (seed, slots) = place_listeners(&state.listeners, &state.vips)?;
        let (seed6, slots6) = place_listeners(&state.listeners6, &state.vips6)?;
        let mut table = self
            .map::<Array<_, ListenerTable>>("LISTENER_TABLE")?
            .get(&0, 0)?;
        let half = (table.active_half & 1) ^ 1;
        // By id first: a NAT reply's reverse entry names its listener by id, and a new listener
        // must be there before its first flow can have one.
        let mut by_id: Array<_, ListenerSlot> = self.map("LISTENERS_BY_ID")?;
        for (&key, &listener) in &state.listeners {
            by_id.set(listener.id, ListenerSlot { key, listener }, 0)?;
        }
        let mut by_id6: Array<_, ListenerSlot6> = self.map("LISTENERS_BY_ID6")?;
        for (&key, &listener) in &state.listeners6 {
            by_id6.set(listener.id, ListenerSlot6 { key, listener }, 0)?;
        }
        let written = self.listener_halves[half as usize].take();
        self.write_slots("LISTENER_SLOTS", half, &slots, written)?;
        self.listener_halves[half as usize] = Some(slots);
        let written = self.listener_halves6[half as usize].take();
        self.write_slots("LISTENER_SLOTS6", half, &slots6, written)?;
        self.listener_halves6[half as usize] = Some(slots6);
        let mut info: Array<_, ListenerTable> = self.map("LISTENER_TABLE")?;
        table.seeds[half as usize] = seed;
        table.seeds6[half as usize] = seed6;
        info.set(0, table, 0)?;
        table.active_half = half;
        info.set(0, table, 0)?;
        Ok(())
    }

    /// Writes `slots` into half `half` of listener table `map`: only those that differ from
    /// what this half already holds (`written`, if known).
    fn write_slots<K: PartialEq>(
        &mut self,
        map: &str,
        half: u32,
        slots: &[ListenerSlot<K>],
        written: Option<Vec<ListenerSlot<K>>>,
    ) -> Result<()>
    where
        ListenerSlot<K>: aya::Pod,
    {
        let mut map: Array<_, ListenerSlot<K>> = self.map(map)?;
        for (i, slot) in slots.iter().enumerate() {
            if written.as_ref().is_none_or(|w| w.get(i) != Some(slot)) {
                map.set(half * LISTENER_SLOTS + i as u32, slot, 0)?;
            }
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
        if !group.table.is_empty() {
            // Only the slots that differ from what this half already holds: a health change
            // moves a few percent of them, and each write is a system call.
            let written = self.tables.entry(gid).or_default()[half as usize].take();
            let mut maglev: Array<_, u32> = self.map("MAGLEV")?;
            let base = (gid * 2 + half) * size;
            for (slot, id) in group.table.iter().enumerate() {
                if written.as_ref().is_none_or(|w| w.get(slot) != Some(id)) {
                    maglev.set(base + slot as u32, id, 0)?;
                }
            }
            self.tables.entry(gid).or_default()[half as usize] = Some(group.table.clone());
        }
        let live = Group {
            active_half: half,
            targets: group.target_count,
            forwarding: group.forwarding,
            algorithm: group.algorithm,
            sequence: group.table.len() as u32,
            stickiness_s: group.stickiness_s,
        };
        self.map::<Array<_, Group>>("GROUPS")?.set(gid, live, 0)?;
        Ok(())
    }

    /// The connection table's entry for a flow, if any.
    pub fn flow<K: TableKey>(&self, key: &K) -> Option<FlowEntry<K>> {
        let table = K::table(self);
        self.flow_buckets(key)
            .into_iter()
            .filter_map(|b| table.buckets.get(b))
            .flat_map(|b| b.entries)
            .find(|e| e.key == *key && table.shape.is_whole(e))
    }

    /// The two connection-table buckets that may hold `key` (its hash is this table's secret).
    pub fn flow_buckets<K: TableKey>(&self, key: &K) -> [u32; 2] {
        K::table(self).shape.buckets_of(self.flow_hash(key))
    }

    /// `key`'s hash under its connection table's secret coefficients, which also chooses
    /// least connections' candidates.
    pub fn flow_hash<K: TableKey>(&self, key: &K) -> u64 {
        key.hash(&K::table(self).shape.hasher)
    }

    /// Flows seen within their listener's idle timeout, per listener id and per target id:
    /// one pass over the connection table, which is the only place that knows.
    pub fn active_flows(&self, state: &MapState) -> ActiveFlows {
        self.survey(state, false)
    }

    /// How often `reconcile_connections` reads the whole connection table: every second, and
    /// a second more for each 4 million entries, so that it never keeps a core busy.
    pub fn reconcile_period(&self) -> std::time::Duration {
        let buckets = self.flows.shape.buckets as u64 + self.flows6.shape.buckets as u64;
        let entries = buckets * FLOW_WAYS as u64;
        std::time::Duration::from_secs(1 + entries / 4_000_000)
    }

    /// Corrects the data plane's count of each target's active connections to what the
    /// connection table says. The data plane counts as flows start and end; only the table
    /// knows of flows that went idle, or whose target or listener went, and races between CPUs
    /// may miss a step. Those flows are marked ended here (so that nothing counts them twice),
    /// and each count is moved by the error that this pass and the one before agree on: a flow
    /// that starts or ends while the table is read shows an error of one in one pass only
    /// (which, corrected, would send least connections' next pick astray), while a real error
    /// stays until corrected, one pass later.
    pub fn reconcile_connections(&self, state: &MapState) {
        let before: Vec<u64> = (0..MAX_TARGETS)
            .filter_map(|id| self.active.get(id))
            .collect();
        let truth = self.survey(state, true).connections;
        let mut unconfirmed = self.unconfirmed.lock().unwrap_or_else(|e| e.into_inner());
        let mut left = HashMap::new();
        for (id, error) in corrections(&before, &truth) {
            let error = error as i64;
            let confirmed = agreed(unconfirmed.get(&id).copied().unwrap_or(0), error);
            if confirmed != 0
                && let Some(word) = self.active.at(id)
            {
                atomic(word).fetch_add(confirmed as u64, Ordering::Relaxed);
            }
            if error != confirmed {
                left.insert(id, error - confirmed);
            }
        }
        *unconfirmed = left;
    }

    /// Active connections of target `id`, as the data plane counts them: what least
    /// connections compares.
    pub fn active_connections(&self, id: u32) -> u64 {
        lb_common::connections(self.active.get(id).unwrap_or(0))
    }

    /// One pass over the connection table: its active flows and connections. With
    /// `end_stale`, entries that still count as a connection but whose flow went idle, or
    /// whose target or listener is gone, are marked `FLOW_ENDED` (unless the data plane wrote
    /// the entry meanwhile).
    fn survey(&self, state: &MapState, end_stale: bool) -> ActiveFlows {
        let now = monotonic_ns();
        let mut active = ActiveFlows::default();
        survey_table(&self.flows, state, now, end_stale, &mut active);
        survey_table(&self.flows6, state, now, end_stale, &mut active);
        active
    }

    /// Every map's shape and the memory the kernel charges for it.
    pub fn memory(&self) -> Result<Vec<MapMemory>> {
        MAPS.iter()
            .map(|&(name, _)| {
                let data = self
                    .ebpf
                    .map(name)
                    .and_then(map_data)
                    .ok_or_else(|| anyhow!("map {name} missing from the embedded object"))?;
                let info = data.info()?;
                let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
                let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
                let bytes = fdinfo
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| anyhow!("no memlock for map {name}"))?;
                Ok(MapMemory {
                    name,
                    kind: format!("{:?}", info.map_type()?),
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                    max_entries: info.max_entries(),
                    bytes,
                })
            })
            .collect()
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

    /// ICMP messages the data plane sent, per kind, summed over CPUs.
    pub fn icmp_sent(&self) -> Result<Vec<(IcmpCounter, u64)>> {
        let icmp: PerCpuArray<&MapData, u64> = self.map_ref("ICMP")?;
        IcmpCounter::ALL
            .iter()
            .map(|&k| Ok((k, icmp.get(&(k as u32), 0)?.iter().sum())))
            .collect()
    }

    /// ICMP messages of one kind the data plane sent, summed over CPUs.
    pub fn icmp_sent_of(&self, kind: IcmpCounter) -> Result<u64> {
        let icmp: PerCpuArray<&MapData, u64> = self.map_ref("ICMP")?;
        Ok(icmp.get(&(kind as u32), 0)?.iter().sum())
    }

    /// New flows that listener `id`'s rate limits refused, per limit, summed over CPUs.
    pub fn refused_new_flows(&self, id: u32) -> Result<Vec<(DropReason, u64)>> {
        let refused: PerCpuArray<&MapData, u64> = self.map_ref("LISTENER_REFUSED")?;
        [DropReason::ListenerRateLimit, DropReason::SourceRateLimit]
            .into_iter()
            .map(|r| Ok((r, refused.get(&refused_index(id, r), 0)?.iter().sum())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::flow_check;

    fn flow_table() -> FlowTable {
        FlowTable {
            buckets: 256,
            layout: MAP_LAYOUT,
            hasher: FlowHasher::from_seed(7),
        }
    }

    /// A target whose MAC is not known is written unhealthy and left out of its group's table,
    /// healthy or draining: no frame of a new or an established flow may go to no MAC.
    #[test]
    fn a_target_without_a_next_hop_takes_no_flow_whatever_its_state() {
        let text = |targets: &str| {
            format!(
                "listeners:\n  - {{name: web, address: 203.0.113.10, port: 80, protocol: tcp, target_group: web}}\n\
                 target_groups:\n  - name: web\n    targets: [{targets}]\n"
            )
        };
        let parse = |t: &str| config::parse(Path::new("t.yaml"), t).expect("a valid config");
        let both = parse(&text(
            "{address: 198.51.100.11, port: 80}, {address: 198.51.100.12, port: 80}",
        ));
        let mut registry = Registry::new(
            lb_common::MAX_LISTENERS,
            both.settings.max_target_groups,
            MAX_TARGETS,
        );
        let now = std::time::Instant::now();
        registry.sync(&both, now).expect("in sync");
        let keys: Vec<TargetKey> = registry.targets().map(|(k, _)| k.clone()).collect();
        for key in &keys {
            for _ in 0..2 {
                registry.record(key, true, 2, 2);
            }
        }
        let iface = Interface {
            name: "eth0".into(),
            index: 2,
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            ipv4: vec![Ipv4Addr::new(198, 51, 100, 3)],
            ipv6: Vec::new(),
        };
        let unknown = Ipv4Addr::new(198, 51, 100, 12);
        let known = NextHop {
            interface: 0,
            mac: [2, 0, 0, 0, 0, 0x11],
        };
        let hop = |k: &TargetKey| (k.addr.ip() != unknown).then_some(known);
        let entry = |state: &MapState| {
            state
                .targets
                .iter()
                .find(|(_, t)| t.addr == be(unknown))
                .map(|(&id, &t)| (id, t))
                .expect("the target")
        };
        let state =
            MapState::build(&both, &registry, std::slice::from_ref(&iface), hop).expect("built");
        let (id, target) = entry(&state);
        assert_eq!(
            (target.state, target.mac),
            (TARGET_UNHEALTHY, UNRESOLVED_MAC)
        );
        assert!(state.groups.values().all(|g| !g.table.contains(&id)));
        assert!(state.groups.values().all(|g| !g.table.is_empty()));

        // Removed from the config, it drains: with its MAC, and never without.
        let one = parse(&text("{address: 198.51.100.11, port: 80}"));
        registry.sync(&one, now).expect("in sync");
        let state =
            MapState::build(&one, &registry, std::slice::from_ref(&iface), hop).expect("built");
        assert_eq!(entry(&state).1.state, TARGET_UNHEALTHY);
        let state = MapState::build(&one, &registry, std::slice::from_ref(&iface), |_| {
            Some(known)
        })
        .expect("built");
        assert_eq!(entry(&state).1.state, TARGET_DRAINING);
    }

    #[test]
    fn a_torn_flow_entry_is_not_whole() {
        let table = flow_table();
        let entry = |key: FlowKey, target| FlowEntry {
            key,
            target,
            check: flow_check(table.hasher.hash(&key), target),
            last_seen_ns: 1,
        };
        let a = entry(FlowKey::new(1, 2, 3, 4, 6), 7);
        let b = entry(FlowKey::new(1, 2, 5, 4, 6), 9);
        assert!(table.is_whole(&a) && table.is_whole(&b));
        // Any mix of the two writes: one flow's key with the other's target or check.
        assert!(!table.is_whole(&FlowEntry {
            target: b.target,
            ..a
        }));
        assert!(!table.is_whole(&FlowEntry {
            check: b.check,
            ..a
        }));
        assert!(!table.is_whole(&FlowEntry { key: b.key, ..a }));
        assert!(
            !table.is_whole(&FlowEntry::<FlowKey>::default()),
            "an empty entry"
        );
    }

    #[test]
    fn a_flow_counts_as_a_connection_until_its_client_ends_it_or_it_goes_stale() {
        let vip = ListenerKey {
            addr: be(Ipv4Addr::new(203, 0, 113, 10)),
            port: 80u16.to_be(),
            proto: 6,
            pad: 0,
        };
        let listener = Listener {
            id: 4,
            group: 2,
            idle_timeout_s: 10,
            flags: 0,
        };
        let target = |state| Target {
            addr: be(Ipv4Addr::new(198, 51, 100, 11)),
            group: 2,
            mac: [0; 6],
            state,
            port: 80u16.to_be(),
            egress: 0,
            weight: 1,
            ..Target::default()
        };
        let mut state = MapState::default();
        state.listeners.insert(vip, listener);
        state.targets.insert(7, target(TARGET_ACTIVE));
        let now = 100_000_000_000;
        let flow = |last_seen_ns| FlowEntry {
            key: FlowKey::new(1, vip.addr, 5000u16.to_be(), vip.port, 6),
            target: 7,
            check: 0,
            last_seen_ns,
        };
        let seen = now - 1_000_000_000;
        let live = |counted| Standing::Live {
            listener: 4,
            counted,
        };
        assert_eq!(standing(&flow(seen), &state, now), live(true));
        assert_eq!(standing(&flow(seen | FLOW_ENDED), &state, now), live(false));
        // A flag on a flow seen this very moment is not a time in the future.
        assert_eq!(standing(&flow(now | FLOW_ENDED), &state, now), live(false));
        let stale = |counted| Standing::Stale { counted };
        let idle = now - 11_000_000_000;
        assert_eq!(standing(&flow(idle), &state, now), stale(true));
        assert_eq!(
            standing(&flow(seen | FLOW_CLOSING), &state, now),
            stale(true)
        );
        state.targets.insert(7, target(TARGET_DRAINING));
        assert_eq!(standing(&flow(seen), &state, now), live(true));
        state.targets.insert(7, target(TARGET_UNHEALTHY));
        assert_eq!(standing(&flow(seen), &state, now), stale(true));
        state.targets.remove(&7);
        assert_eq!(
            standing(&flow(seen | FLOW_ENDED), &state, now),
            stale(false)
        );
        state.targets.insert(7, target(TARGET_ACTIVE));
        state.listeners.clear();
        assert_eq!(standing(&flow(seen), &state, now), stale(true));
    }

    #[test]
    fn least_connections_compares_connections_per_weight() {
        use lb_common::fewer_connections;
        assert!(fewer_connections((1, 1), (2, 1)));
        assert!(!fewer_connections((2, 1), (2, 1)), "a tie is not fewer");
        // Weight 3 with 5 connections (1.67 each) has fewer than weight 1 with 2.
        assert!(fewer_connections((5, 3), (2, 1)));
        assert!(!fewer_connections((7, 3), (2, 1)));
        assert!(fewer_connections((0, 1), (1, 1000)));
        // The largest counts and weights do not overflow.
        assert!(fewer_connections(
            (u32::MAX as u64, 1000),
            (u32::MAX as u64, 999)
        ));
    }

    #[test]
    fn corrections_make_every_count_what_the_table_says() {
        let minus_one = u64::MAX;
        // Target 0: counted 3, 2 in the table; 1: a race took it below zero, 1 in the table;
        // 2: right; 3: counted, but gone from the table.
        let before = [3, minus_one, 5, 4, 0];
        let truth = HashMap::from([(0, 2), (1, 1), (2, 5)]);
        let fixes = corrections(&before, &truth);
        assert_eq!(
            fixes,
            vec![(0, minus_one), (1, 2), (3, 4u64.wrapping_neg())]
        );
        for (id, fix) in fixes {
            let after = before[id as usize].wrapping_add(fix);
            assert_eq!(after, truth.get(&id).copied().unwrap_or(0));
        }
    }

    #[test]
    fn a_correction_is_what_two_passes_agree_on() {
        assert_eq!(agreed(0, 1), 0, "an error seen once, a race");
        assert_eq!(agreed(1, 0), 0, "a race, gone");
        assert_eq!(agreed(-3, -3), -3);
        assert_eq!(agreed(-3, -2), -2);
        assert_eq!(agreed(2, 5), 2);
        assert_eq!(agreed(2, -1), 0);
    }

    #[test]
    fn one_clients_flows_spread_over_the_flow_buckets() {
        let table = flow_table();
        for choice in 0..2 {
            let mut per_bucket = vec![0u32; table.buckets as usize];
            for sport in 0..16384u16 {
                let key = FlowKey::new(7, 10, sport.to_be(), 80u16.to_be(), 6);
                per_bucket[table.buckets_of(table.hasher.hash(&key))[choice] as usize] += 1;
            }
            // 64 per bucket on average; a Poisson spread keeps every bucket within about ±30.
            let (min, max) = (per_bucket.iter().min(), per_bucket.iter().max());
            assert!(
                min >= Some(&24) && max <= Some(&112),
                "choice {choice}: {min:?}..{max:?}"
            );
        }
    }

    /// The data plane's search (`find_key` in the balancer), on one placed half.
    fn find(slots: &[ListenerSlot], seed: u32, key: &ListenerKey) -> Option<ListenerSlot> {
        let home = lb_common::listener_home(key, seed);
        for i in 0..LISTENER_PROBES {
            let slot = slots[((home + i) & (LISTENER_SLOTS - 1)) as usize];
            if slot.key == *key {
                return Some(slot);
            }
            if slot.key.addr == 0 {
                return None;
            }
        }
        None
    }

    fn key(vip: u32, port: u16, proto: u8) -> ListenerKey {
        ListenerKey {
            addr: be(Ipv4Addr::from(vip)),
            port: port.to_be(),
            proto,
            pad: 0,
        }
    }

    #[test]
    fn a_full_listener_table_finds_every_key_and_nothing_else() {
        // VIPs with 3 listener keys each, plus the VIPs: as full as the table may get.
        let first_vip = u32::from(Ipv4Addr::new(203, 0, 113, 0));
        let mut listeners = HashMap::new();
        let mut vips = HashSet::new();
        for v in 0..LISTENER_SLOTS / 16 {
            for (p, port) in [80u16, 443, 27015].into_iter().enumerate() {
                let id = v * 3 + p as u32;
                let listener = Listener {
                    id,
                    group: id % 16,
                    idle_timeout_s: 350,
                    flags: 0,
                };
                listeners.insert(key(first_vip + v, port, 6), listener);
            }
            vips.insert(be(Ipv4Addr::from(first_vip + v)));
        }
        let (seed, slots) = place_listeners(&listeners, &vips).unwrap();
        assert_eq!(
            place_listeners(&listeners, &vips).unwrap(),
            (seed, slots.clone()),
            "the same listeners give the same table"
        );
        for (k, l) in &listeners {
            assert_eq!(find(&slots, seed, k).map(|s| s.listener), Some(*l));
            let other_protocol = ListenerKey { proto: 17, ..*k };
            assert_eq!(find(&slots, seed, &other_protocol), None);
        }
        for &vip in &vips {
            assert!(find(&slots, seed, &ListenerKey::vip(vip)).is_some());
        }
        let not_a_vip = be(Ipv4Addr::new(198, 51, 100, 7));
        assert_eq!(find(&slots, seed, &ListenerKey::vip(not_a_vip)), None);

        vips.insert(not_a_vip);
        match place_listeners(&listeners, &vips) {
            Err(e) => assert!(e.to_string().contains("at most 4096"), "{e}"),
            Ok(_) => panic!("4097 keys placed in a table for 4096"),
        }
    }
}
