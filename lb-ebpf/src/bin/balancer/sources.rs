//! Stage 2b: who may reach the listener: its allow-list of source prefixes (a security group's
//! inbound rules), and the global deny-list. Checked on every packet, so that a reload that
//! removes a source cuts its established flows too; a listener without an allow-list, with no
//! deny-list configured, pays two comparisons.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use lb_common::{
    LISTENER_ALLOW_LIST, Listener, MAX_SOURCE_PREFIXES, Settings, SourceKey, SourceKey6,
};

use crate::family::Family;

/// Allowed source prefixes per listener (see `SourceKey`).
#[map]
static ALLOWED_SOURCES: LpmTrie<SourceKey, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_PREFIXES, BPF_F_NO_PREALLOC);

/// Denied source prefixes, for every listener (listener 0 in the key).
#[map]
static DENIED_SOURCES: LpmTrie<SourceKey, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_PREFIXES, BPF_F_NO_PREALLOC);

/// The same for IPv6 sources (see `SourceKey6`).
#[map]
static ALLOWED_SOURCES6: LpmTrie<SourceKey6, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_PREFIXES, BPF_F_NO_PREALLOC);

#[map]
static DENIED_SOURCES6: LpmTrie<SourceKey6, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_PREFIXES, BPF_F_NO_PREALLOC);

/// Whether a packet from `src` may reach `listener`: not denied, and allowed if the listener
/// has an allow-list.
#[inline(always)]
pub fn admitted<F: Family>(src: F::Addr, listener: &Listener, settings: &Settings) -> bool {
    if settings.denied_sources & (1 << F::INDEX) != 0 && F::listed(true, 0, src) {
        return false;
    }
    listener.flags & LISTENER_ALLOW_LIST == 0 || F::listed(false, listener.id, src)
}

/// Whether IPv4 `src` is in `listener`'s allow-list, or (`denied`) in the deny-list.
#[inline(always)]
pub fn listed4(denied: bool, listener: u32, src: u32) -> bool {
    let key = Key::new(64, [listener, src]);
    if denied {
        DENIED_SOURCES.get(&key).is_some()
    } else {
        ALLOWED_SOURCES.get(&key).is_some()
    }
}

/// The same for IPv6 `src`.
#[inline(always)]
pub fn listed6(denied: bool, listener: u32, src: [u32; 4]) -> bool {
    let key = Key::new(160, [listener, src[0], src[1], src[2], src[3]]);
    if denied {
        DENIED_SOURCES6.get(&key).is_some()
    } else {
        ALLOWED_SOURCES6.get(&key).is_some()
    }
}
