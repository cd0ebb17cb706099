//! Stage 4: a target for a new flow.

use aya_ebpf::{macros::map, maps::Array};
use lb_common::{FlowKey, Group, Listener, Settings, TARGET_ACTIVE};

use crate::TARGETS;

/// Maglev lookup tables, two halves per group: slot `(group * 2 + half) * size` plus the flow's
/// `Settings::maglev_slot` holds a target id. Sized by the controller at load time.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Consistent-hash pick from the group's live Maglev table.
#[inline(always)]
pub fn maglev(
    key: &FlowKey,
    listener: &Listener,
    group: &Group,
    settings: &Settings,
) -> Option<u32> {
    if group.targets == 0 || settings.maglev_size == 0 {
        return None;
    }
    let size = settings.maglev_size;
    let table = listener.group * 2 + (group.active_half & 1);
    let slot = table * size + settings.maglev_slot(key);
    let id = *MAGLEV.get(slot)?;
    let target = TARGETS.get(id)?;
    (target.state == TARGET_ACTIVE).then_some(id)
}
