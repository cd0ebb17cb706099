//! Counters, per CPU: what was forwarded per listener and per target, and what was dropped.

use aya_ebpf::{bindings::xdp_action::XDP_DROP, macros::map, maps::PerCpuArray};
use lb_common::{Counters, DropReason, IcmpCounter, MAX_LISTENERS, MAX_TARGETS, refused_index};

#[map]
static LISTENER_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

#[map]
static TARGET_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

/// ICMP messages sent, by kind (`IcmpCounter`).
#[map]
static ICMP: PerCpuArray<u64> = PerCpuArray::with_max_entries(IcmpCounter::COUNT, 0);

/// New flows each listener's rate limits refused: see `lb_common::refused_index`.
#[map]
static LISTENER_REFUSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_LISTENERS, 0);

/// Counts a forwarded packet of `bytes` for its listener and its target.
#[inline(always)]
pub fn forwarded(listener: u32, target: u32, bytes: usize, new_flow: bool) {
    add(&LISTENER_STATS, listener, bytes, new_flow);
    add(&TARGET_STATS, target, bytes, new_flow);
}

#[inline(always)]
fn add(stats: &PerCpuArray<Counters>, index: u32, bytes: usize, new_flow: bool) {
    if let Some(c) = stats.get_ptr_mut(index) {
        // SAFETY: per-CPU value, no other writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
            (*c).new_flows += new_flow as u64;
        }
    }
}

/// Counts a new flow that `listener`'s rate limit refused, for it and as a drop; the verdict
/// that drops it.
#[inline(always)]
pub fn refused(listener: u32, reason: DropReason) -> u32 {
    if let Some(counter) = LISTENER_REFUSED.get_ptr_mut(refused_index(listener, reason)) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
    drop(reason)
}

/// Counts an ICMP message sent.
#[inline(always)]
pub fn icmp(kind: IcmpCounter) {
    if let Some(counter) = ICMP.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
}

/// Counts a dropped packet by reason; the verdict that drops it.
#[inline(always)]
pub fn drop(reason: DropReason) -> u32 {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
    XDP_DROP
}
