//! Stage 4: a target for a new flow, by its group's algorithm, unless stickiness keeps the
//! client's.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use lb_common::{
    ALGORITHM_LEAST_CONNECTIONS, ALGORITHM_ROUND_ROBIN, ALGORITHM_SOURCE_IP, ClientKey, ClientKey6,
    FlowKeyOf, Group, LEAST_CONNECTIONS_SCAN, Listener, Settings, Sticky, TARGET_ACTIVE,
    fewer_connections, two_choices,
};

use crate::{TARGETS, family::Family, flows};

/// Target tables, two halves per group: slot `(group * 2 + half) * size` onwards holds target
/// ids: a Maglev table (indexed by `Settings::maglev_slot`), a round-robin sequence, or the
/// targets for least connections. Sized by the controller at load time.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Per group: how many new flows round robin has placed, across all CPUs.
#[map]
static ROUND_ROBIN: Array<u64> = Array::with_max_entries(1, 0);

/// The target each client of a sticky listener keeps. Bounded (sized by the controller): when
/// full, the least recently used client is forgotten, and its next flow is picked afresh.
#[map]
pub static STICKY: LruHashMap<ClientKey, Sticky> = LruHashMap::with_max_entries(1, 0);

/// The same for IPv6 clients.
#[map]
pub static STICKY6: LruHashMap<ClientKey6, Sticky> = LruHashMap::with_max_entries(1, 0);

/// The target for a new flow with key `key` and connection-table hash `hash` of `listener`,
/// whose group is `group`.
#[inline(always)]
pub fn pick<F: Family>(
    key: &F::Key,
    hash: u64,
    listener: &Listener,
    group: &Group,
    settings: &Settings,
    now: u64,
) -> Option<u32> {
    if group.stickiness_s == 0 {
        return by_algorithm(key, hash, listener, group, settings);
    }
    let client = F::client(listener.id, key.src(), false);
    if let Some(kept) = F::sticky(&client) {
        // SAFETY: a map value, valid for the duration of the program run; another CPU may
        // write it meanwhile, which at worst gives the client the other CPU's choice.
        let (id, addr, last) = unsafe { ((*kept).target, (*kept).addr, (*kept).last_ns) };
        let fresh = now.wrapping_sub(last) <= group.stickiness_s as u64 * 1_000_000_000;
        if fresh
            && TARGETS.get(id).is_some_and(|t| {
                t.state == TARGET_ACTIVE && t.group == listener.group && t.addr == addr
            })
        {
            // SAFETY: as above.
            unsafe { (&raw mut (*kept).last_ns).write(now) };
            return Some(id);
        }
    }
    let id = by_algorithm(key, hash, listener, group, settings)?;
    let kept = Sticky {
        target: id,
        addr: TARGETS.get(id)?.addr,
        last_ns: now,
    };
    F::keep_sticky(&client, &kept);
    Some(id)
}

/// Where the group's hash places the flow of `key`, if its algorithm is a hash (maglev,
/// source_ip): its target on any node, even one that never saw it. Round robin and least
/// connections, whose choices depend on what came before, have no answer. For packets about a
/// flow that the connection table does not hold (ICMP errors): no state changes.
#[inline(always)]
pub fn placed_by_hash<K: FlowKeyOf>(
    key: &K,
    listener: &Listener,
    group: &Group,
    settings: &Settings,
) -> Option<u32> {
    if group.algorithm == ALGORITHM_ROUND_ROBIN || group.algorithm == ALGORITHM_LEAST_CONNECTIONS {
        return None;
    }
    by_algorithm(key, 0, listener, group, settings)
}

