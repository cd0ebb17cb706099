//! The balancer: one pass over each frame, all state in maps.
//!
//! Ethernet → IPv4 → TCP/UDP → listener → connection table (or a Maglev pick for a new flow) →
//! rewrite for direct server return (DSR: MAC rewrite; IPIP: outer header) → `XDP_TX`.
//! Anything not addressed to a VIP leaves untouched with `XDP_PASS`. Packets for a VIP that cannot
//! be forwarded are dropped and counted by reason; nothing is logged per packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    Counters, DropReason, FLOW_WAYS, FORWARDING_IPIP, FlowBucket, FlowEntry, FlowKey, FlowTable,
    Group, LISTENER_PROBES, LISTENER_SLOTS as LISTENER_SLOT_COUNT, Listener, ListenerKey,
    ListenerSlot, ListenerTable, MAX_LISTENERS, MAX_TARGETS, PROTO_TCP, PROTO_UDP, SETTINGS_KEY,
    Settings, TARGET_ACTIVE, TARGET_DRAINING, Target, flow_check, listener_home,
};
use lb_ebpf::{ETH_LEN, ETH_P_IP_BE, IPPROTO_IPIP, IPV4_LEN, ptr_at, set_ipv4_checksum, write_mac};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

/// Listeners by (VIP, port, protocol), and every VIP (so that traffic to a VIP port without a
/// listener is dropped rather than passed): two halves of `LISTENER_SLOTS`, probed by
/// `find_key`. Array lookups are inlined by the JIT; a hash map's cost a call and a jhash.
#[map]
static LISTENER_SLOTS: Array<ListenerSlot> = Array::with_max_entries(2 * LISTENER_SLOT_COUNT, 0);

/// The live half of `LISTENER_SLOTS` and the seeds of both.
#[map]
static LISTENER_TABLE: Array<ListenerTable> = Array::with_max_entries(1, 0);

/// Connection table: flow affinity. Sized by the controller at load time.
///
/// A set-associative array that the program indexes itself (`FLOW_TABLE` has its hash): a flow
/// lives in one of its two buckets of `FLOW_WAYS` entries (see `find_entry` for which entry a
/// new flow takes). The kernel's LRU hash cost a call, a jhash and a key comparison per lookup,
/// and its inserts take locks and a free-list node: about half of an established packet's time
/// and most of a new flow's. Mappable, so that the controller reads it as memory to count flows.
#[map]
static FLOWS: Array<FlowBucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
static FLOW_TABLE: Array<FlowTable> = Array::with_max_entries(1, 0);

#[map]
static TARGETS: Array<Target> = Array::with_max_entries(MAX_TARGETS, 0);

/// One entry per target group; index = group id.
#[map]
static GROUPS: Array<Group> = Array::with_max_entries(1, 0);

/// Maglev lookup tables, two halves per group: slot `(group * 2 + half) * size` plus the flow's
/// `Settings::maglev_slot` holds a target id. Sized by the controller at load time.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static LISTENER_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

#[map]
static TARGET_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_TARGETS, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DropReason::COUNT, 0);

const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// More-fragments flag and fragment offset, in the first byte pair of `frags` (network order).
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const IP_DF: u8 = 0x40;
/// Refresh a flow's last-seen time at most this often, to spare a map write per packet. It is
/// also how finely a full bucket tells its busy flows from quiet ones when it must forget one.
const LAST_SEEN_REFRESH_NS: u64 = 100_000_000;

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    // One place asks whether an unforwardable packet was for a VIP: each inlined copy of the
    // listener table's probe loop costs hundreds of instructions.
    balance(&ctx).unwrap_or_else(|(dst, reason)| drop_if_vip(dst, reason))
}

