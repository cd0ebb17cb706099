//! Stage 4: a target for a new flow, by its group's algorithm.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{macros::map, maps::Array};
use lb_common::{
    ALGORITHM_ROUND_ROBIN, ALGORITHM_SOURCE_IP, FlowKey, Group, Listener, Settings, TARGET_ACTIVE,
};

use crate::TARGETS;

/// Target tables, two halves per group: slot `(group * 2 + half) * size` onwards holds target
/// ids: a Maglev table (indexed by `Settings::maglev_slot`), or a round-robin sequence. Sized
/// by the controller at load time.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Per group: how many new flows round robin has placed, across all CPUs.
#[map]
static ROUND_ROBIN: Array<u64> = Array::with_max_entries(1, 0);

/// The target for a new flow with key `key` of `listener`, whose group is `group`.
#[inline(always)]
pub fn pick(key: &FlowKey, listener: &Listener, group: &Group, settings: &Settings) -> Option<u32> {
    if group.targets == 0 || settings.maglev_size == 0 {
        return None;
    }
    let size = settings.maglev_size;
    let table = (listener.group * 2 + (group.active_half & 1)) * size;
    let slot = if group.algorithm == ALGORITHM_ROUND_ROBIN {
        round_robin(listener.group, group)?
    } else if group.algorithm == ALGORITHM_SOURCE_IP {
        settings.maglev_slot(&FlowKey::new(key.src, 0, 0, 0, 0))
    } else {
        settings.maglev_slot(key)
    };
    let id = *MAGLEV.get(table + slot)?;
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
