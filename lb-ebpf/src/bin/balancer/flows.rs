//! Stage 3: the connection table, which keeps every flow on the target it was given.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_F_MMAPABLE, macros::map, maps::Array};
use lb_common::{
    FLOW_CLOSING, FLOW_EMBRYONIC, FLOW_ENDED, FLOW_FLAGS, FLOW_REVERSE, FLOW_WAYS, FlowBucket,
    FlowBucket6, FlowEntry, FlowKeyOf, FlowTable, Listener, MAX_TARGETS, TARGET_ACTIVE,
    TARGET_DRAINING, connections, flow_check,
};

use crate::{TARGETS, family::Family};

/// Connection table: flow affinity. Sized by the controller at load time.
///
/// A set-associative array that the program indexes itself (`FLOW_TABLE` has its hash): a flow
/// lives in one of its two buckets of `FLOW_WAYS` entries (see `find_entry` for which entry a
/// new flow takes). The kernel's LRU hash cost a call, a jhash and a key comparison per lookup,
/// and its inserts take locks and a free-list node: about half of an established packet's time
/// and most of a new flow's. Mappable, so that the controller reads it as memory to count flows.
#[map]
pub static FLOWS: Array<FlowBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The IPv6 connection table, alike.
#[map]
pub static FLOWS6: Array<FlowBucket6> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// The shape and hash of each family's table (`Family::INDEX`).
#[map]
pub static FLOW_TABLE: Array<FlowTable> = Array::with_max_entries(2, 0);

/// Active connections per target id, counted as flows start and end (see `FLOW_ENDED`), by all
/// CPUs at once. What races and idle flows leave wrong, the controller corrects against the
/// connection table; mappable, so that it adds its corrections atomically as the data plane
/// adds its counts.
#[map]
static ACTIVE: Array<u64> = Array::with_max_entries(MAX_TARGETS, BPF_F_MMAPABLE);

/// Refresh a flow's last-seen time at most this often, to spare a map write per packet. It is
/// also how finely a full bucket tells its busy flows from quiet ones when it must forget one.
pub const LAST_SEEN_REFRESH_NS: u64 = 100_000_000;

/// The entry of `key` in the table (see `find_entry`), whether it holds the flow, and the
/// flow's hash, which its `check` and a new entry need; none for a new flow that finds no room.
#[inline(always)]
pub fn lookup<F: Family>(
    table: &FlowTable,
    key: &F::Key,
) -> Option<(*mut FlowEntry<F::Key>, bool, u64)> {
    let hash = key.hash(&table.hasher);
    let (entry, found) = find_entry::<F>(table.buckets_of(hash), key)?;
    Some((entry, found, hash))
}

/// The entry that holds `key` in either of its buckets, and `true`; or else the entry a new flow
/// takes, and `false`: an empty one of the bucket with more empty entries (the buckets fill
/// evenly, so that both of a flow's buckets are rarely full), or if neither has one, the one
/// `rank` gives up first; none if both buckets hold only established flows. The second bucket
/// is read only when the first does not hold the flow.
#[inline(always)]
fn find_entry<F: Family>(
    buckets: [u32; 2],
    key: &F::Key,
) -> Option<(*mut FlowEntry<F::Key>, bool)> {
    let (entry, found, empty) = find_way(F::flows().get_ptr_mut(buckets[0])?, key);
    if found {
        return Some((entry, true));
    }
    let (other, found, other_empty) = find_way(F::flows().get_ptr_mut(buckets[1])?, key);
    if found {
        return Some((other, true));
    }
    let victim = if empty + other_empty == 0 {
        // SAFETY: both point into buckets, map values valid for the duration of the program run.
        let (a, b) = unsafe { ((*entry).last_seen_ns, (*other).last_seen_ns) };
        if rank(b) < rank(a) { other } else { entry }
    } else if other_empty > empty {
        other
    } else {
        entry
    };
    // The victim's last-seen word is read again rather than its rank carried out of
    // `find_way`: ranks carried in registers multiplied the verifier's states past its budget.
    // SAFETY: as above.
    let seen = unsafe { (*victim).last_seen_ns };
    (rank(seen) < RANK_ESTABLISHED).then_some((victim, false))
}