/// The action for the frame, or the destination and reason of a packet that cannot be
/// forwarded: dropped if it was for a VIP, passed otherwise.
#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, (u32, DropReason)> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(XDP_PASS);
    };
    // SAFETY: every pointer below comes from `ptr_at`, which checked it against data_end.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Ok(XDP_PASS);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Ok(XDP_PASS);
    };
    // Only the fields used: copying the whole header costs a byte load and a stack store each.
    let (vihl, proto) = unsafe { ((*ip).vihl, (*ip).proto) };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(XDP_PASS);
    }
    let dst = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
    let frame_len = ctx.data_end() - ctx.data();

    let ihl = ((vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
    let l4_len = if proto == PROTO_TCP {
        TCP_HDR_LEN
    } else {
        UDP_HDR_LEN
    };
    if vihl >> 4 != 4 || ihl < IPV4_LEN || tot_len < ihl + l4_len || ETH_LEN + tot_len > frame_len {
        return Err((dst, DropReason::Malformed));
    }
    if u16::from_be_bytes(unsafe { (*ip).frags }) & IP_MF_OFFSET_MASK != 0 {
        return Err((dst, DropReason::Fragment));
    }
    // `ihl` is at most 60: the mask tells the verifier so.
    let l4_off = ETH_LEN + (ihl & 0x3c);
    // TCP needs its flags; UDP only its ports (the first four bytes of both headers).
    let tcp_flags = if proto == PROTO_TCP {
        let Some(flags) = ptr_at::<u8>(ctx, l4_off + TCP_FLAGS_OFFSET) else {
            return Err((dst, DropReason::Malformed));
        };
        unsafe { *flags }
    } else {
        0
    };
    let Some(ports) = ptr_at::<[u16; 2]>(ctx, l4_off) else {
        return Err((dst, DropReason::Malformed));
    };
    let [sport, dport] = unsafe { *ports };

    let listener_key = ListenerKey {
        addr: dst,
        port: dport,
        proto,
        pad: 0,
    };
    let Some(slot) = find_key(&listener_key) else {
        return Err((dst, DropReason::NoListener));
    };
    let listener = slot.listener;
    let Some(settings) = SETTINGS.get(SETTINGS_KEY) else {
        return Ok(XDP_PASS);
    };
    let Some(group) = GROUPS.get(listener.group) else {
        return Ok(drop(DropReason::NoTarget));
    };

    let key = FlowKey::new(
        u32::from_ne_bytes(unsafe { (*ip).src_addr }),
        dst,
        sport,
        dport,
        proto,
    );
    let Some(table) = FLOW_TABLE.get(0) else {
        return Ok(XDP_PASS);
    };
    let hash = table.hasher.hash(&key);
    let Some((entry, found)) = find_entry(table.buckets_of(hash), &key) else {
        return Ok(drop(DropReason::NoTarget));
    };
    // Idle timeouts count in seconds: the coarse clock (a tick's resolution) is plenty and is
    // cheaper than the precise one, notably in virtual machines.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A SYN starts a new connection, which always takes a fresh pick.
    let is_syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let mut new_flow = false;
    let existing = if found && !is_syn {
        existing_target(entry, hash, &listener, now)
    } else {
        None
    };
    let target_id = match existing {
        Some(id) => id,
        None => {
            let Some(id) = maglev_pick(&key, &listener, group, settings) else {
                return Ok(drop(DropReason::NoTarget));
            };
            new_flow = true;
            // A stray RST must not create state for a flow that does not exist.
            if tcp_flags & TCP_RST == 0 {
                // SAFETY: `entry` points into a bucket, a map value that stays valid for the
                // duration of the program run. Word stores: a struct copy may become a call to
                // LLVM's memcpy subprogram; `FlowKey` is four 32-bit words (asserted in lb-common).
                unsafe {
                    (&raw mut (*entry).key as *mut [u32; 4]).write(key.words());
                    (&raw mut (*entry).target).write(id);
                    (&raw mut (*entry).check).write(flow_check(hash, id));
                    (&raw mut (*entry).last_seen_ns).write(now);
                }
            }
            id
        }
    };
    let Some(target) = TARGETS.get(target_id) else {
        return Ok(drop(DropReason::NoTarget));
    };

    count(&LISTENER_STATS, listener.id, frame_len, new_flow);
    count(&TARGET_STATS, target_id, frame_len, new_flow);

    if group.forwarding == FORWARDING_IPIP {
        // SAFETY: `ip` was bounds-checked above and the frame has not been resized since.
        let inner = unsafe { *ip };
        Ok(encapsulate(ctx, &inner, target, settings))
    } else {
        // SAFETY: `eth` was bounds-checked above and the frame has not been resized since.
        unsafe {
            write_mac(&raw mut (*eth).dst_addr, &target.mac);
            write_mac(&raw mut (*eth).src_addr, &settings.iface_mac);
        }
        Ok(XDP_TX)
    }
}

/// The entry that holds `key` in either of its buckets, and `true`; or else the entry a new flow
/// takes, and `false`: an empty one of the bucket with more empty entries (the buckets fill
/// evenly, so that both of a flow's buckets are rarely full), or if neither has one, the least
/// recently seen of both. The second bucket is read only when the first does not hold the flow.
#[inline(always)]
fn find_entry(buckets: [u32; 2], key: &FlowKey) -> Option<(*mut FlowEntry, bool)> {
    let (entry, found, empty) = find_way(FLOWS.get_ptr_mut(buckets[0])?, key);
    if found {
        return Some((entry, true));
    }
    let (other, found, other_empty) = find_way(FLOWS.get_ptr_mut(buckets[1])?, key);
    let take_other = if empty + other_empty == 0 {
        // SAFETY: both point into buckets, map values valid for the duration of the program run.
        unsafe { (*other).last_seen_ns < (*entry).last_seen_ns }
    } else {
        other_empty > empty
    };
    if found || take_other {
        Some((other, found))
    } else {
        Some((entry, false))
    }
}

/// In `bucket`: the entry that holds `key`, and `true`; or else the entry a new flow would take,
/// the least recently seen (an empty one, never seen, first), and `false`; and how many entries
/// are empty.
#[inline(always)]
fn find_way(bucket: *mut FlowBucket, key: &FlowKey) -> (*mut FlowEntry, bool, u32) {
    let first = bucket as *mut FlowEntry;
    let words = key.words();
    let (mut victim, mut oldest, mut empty) = (first, u64::MAX, 0);
    let mut way = 0;
    while way < FLOW_WAYS {
        // SAFETY: `way` < FLOW_WAYS, the number of entries in a bucket. Plain reads (volatile
        // ones of the key cost an established packet about 10 ns): a key torn by another CPU's
        // write matches no flow, or matches one whose `check` then fails.
        let entry = unsafe { first.add(way) };
        let (stored, seen) = unsafe {
            (
                (&raw const (*entry).key as *const [u32; 4]).read(),
                (&raw const (*entry).last_seen_ns).read(),
            )
        };
        if stored == words {
            return (entry, true, 0);
        }
        if seen < oldest {
            (victim, oldest) = (entry, seen);
        }
        empty += (seen == 0) as u32;
        way += 1;
    }
    (victim, false, empty)
}

/// The target the connection table remembers for this flow, if it is still valid for it: the
/// entry is whole, the flow was not idle too long, and its target is still in the listener's
/// group and either takes flows or drains them.
///
/// Other CPUs may rewrite the entry meanwhile: each field is read once, so the target that is
/// checked is the target returned.
#[inline(always)]
fn existing_target(entry: *mut FlowEntry, hash: u64, listener: &Listener, now: u64) -> Option<u32> {
    // SAFETY: `entry` points into a bucket, a map value valid for the duration of the program run.
    let (id, check, last_seen) = unsafe {
        (
            (&raw const (*entry).target).read_volatile(),
            (&raw const (*entry).check).read_volatile(),
            (&raw const (*entry).last_seen_ns).read_volatile(),
        )
    };
    if check != flow_check(hash, id) {
        return None;
    }
    let idle = now.wrapping_sub(last_seen);
    if idle > listener.idle_timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    let target = TARGETS.get(id)?;
    if (target.state != TARGET_ACTIVE && target.state != TARGET_DRAINING)
        || target.group != listener.group
    {
        return None;
    }
    if idle > LAST_SEEN_REFRESH_NS {
        // SAFETY: as above.
        unsafe { (&raw mut (*entry).last_seen_ns).write(now) };
    }
    Some(id)
}

/// Consistent-hash pick from the group's live Maglev table.
#[inline(always)]
fn maglev_pick(
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

/// Prepends an outer IPv4 header (LB → target, protocol 4) and a fresh Ethernet header.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, inner: &Ipv4Hdr, target: &Target, settings: &Settings) -> u32 {
    let inner_len = u16::from_be_bytes(inner.tot_len) as u32;
    if inner_len + IPV4_LEN as u32 > settings.mtu {
        return drop(DropReason::TooBig);
    }
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(IPV4_LEN as i32)) } != 0 {
        return drop(DropReason::EncapFailed);
    }
    let (Some(eth), Some(outer)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN))
    else {
        return drop(DropReason::EncapFailed);
    };
    // SAFETY: both pointers were bounds-checked just above, after the head moved.
    unsafe {
        write_mac(&raw mut (*eth).dst_addr, &target.mac);
        write_mac(&raw mut (*eth).src_addr, &settings.iface_mac);
        (*eth).ether_type = ETH_P_IP_BE;
        *outer = Ipv4Hdr {
            vihl: 0x45,
            tos: inner.tos,
            tot_len: ((inner_len + IPV4_LEN as u32) as u16).to_be_bytes(),
            id: [0, 0],
            frags: [inner.frags[0] & IP_DF, 0],
            ttl: inner.ttl,
            proto: IPPROTO_IPIP,
            check: [0, 0],
            src_addr: settings.iface_addr.to_ne_bytes(),
            dst_addr: target.addr.to_ne_bytes(),
        };
    }
    set_ipv4_checksum(outer);
    XDP_TX
}

/// The live listener table's slot for `key`: linear probing from its home slot, at most
/// `LISTENER_PROBES` slots, stopping early at an empty one.
#[inline(always)]
fn find_key(key: &ListenerKey) -> Option<&'static ListenerSlot> {
    let table = LISTENER_TABLE.get(0)?;
    let half = table.active_half & 1;
    let seed = if half == 0 {
        table.seeds[0]
    } else {
        table.seeds[1]
    };
    let home = listener_home(key, seed);
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

#[inline(always)]
fn drop_if_vip(dst: u32, reason: DropReason) -> u32 {
    if find_key(&ListenerKey::vip(dst)).is_some() {
        drop(reason)
    } else {
        XDP_PASS
    }
}

#[inline(always)]
fn drop(reason: DropReason) -> u32 {
    if let Some(counter) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU value, no other writer.
        unsafe { *counter += 1 };
    }
    XDP_DROP
}

#[inline(always)]
fn count(stats: &PerCpuArray<Counters>, index: u32, bytes: usize, new_flow: bool) {
    if let Some(c) = stats.get_ptr_mut(index) {
        // SAFETY: per-CPU value, no other writer.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
            (*c).new_flows += new_flow as u64;
        }
    }
}