/// The group's algorithm's choice of a target that takes new flows.
#[inline(always)]
fn by_algorithm<K: FlowKeyOf>(
    key: &K,
    hash: u64,
    listener: &Listener,
    group: &Group,
    settings: &Settings,
) -> Option<u32> {
    if group.targets == 0 || settings.maglev_size == 0 {
        return None;
    }
    let table = (listener.group * 2 + (group.active_half & 1)) * settings.maglev_size;
    let id = if group.algorithm == ALGORITHM_LEAST_CONNECTIONS {
        let id = lb_least_connections(table, group.sequence, hash);
        if id == u32::MAX {
            return None;
        }
        id
    } else {
        let slot = if group.algorithm == ALGORITHM_ROUND_ROBIN {
            round_robin(listener.group, group)?
        } else if group.algorithm == ALGORITHM_SOURCE_IP {
            settings.maglev_slot(&K::new(key.src(), Default::default(), 0, 0, 0))
        } else {
            settings.maglev_slot(key)
        };
        *MAGLEV.get(table + slot)?
    };
    let target = TARGETS.get(id)?;
    (target.state == TARGET_ACTIVE).then_some(id)
}

/// The next slot of the group's sequence: one counter for all CPUs, so that the targets take
/// their turns as the sequence says, not as many interleaved sequences.
#[inline(always)]
fn round_robin(gid: u32, group: &Group) -> Option<u32> {
    if group.sequence == 0 {
        return None;
    }
    let counter = ROUND_ROBIN.get_ptr_mut(gid)?;
    // SAFETY: a map value, valid and 8-byte aligned for the duration of the program run.
    // The turn is read, then the counter advanced by an atomic add, so no turn is ever lost;
    // two CPUs placing a flow at the same instant may read the same turn (the BPF CPU version
    // lb is built for, v1, has no add that returns the old value).
    let turn = unsafe {
        let turn = counter.read_volatile();
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1);
        turn
    };
    Some((turn % group.sequence as u64) as u32)
}

/// Of the `targets` ids from slot `table` on, the one with the fewest active connections per
/// weight. Every one up to `LEAST_CONNECTIONS_SCAN` targets, from a slot the flow's hash
/// chooses, so that ties go to different targets for different flows; in a larger group, the
/// better of two that the hash chooses.
///
/// A global function (`u32::MAX` for none): the verifier checks it once, on its own, instead
/// of once for each path that leads to it, which exceeded its budget.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lb_least_connections(table: u32, targets: u32, hash: u64) -> u32 {
    least_connections(table, targets, hash).unwrap_or(u32::MAX)
}

#[inline(always)]
fn least_connections(table: u32, targets: u32, hash: u64) -> Option<u32> {
    if targets == 0 {
        return None;
    }
    let [first, other] = two_choices(hash, targets);
    if targets > LEAST_CONNECTIONS_SCAN {
        return match (candidate(table + first), candidate(table + other)) {
            (Some(a), Some(b)) => Some(if fewer_connections(b.1, a.1) {
                b.0
            } else {
                a.0
            }),
            (a, b) => a.or(b).map(|c| c.0),
        };
    }
    // Opaque to the compiler: knowing `targets <= LEAST_CONNECTIONS_SCAN` here, it would drop
    // the constant bound from the loop, and the verifier would find the loop unbounded.
    let targets = core::hint::black_box(targets);
    let mut best: Option<(u32, (u64, u64))> = None;
    let mut i = 0;
    while i < LEAST_CONNECTIONS_SCAN && i < targets {
        let mut slot = first + i;
        if slot >= targets {
            slot -= targets;
        }
        if let Some(c) = candidate(table + slot)
            && best.is_none_or(|b| fewer_connections(c.1, b.1))
        {
            best = Some(c);
        }
        i += 1;
    }
    best.map(|b| b.0)
}

/// The target in `slot`, and its active connections and weight, if it takes new flows.
#[inline(always)]
fn candidate(slot: u32) -> Option<(u32, (u64, u64))> {
    let id = *MAGLEV.get(slot)?;
    let target = TARGETS.get(id)?;
    (target.state == TARGET_ACTIVE).then(|| {
        let weight = target.weight.max(1) as u64;
        (id, (flows::active_connections(id), weight))
    })
}