/// How readily an entry whose last-seen word is `seen` gives way to a new flow, lowest first:
/// empty, then ended (closed, or marked idle by the controller), then embryonic, each the least
/// recently seen first; an established flow (`RANK_ESTABLISHED` and above) never does.
#[inline(always)]
fn rank(seen: u64) -> u64 {
    let class = if seen == 0 {
        0
    } else if seen & (FLOW_ENDED | FLOW_CLOSING) != 0 {
        1
    } else if seen & FLOW_EMBRYONIC != 0 || !FLOOD_GUARD {
        2
    } else {
        3
    };
    // The class above the time (the top two bits of a monotonic clock are always clear).
    (class << 62) | (seen & !FLOW_FLAGS)
}

const RANK_ESTABLISHED: u64 = 3 << 62;

/// Whether established flows are kept from new ones. Off only in a test build (the data plane
/// compiled with `LB_TEST_NO_FLOOD_GUARD` set), where every flow ranks as embryonic once more,
/// the oldest giving way first: the build that shows the flood test failing without the guard.
const FLOOD_GUARD: bool = option_env!("LB_TEST_NO_FLOOD_GUARD").is_none();

/// In `bucket`: the entry that holds `key`, and `true`; or else the entry a new flow would take,
/// the lowest `rank`, and `false`; and how many entries are empty.
#[inline(always)]
fn find_way<K: FlowKeyOf>(bucket: *mut FlowBucket<K>, key: &K) -> (*mut FlowEntry<K>, bool, u32) {
    let first = bucket as *mut FlowEntry<K>;
    let words = key.words();
    let (mut victim, mut lowest, mut empty) = (first, u64::MAX, 0);
    let mut way = 0;
    while way < FLOW_WAYS {
        // SAFETY: `way` < FLOW_WAYS, the number of entries in a bucket. Plain reads (volatile
        // ones of the key cost an established packet about 10 ns): a key torn by another CPU's
        // write matches no flow, or matches one whose `check` then fails.
        let entry = unsafe { first.add(way) };
        let (stored, seen) = unsafe {
            (
                (&raw const (*entry).key as *const K::Words).read(),
                (&raw const (*entry).last_seen_ns).read(),
            )
        };
        if K::same_words(&stored, &words) {
            return (entry, true, 0);
        }
        let rank = rank(seen);
        if rank < lowest {
            (victim, lowest) = (entry, rank);
        }
        empty += (seen == 0) as u32;
        way += 1;
    }
    (victim, false, empty)
}

/// The target the connection table remembers for this flow, if it is still valid for it: the
/// entry is whole, the flow was not idle too long, and its target is still in the listener's
/// group and either takes flows or drains them. A packet that `confirms` the flow (the
/// client's, other than a SYN) makes an embryonic flow established.
///
/// Other CPUs may rewrite the entry meanwhile: each field is read once, so the target that is
/// checked is the target returned.
#[inline(always)]
pub fn existing_target<K>(
    entry: *mut FlowEntry<K>,
    hash: u64,
    listener: &Listener,
    confirms: bool,
    now: u64,
) -> Option<u32> {
    let (id, check, last_seen) = read(entry);
    if check != flow_check(hash, id) {
        return None;
    }
    // Masked: a flag must not make a flow seen this very tick look seen in the future.
    let idle = now.wrapping_sub(last_seen & !FLOW_FLAGS);
    if idle > listener.idle_timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    let target = TARGETS.get(id)?;
    if (target.state != TARGET_ACTIVE && target.state != TARGET_DRAINING)
        || target.group != listener.group
    {
        return None;
    }
    refresh(entry, last_seen, idle, confirms, now);
    Some(id)
}

