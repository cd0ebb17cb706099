//! Stage 3b: the rate of new flows, for listeners that limit it, in all and per source (a flood
//! meets these before it reaches the pick or the connection table). Flows the table knows are
//! never limited; a listener without limits pays one flag test.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap},
};
use lb_common::{
    ClientKey, ClientKey6, DropReason, Listener, MAX_LISTENERS, NewFlowLimits, RateLimit,
};

use crate::family::Family;

/// Each listener's limits, by listener id; written by the controller.
#[map]
static NEW_FLOW_LIMITS: Array<NewFlowLimits> = Array::with_max_entries(MAX_LISTENERS, 0);

/// Each listener's bucket (see `RateLimit`), by listener id.
#[map]
static LISTENER_BUCKETS: Array<u64> = Array::with_max_entries(MAX_LISTENERS, 0);

/// The bucket of each source of a listener with a per-source limit. Bounded (sized by the
/// controller): when full, the least recently seen source is forgotten and starts again with a
/// full bucket, so a flood from more sources than it holds is held by the listener's limit.
#[map]
pub static SOURCE_BUCKETS: LruHashMap<ClientKey, u64> = LruHashMap::with_max_entries(1, 0);

/// The same for IPv6 sources, per /64.
#[map]
pub static SOURCE_BUCKETS6: LruHashMap<ClientKey6, u64> = LruHashMap::with_max_entries(1, 0);

/// Whether a new flow from `src` may reach `listener` (flagged `LISTENER_RATE_LIMITED`) at
/// `now`, or the reason it may not. The source's bucket first: a source over its own limit
/// takes nothing from the listener's.
#[inline(always)]
pub fn admit<F: Family>(listener: &Listener, src: F::Addr, now: u64) -> Result<(), DropReason> {
    let Some(limits) = NEW_FLOW_LIMITS.get(listener.id) else {
        return Ok(());
    };
    if limits.source.interval_ns != 0 {
        let client = F::client(listener.id, src, true);
        match F::source_bucket(&client) {
            Some(bucket) => {
                if !take(bucket, &limits.source, now) {
                    return Err(DropReason::SourceRateLimit);
                }
            }
            // A source not seen (or forgotten): a full bucket, less this flow.
            None => F::new_source_bucket(&client, now + limits.source.interval_ns),
        }
    }
    if limits.listener.interval_ns != 0
        && let Some(bucket) = LISTENER_BUCKETS.get_ptr_mut(listener.id)
        && !take(bucket, &limits.listener, now)
    {
        return Err(DropReason::ListenerRateLimit);
    }
    Ok(())
}

/// Takes a new flow's token from `bucket`, if `limit` has one for it at `now`.
#[inline(always)]
fn take(bucket: *mut u64, limit: &RateLimit, now: u64) -> bool {
    // SAFETY: a map value, valid and 8-byte aligned for the duration of the program run.
    let time = unsafe { bucket.read_volatile() };
    let Some(next) = limit.admit(time, now) else {
        return false;
    };
    // SAFETY: as above. A bucket that was full is restarted with a store (two CPUs that do so
    // at once let one flow more through); one that was not is advanced by an atomic add, so
    // that CPUs taking tokens at once each take their own.
    unsafe {
        if time <= now {
            bucket.write_volatile(next);
        } else {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bucket, limit.interval_ns);
        }
    }
    true
}
