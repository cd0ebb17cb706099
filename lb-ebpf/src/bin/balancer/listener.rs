//! Stage 2: the listener a packet is for, from its family's listener table.

use aya_ebpf::{macros::map, maps::Array};
use lb_common::{
    LISTENER_PROBES, LISTENER_SLOTS as LISTENER_SLOT_COUNT, ListenerKeyOf, ListenerSlot,
    ListenerSlot6, ListenerTable,
};

use crate::family::Family;

/// Listeners by (VIP, port, protocol), and every VIP (so that traffic to a VIP port without a
/// listener is dropped rather than passed): two halves of `LISTENER_SLOTS`, probed by
/// `find_key`. Array lookups are inlined by the JIT; a hash map's cost a call and a jhash.
#[map]
pub static LISTENER_SLOTS: Array<ListenerSlot> =
    Array::with_max_entries(2 * LISTENER_SLOT_COUNT, 0);

/// The same for IPv6 VIPs.
#[map]
pub static LISTENER_SLOTS6: Array<ListenerSlot6> =
    Array::with_max_entries(2 * LISTENER_SLOT_COUNT, 0);

/// The live half of both listener tables and the seeds of every half.
#[map]
static LISTENER_TABLE: Array<ListenerTable> = Array::with_max_entries(1, 0);

/// The live listener table's slot for `key`: linear probing from its home slot, at most
/// `LISTENER_PROBES` slots, stopping early at an empty one.
#[inline(always)]
pub fn find_key<F: Family>(key: &F::ListenerKey) -> Option<&'static ListenerSlot<F::ListenerKey>> {
    let table = LISTENER_TABLE.get(0)?;
    let half = table.active_half & 1;
    let home = key.home(F::seed(table, half));
    let mut i = 0;
    while i < LISTENER_PROBES {
        let index = half * LISTENER_SLOT_COUNT + ((home + i) & (LISTENER_SLOT_COUNT - 1));
        let slot = F::listener_slots().get(index)?;
        if slot.key.same(key) {
            return Some(slot);
        }
        if slot.key.is_empty() {
            return None;
        }
        i += 1;
    }
    None
}

/// Whether `addr` is a VIP.
#[inline(always)]
pub fn is_vip<F: Family>(addr: F::Addr) -> bool {
    find_key::<F>(&F::ListenerKey::vip(addr)).is_some()
}