/// Marks the flow of `entry` (last seen `last_seen`, `idle` ago) seen now, if it was not seen
/// within `LAST_SEEN_REFRESH_NS`, and makes it established if this packet `confirms` it. A NAT
/// flow that ended keeps its entry only for its linger: never refreshed.
#[inline(always)]
pub fn refresh<K>(entry: *mut FlowEntry<K>, last_seen: u64, idle: u64, confirms: bool, now: u64) {
    let keep = if confirms {
        FLOW_FLAGS & !FLOW_EMBRYONIC
    } else {
        FLOW_FLAGS
    };
    if (idle > LAST_SEEN_REFRESH_NS || last_seen & FLOW_FLAGS & !keep != 0)
        && last_seen & FLOW_CLOSING == 0
    {
        // SAFETY: `entry` points into a bucket, a map value valid for the duration of the run.
        unsafe { (&raw mut (*entry).last_seen_ns).write(now | (last_seen & keep)) };
    }
}

/// Whether a SYN for the flow of `entry`, whose target `id` is valid, repeats the SYN of a flow
/// still opening (its SYN-ACK was lost): it then keeps the target, which must take new flows,
/// and the flow must not have ended. An algorithm without memory (round robin) would otherwise
/// send it elsewhere and break the handshake; a SYN that reuses the 5-tuple of an ended flow,
/// or whose target drains, is picked afresh.
#[inline(always)]
pub fn retransmitted_syn<K>(entry: *mut FlowEntry<K>, id: u32) -> bool {
    let (_, _, last_seen) = read(entry);
    last_seen & (FLOW_CLOSING | FLOW_ENDED) == 0
        && TARGETS.get(id).is_some_and(|t| t.state == TARGET_ACTIVE)
}

/// The client ended the flow of `entry` (a FIN or an RST): it stops counting as an active
/// connection of its target, once, however many FINs follow. The entry stays, for the packets
/// that close the connection.
#[inline(always)]
pub fn end<K>(entry: *mut FlowEntry<K>) {
    let (id, _, last_seen) = read(entry);
    if last_seen & FLOW_ENDED == 0 {
        // SAFETY: `entry` points into a bucket, a map value valid for the duration of the run.
        unsafe { (&raw mut (*entry).last_seen_ns).write(last_seen | FLOW_ENDED) };
        count(id, u64::MAX);
    }
}

/// Active connections of target `id`.
#[inline(always)]
pub fn active_connections(id: u32) -> u64 {
    ACTIVE.get(id).map_or(0, |&n| connections(n))
}

/// Adds `delta` (wrapping: `u64::MAX` takes one away) to target `id`'s active connections.
#[inline(always)]
fn count(id: u32, delta: u64) {
    if let Some(counter) = ACTIVE.get_ptr_mut(id) {
        // SAFETY: a map value, valid and 8-byte aligned for the duration of the program run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta) };
    }
}

/// An entry's target, check and last-seen time, each read once: other CPUs may rewrite the
/// entry meanwhile, and what is checked must be what is used.
#[inline(always)]
pub fn read<K>(entry: *mut FlowEntry<K>) -> (u32, u32, u64) {
    // SAFETY: `entry` points into a bucket, a map value valid for the duration of the program run.
    unsafe {
        (
            (&raw const (*entry).target).read_volatile(),
            (&raw const (*entry).check).read_volatile(),
            (&raw const (*entry).last_seen_ns).read_volatile(),
        )
    }
}

/// Writes a new flow into `entry`: its key, its target and their check, and the time. A flow
/// to a target counts as one of its active connections; the flow it replaces, if it still
/// counted, no longer does.
#[inline(always)]
pub fn remember<K: FlowKeyOf>(entry: *mut FlowEntry<K>, key: &K, hash: u64, target: u32, now: u64) {
    let (old, _, seen) = read(entry);
    if seen != 0 && seen & FLOW_ENDED == 0 && old & FLOW_REVERSE == 0 {
        count(old, u64::MAX);
    }
    // SAFETY: `entry` points into a bucket, a map value that stays valid for the duration of the
    // program run. Word stores: a struct copy may become a call to LLVM's memcpy subprogram;
    // a key is 32-bit words (asserted in lb-common).
    unsafe {
        (&raw mut (*entry).key as *mut K::Words).write(key.words());
        (&raw mut (*entry).target).write(target);
        (&raw mut (*entry).check).write(flow_check(hash, target));
        (&raw mut (*entry).last_seen_ns).write(now | FLOW_EMBRYONIC);
    }
    if target & FLOW_REVERSE == 0 {
        count(target, 1);
    }
}
