//! Stage 2b: who may reach the listener: its allow-list of source prefixes (a security group's
//! inbound rules), and the global deny-list. Checked on every packet, so that a reload that
//! removes a source cuts its established flows too; a listener without an allow-list, with no
//! deny-list configured, pays two comparisons.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use lb_common::{LISTENER_ALLOW_LIST, Listener, MAX_SOURCE_PREFIXES, Settings, SourceKey};

/// Allowed source prefixes per listener (see `SourceKey`).
#[map]
static ALLOWED_SOURCES: LpmTrie<SourceKey, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_PREFIXES, BPF_F_NO_PREALLOC);

/// Denied source prefixes, for every listener (listener 0 in the key).
#[map]
static DENIED_SOURCES: LpmTrie<SourceKey, u8> =
    LpmTrie::with_max_entries(MAX_SOURCE_PREFIXES, BPF_F_NO_PREALLOC);

/// Whether a packet from `src` may reach `listener`: not denied, and allowed if the listener
/// has an allow-list.
#[inline(always)]
pub fn admitted(src: u32, listener: &Listener, settings: &Settings) -> bool {
    if settings.denied_sources != 0 && DENIED_SOURCES.get(&Key::new(64, [0, src])).is_some() {
        return false;
    }
    listener.flags & LISTENER_ALLOW_LIST == 0
        || ALLOWED_SOURCES
            .get(&Key::new(64, [listener.id, src]))
            .is_some()
}
