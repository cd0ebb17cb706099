//! Stage 2: the listener a packet is for, from the listener table.

use aya_ebpf::{macros::map, maps::Array};
use lb_common::{
    LISTENER_PROBES, LISTENER_SLOTS as LISTENER_SLOT_COUNT, ListenerKey, ListenerSlot,
    ListenerTable,
};

/// Listeners by (VIP, port, protocol), and every VIP (so that traffic to a VIP port without a
/// listener is dropped rather than passed): two halves of `LISTENER_SLOTS`, probed by
/// `find_key`. Array lookups are inlined by the JIT; a hash map's cost a call and a jhash.
#[map]
static LISTENER_SLOTS: Array<ListenerSlot> = Array::with_max_entries(2 * LISTENER_SLOT_COUNT, 0);

/// The live half of `LISTENER_SLOTS` and the seeds of both.
#[map]
static LISTENER_TABLE: Array<ListenerTable> = Array::with_max_entries(1, 0);

/// The live listener table's slot for `key`: linear probing from its home slot, at most
/// `LISTENER_PROBES` slots, stopping early at an empty one.
#[inline(always)]
pub fn find_key(key: &ListenerKey) -> Option<&'static ListenerSlot> {
    let table = LISTENER_TABLE.get(0)?;
    let half = table.active_half & 1;
    let seed = if half == 0 {
        table.seeds[0]
    } else {
        table.seeds[1]
    };
    let home = lb_common::listener_home(key, seed);
    let word = key.word();
    let mut i = 0;
    while i < LISTENER_PROBES {
        let index = half * LISTENER_SLOT_COUNT + ((home + i) & (LISTENER_SLOT_COUNT - 1));
        let slot = LISTENER_SLOTS.get(index)?;
        if slot.key.word() == word {
            return Some(slot);
        }
        if slot.key.addr == 0 {
            return None;
        }
        i += 1;
    }
    None
}

/// Whether `addr` is a VIP.
#[inline(always)]
pub fn is_vip(addr: u32) -> bool {
    find_key(&ListenerKey::vip(addr)).is_some()
}
