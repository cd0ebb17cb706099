//! Map keys and values shared by the XDP data plane (`lb-ebpf`) and the controller (`lb`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so both sides agree on the layout
//! byte for byte and the kernel never hashes uninitialised padding. Addresses and ports are kept
//! in network byte order, as they appear on the wire, so the data plane never swaps bytes on the
//! fast path; the controller converts once when it writes the maps.
#![no_std]

use core::mem::size_of;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Capacities of the maps whose size the controller does not choose at load time.
pub const MAX_LISTENERS: u32 = 1024;
pub const MAX_TARGETS: u32 = 16384;

/// Slots per half of the listener table: a power of two, and at least four times the keys and
/// VIPs of any config (`MAX_LISTENERS` listeners, each `tcp_udp` on a VIP of its own: three
/// entries apiece), so that probe sequences stay short.
pub const LISTENER_SLOTS: u32 = 16 * MAX_LISTENERS;
/// The data plane looks at most this many consecutive slots for a key. The controller places
/// every key within this many slots of its home, choosing a seed for which that holds.
pub const LISTENER_PROBES: u32 = 8;

/// What `lb_balancer6` (and `lb_icmp6`) tell `lb_nat6` of the IPv6 packet they hand on, in a
/// per-CPU map (a tail call runs on its caller's CPU, before anything else runs there): a
/// NAT request to target `target` of listener `listener` (`new_flow`: the flow's first
/// packet), or (`target` is `HANDOFF_REPLY`) a packet for no listener, which may be a NAT
/// reply, or (`HANDOFF_ICMP`) an ICMPv6 error that may be about a NAT flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handoff {
    pub target: u32,
    pub listener: u32,
    pub new_flow: u32,
}

pub const HANDOFF_REPLY: u32 = u32::MAX;
pub const HANDOFF_ICMP: u32 = u32::MAX - 1;

impl Handoff {
    #[inline(always)]
    pub fn request(target: u32, listener: u32, new_flow: bool) -> Self {
        Handoff {
            target,
            listener,
            new_flow: new_flow as u32,
        }
    }

    #[inline(always)]
    pub fn reply() -> Self {
        Handoff {
            target: HANDOFF_REPLY,
            ..Handoff::default()
        }
    }

    #[inline(always)]
    pub fn icmp() -> Self {
        Handoff {
            target: HANDOFF_ICMP,
            ..Handoff::default()
        }
    }
}

/// Index of the only entry of the `SETTINGS` array.
pub const SETTINGS_KEY: u32 = 0;

/// The programs the balancer hands frames on to, by their index in its `STAGES` array: IPv4
/// that is neither TCP nor UDP (`lb_icmp4`), all IPv6 (`lb_balancer6`), and from it, IPv6
/// that is neither TCP nor UDP (`lb_icmp6`) and IPv6's NAT requests, replies and ICMPv6
/// errors (`lb_nat6`).
pub const STAGE_ICMP4: u32 = 0;
pub const STAGE_IPV6: u32 = 1;
pub const STAGE_NAT6: u32 = 2;
pub const STAGE_ICMP6: u32 = 3;
pub const STAGE_COUNT: u32 = 4;
/// Their names in the balancer's object, by index.
pub const STAGE_PROGRAMS: [&str; STAGE_COUNT as usize] =
    ["lb_icmp4", "lb_balancer6", "lb_nat6", "lb_icmp6"];

/// A listener is found by VIP, port and protocol.
///
/// The same triple, with the target's port, keys a target host's reply ports: what its
/// replies from (VIP, target port, protocol) must say as their source port (the listener's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// VIP, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

impl ListenerKey {
    /// The key that marks a VIP: no listener has port 0 or protocol 0.
    pub const fn vip(addr: u32) -> Self {
        ListenerKey {
            addr,
            port: 0,
            proto: 0,
            pad: 0,
        }
    }

    /// The key as one word, for a comparison the BPF program makes in one instruction.
    #[inline(always)]
    pub fn word(&self) -> u64 {
        let [p0, p1] = self.port.to_ne_bytes();
        let a = self.addr.to_ne_bytes();
        u64::from_ne_bytes([a[0], a[1], a[2], a[3], p0, p1, self.proto, self.pad])
    }
}

/// An IPv6 listener's key: the IPv6 counterpart of `ListenerKey`, in the IPv6 listener table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey6 {
    /// VIP, network byte order.
    pub addr: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// What the listener table needs of a key, in either family.
pub trait ListenerKeyOf: Copy + PartialEq {
    type Addr: Copy + PartialEq;
    /// The key of (VIP, port, protocol), addresses and port in network byte order.
    fn new(addr: Self::Addr, port: u16, proto: u8) -> Self;
    /// The key that marks a VIP: no listener has port 0 or protocol 0.
    #[inline(always)]
    fn vip(addr: Self::Addr) -> Self {
        Self::new(addr, 0, 0)
    }
    /// Its VIP.
    fn address(&self) -> Self::Addr;
    /// Its port, network byte order.
    fn port(&self) -> u16;
    /// Whether the slot holding this key is empty (all zero; the unspecified address is never
    /// a VIP).
    fn is_empty(&self) -> bool;
    /// The slot where the search for the key starts, in a half of `LISTENER_SLOTS`.
    fn home(&self, seed: u32) -> u32;
    /// Whether it is the same key (IPv4's in one comparison of one word).
    fn same(&self, other: &Self) -> bool;
}

impl ListenerKeyOf for ListenerKey {
    type Addr = u32;

    #[inline(always)]
    fn new(addr: u32, port: u16, proto: u8) -> Self {
        ListenerKey {
            addr,
            port,
            proto,
            pad: 0,
        }
    }

    #[inline(always)]
    fn port(&self) -> u16 {
        self.port
    }

    #[inline(always)]
    fn address(&self) -> u32 {
        self.addr
    }

    #[inline(always)]
    fn is_empty(&self) -> bool {
        self.addr == 0
    }

    #[inline(always)]
    fn home(&self, seed: u32) -> u32 {
        listener_home(self, seed)
    }

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        self.word() == other.word()
    }
}

impl ListenerKeyOf for ListenerKey6 {
    type Addr = [u32; 4];

    #[inline(always)]
    fn new(addr: [u32; 4], port: u16, proto: u8) -> Self {
        ListenerKey6 {
            addr,
            port,
            proto,
            pad: 0,
        }
    }

    #[inline(always)]
    fn port(&self) -> u16 {
        self.port
    }

    #[inline(always)]
    fn address(&self) -> [u32; 4] {
        self.addr
    }

    #[inline(always)]
    fn is_empty(&self) -> bool {
        let a = self.addr;
        a[0] | a[1] | a[2] | a[3] == 0
    }

    /// The address folded to one word with the port and protocol, then hashed as IPv4's.
    #[inline(always)]
    fn home(&self, seed: u32) -> u32 {
        let a = self.addr;
        let folded = ListenerKey {
            addr: a[0] ^ a[1].rotate_left(8) ^ a[2].rotate_left(16) ^ a[3].rotate_left(24),
            port: self.port,
            proto: self.proto,
            pad: 0,
        };
        listener_home(&folded, seed)
    }

    /// Word by word, for the reason `FlowKeyOf::same_words` gives.
    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        let (a, b) = (self.addr, other.addr);
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
            && self.port == other.port
            && self.proto == other.proto
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Listener {
    /// Index into the per-listener counters.
    pub id: u32,
    /// Index of the listener's target group.
    pub group: u32,
    /// A flow idle longer than this (seconds) is a new flow.
    pub idle_timeout_s: u32,
    /// `LISTENER_ALLOW_LIST`, or 0.
    pub flags: u32,
}

/// `Listener::flags`: only sources in the listener's allow-list (`ALLOWED_SOURCES`) reach it.
pub const LISTENER_ALLOW_LIST: u32 = 1;
/// `Listener::flags`: the rate of its new flows is limited (`NEW_FLOW_LIMITS`), in all, per
/// source, or both.
pub const LISTENER_RATE_LIMITED: u32 = 2;

/// A limit on the rate of new flows: a token bucket that holds one second's worth, kept as one
/// timestamp per bucket (GCRA, the generic cell rate algorithm). Each flow let through moves the
/// bucket's time `interval_ns` later, from now if it lies in the past (a full bucket); a flow
/// that finds it more than `burst_ns` ahead of now would overdraw the bucket and is dropped.
/// All zero: no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub interval_ns: u64,
    pub burst_ns: u64,
}

impl RateLimit {
    /// At most `n` new flows per second, up to `n` at once; 0: no limit.
    pub const fn per_second(n: u32) -> Self {
        if n == 0 {
            return RateLimit {
                interval_ns: 0,
                burst_ns: 0,
            };
        }
        let interval_ns = 1_000_000_000 / n as u64;
        RateLimit {
            interval_ns,
            burst_ns: interval_ns * (n as u64 - 1),
        }
    }

    /// The bucket's time after a new flow at `now` with the bucket's time at `bucket`, or `None`
    /// if the flow would overdraw it.
    #[inline(always)]
    pub fn admit(&self, bucket: u64, now: u64) -> Option<u64> {
        if bucket <= now {
            Some(now + self.interval_ns)
        } else if bucket - now <= self.burst_ns {
            Some(bucket + self.interval_ns)
        } else {
            None
        }
    }
}

/// The index of the count of new flows that `listener`'s limit `reason` (`ListenerRateLimit` or
/// `SourceRateLimit`) refused.
#[inline(always)]
pub fn refused_index(listener: u32, reason: DropReason) -> u32 {
    listener * 2 + (reason as u32 == DropReason::SourceRateLimit as u32) as u32
}

/// A listener's limits on new flows: in all, and per source address. Indexed by listener id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewFlowLimits {
    pub listener: RateLimit,
    pub source: RateLimit,
}

/// Prefixes the source tries hold at most, allowed and denied each (they are not preallocated:
/// they cost what they hold).
pub const MAX_SOURCE_PREFIXES: u32 = 65_536;

/// The data of a source trie's key (longest-prefix match, most significant bit first): the
/// listener id, which every prefix matches whole (0 in the global deny list), then the source
/// address, network byte order. A prefix of length n is keyed with `prefix_len` 32 + n.
pub type SourceKey = [u32; 2];
/// The same for IPv6 sources: the listener id, then the source address (prefix length 32 + n).
pub type SourceKey6 = [u32; 5];

/// One slot of the listener table: a listener, a VIP (`ListenerKey::vip`, listener unused), or
/// nothing (all zero; 0.0.0.0 is never a VIP).
///
/// The table is an array that the program probes itself (open addressing, `listener_home`):
/// the kernel's hash maps cost a jhash and a call per lookup, about 20 ns here, on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerSlot<K = ListenerKey> {
    pub key: K,
    pub listener: Listener,
}

/// A slot of the IPv6 listener table.
pub type ListenerSlot6 = ListenerSlot<ListenerKey6>;

/// Which half of the double-buffered listener table is live, and the seed each half was placed
/// with. The controller fills the inactive half, writes its seed, then flips `active_half`: two
/// writes that change one field each, so a packet sees one consistent half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerTable {
    pub active_half: u32,
    pub seeds: [u32; 2],
    pub pad: u32,
    /// The seeds of the IPv6 table's halves, which flip with the IPv4 table's.
    pub seeds6: [u32; 2],
}

/// The slot where the search for `key` starts, in a half of `LISTENER_SLOTS`.
///
/// Multiply-shift hashing: the seed's multiple and the multiplier are independent of each other,
/// so the whole hash is about two multiplies deep. Murmur's chain of six dependent multiplies
/// cost about 8 ns per probe here, and every packet probes once (twice when not for a VIP).
#[inline(always)]
pub fn listener_home(key: &ListenerKey, seed: u32) -> u32 {
    let mixed = key.word() ^ (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed.wrapping_mul(0xd6e8_feb8_6659_fd93) >> (64 - LISTENER_SLOTS.trailing_zeros())) as u32
}

/// The 5-tuple of a flow as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

impl FlowKey {
    /// The key of a flow, padding zeroed.
    ///
    /// Built as four 32-bit words: a `pad: [0; 3]` literal (or `mem::zeroed`) becomes a call to
    /// LLVM's byte-by-byte `memset` subprogram in BPF code, on every packet.
    #[inline(always)]
    pub fn new(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Self {
        let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
        let words = [
            src,
            dst,
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `FlowKey` is 16 bytes of plain integers with this exact layout (asserted below).
        unsafe { core::mem::transmute::<[u32; 4], FlowKey>(words) }
    }

    /// The key as four words, for comparisons and hashing without byte accesses.
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        // SAFETY: as in `new`.
        unsafe { core::mem::transmute::<FlowKey, [u32; 4]>(*self) }
    }
}

/// The 5-tuple of an IPv6 flow as the client sent it: `FlowKey`'s counterpart, in the IPv6
/// connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

impl FlowKey6 {
    /// The key of a flow, padding zeroed (built from words, as `FlowKey::new` is).
    #[inline(always)]
    pub fn new(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
        let words = [
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            u32::from_ne_bytes([s[0], s[1], d[0], d[1]]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: `FlowKey6` is 40 bytes of plain integers with this exact layout (asserted
        // below).
        unsafe { core::mem::transmute::<[u32; 10], FlowKey6>(words) }
    }
}

/// What the connection table and the pick need of a flow's key, in either family.
pub trait FlowKeyOf: Copy + PartialEq {
    /// The client's address.
    type Addr: Copy + PartialEq + Default;
    /// The key as words, read and written whole (a struct copy may become a call to LLVM's
    /// `memcpy` subprogram in BPF code).
    type Words: Copy + PartialEq;
    fn new(src: Self::Addr, dst: Self::Addr, sport: u16, dport: u16, proto: u8) -> Self;
    fn words(&self) -> Self::Words;
    /// Whether two keys' words are equal. Without a slice comparison: in BPF code that becomes
    /// a byte-by-byte `memcmp` subprogram, whose every byte the verifier walks.
    fn same_words(a: &Self::Words, b: &Self::Words) -> bool;
    fn src(&self) -> Self::Addr;
    /// The hash of the key with `hasher`'s coefficients.
    fn hash(&self, hasher: &FlowHasher) -> u64;
}

impl FlowKeyOf for FlowKey {
    type Addr = u32;
    type Words = [u32; 4];

    #[inline(always)]
    fn new(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> Self {
        FlowKey::new(src, dst, sport, dport, proto)
    }

    #[inline(always)]
    fn words(&self) -> [u32; 4] {
        FlowKey::words(self)
    }

    #[inline(always)]
    fn same_words(a: &[u32; 4], b: &[u32; 4]) -> bool {
        a == b
    }

    #[inline(always)]
    fn src(&self) -> u32 {
        self.src
    }

    #[inline(always)]
    fn hash(&self, hasher: &FlowHasher) -> u64 {
        hasher.hash(self)
    }
}

impl FlowKeyOf for FlowKey6 {
    type Addr = [u32; 4];
    type Words = [u32; 10];

    #[inline(always)]
    fn new(src: [u32; 4], dst: [u32; 4], sport: u16, dport: u16, proto: u8) -> Self {
        FlowKey6::new(src, dst, sport, dport, proto)
    }

    #[inline(always)]
    fn words(&self) -> [u32; 10] {
        // SAFETY: as in `FlowKey6::new`.
        unsafe { core::mem::transmute::<FlowKey6, [u32; 10]>(*self) }
    }

    #[inline(always)]
    fn same_words(a: &[u32; 10], b: &[u32; 10]) -> bool {
        let mut diff = 0;
        let mut i = 0;
        while i < 10 {
            diff |= a[i] ^ b[i];
            i += 1;
        }
        diff == 0
    }

    #[inline(always)]
    fn src(&self) -> [u32; 4] {
        self.src
    }

    #[inline(always)]
    fn hash(&self, hasher: &FlowHasher) -> u64 {
        let w = self.words();
        let m = &hasher.multipliers;
        let mut sum = hasher.offset;
        let mut i = 0;
        while i < 10 {
            sum = sum.wrapping_add((u32::from_be(w[i]) as u64).wrapping_mul(m[i]));
            i += 1;
        }
        sum
    }
}

/// Entries per bucket of the connection table: four 32-byte entries, two cache lines. Each flow
/// has two buckets to choose from (`FlowTable::buckets_of`).
pub const FLOW_WAYS: usize = 4;

/// One entry of the connection table: a flow and the target it keeps.
///
/// Entries are written field by field, by any CPU, while others read them: `check` is what makes
/// a torn entry (the key of one flow with the target of another) detectable. It is computed from
/// the flow's hash and the target, so a reader finds it valid only if it was written for its own
/// flow with this target. A zeroed entry is never valid: `check` is odd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry<K = FlowKey> {
    pub key: K,
    /// Index into `TARGETS`.
    pub target: u32,
    /// `flow_check` of the flow's hash and `target`.
    pub check: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) when the flow was last refreshed.
    pub last_seen_ns: u64,
}

/// A bucket of the connection table: the flows whose hash falls on it, `FLOW_WAYS` at most.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBucket<K = FlowKey> {
    pub entries: [FlowEntry<K>; FLOW_WAYS],
}

/// An entry and a bucket of the IPv6 connection table.
pub type FlowEntry6 = FlowEntry<FlowKey6>;
pub type FlowBucket6 = FlowBucket<FlowKey6>;

/// A multiply-add-shift hash of a flow's 5-tuple: four independent multiplies, which the CPU
/// runs side by side (murmur3's chain of dependent multiplies cost a new flow about 10 ns more
/// here). With secret random coefficients, as the connection table's are, it is universal:
/// nobody who does not know them can aim flows at one bucket. The Maglev pick's come from
/// `hash_seed`, which is only as secret as the operator keeps it.
///
/// It reads the key's words in network order, so that nodes of any endianness sharing a VIP
/// compute the same Maglev pick.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowHasher {
    /// Odd multipliers of the key's words: an IPv4 key's four use the first four, an IPv6
    /// key's ten all.
    pub multipliers: [u64; 10],
    pub offset: u64,
}

impl FlowHasher {
    /// The hasher with these coefficients: four multipliers (made odd), the offset, and six
    /// multipliers more. In this order so that an IPv4 key's hash is what it was before IPv6
    /// came: nodes of both versions that share a `hash_seed` pick alike during an upgrade.
    pub fn new(words: [u64; 11]) -> Self {
        FlowHasher {
            multipliers: core::array::from_fn(|i| words[if i < 4 { i } else { i + 1 }] | 1),
            offset: words[4],
        }
    }

    /// The hasher of the Maglev pick for `seed`: its coefficients are SplitMix64's sequence from
    /// the seed, so every node with the same `hash_seed` picks alike.
    pub fn from_seed(seed: u32) -> Self {
        Self::new(core::array::from_fn(|i| {
            splitmix64((seed as u64).wrapping_add(i as u64 * SPLITMIX64_GAMMA))
        }))
    }

    #[inline(always)]
    pub fn hash(&self, key: &FlowKey) -> u64 {
        let w = key.words();
        let m = &self.multipliers;
        (u32::from_be(w[0]) as u64)
            .wrapping_mul(m[0])
            .wrapping_add((u32::from_be(w[1]) as u64).wrapping_mul(m[1]))
            .wrapping_add((u32::from_be(w[2]) as u64).wrapping_mul(m[2]))
            .wrapping_add((u32::from_be(w[3]) as u64).wrapping_mul(m[3]))
            .wrapping_add(self.offset)
    }
}

const SPLITMIX64_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64: the `x`-th value of its sequence, a well-mixed 64-bit word for each input.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(SPLITMIX64_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `half` (below 2^32) scaled to `0..n`: an index from 32 hash bits without a division.
#[inline(always)]
pub fn scale(half: u64, n: u32) -> u32 {
    ((half * n as u64) >> 32) as u32
}

/// The connection table's shape and hash: its number of buckets and a hasher with random
/// coefficients, chosen when the table is created. A secret hash keeps anyone from aiming flows
/// at one bucket, as the kernel's own hash maps do with a random seed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowTable {
    pub buckets: u32,
    /// `MAP_LAYOUT` of the lb that created the maps.
    pub layout: u32,
    pub hasher: FlowHasher,
}

/// The version of what the maps hold and mean. A successor adopts pinned maps only if their
/// layout is its own: bump this whenever a map's contents change meaning (a key's hash, a
/// field), even if no size changes.
pub const MAP_LAYOUT: u32 = 13;

impl FlowTable {
    /// The two buckets a flow with this hash may live in: each half of the hash scaled to the
    /// bucket count. A new flow takes an empty entry of the emptier one, so the table fills
    /// evenly, and a flow is forgotten only when both of its buckets are full.
    #[inline(always)]
    pub fn buckets_of(&self, hash: u64) -> [u32; 2] {
        [
            scale(hash >> 32, self.buckets),
            scale(hash & 0xffff_ffff, self.buckets),
        ]
    }

    /// Whether `entry` was written whole, for its own flow and target (see [`FlowEntry`]).
    pub fn is_whole<K: FlowKeyOf>(&self, entry: &FlowEntry<K>) -> bool {
        entry.check == flow_check(entry.key.hash(&self.hasher), entry.target)
    }
}

/// The `check` of an entry for a flow with this hash and target (odd, so never zero).
///
/// Both halves of the hash go in: flows that share a bucket share the top bits of one half.
#[inline(always)]
pub fn flow_check(hash: u64, target: u32) -> u32 {
    (hash as u32 ^ (hash >> 32) as u32 ^ target.wrapping_mul(0x9e37_79b9)) | 1
}

/// `Target::state`: a free slot.
pub const TARGET_FREE: u16 = 0;
/// Takes new flows (it is in the Maglev table) and keeps its existing ones.
pub const TARGET_ACTIVE: u16 = 1;
/// Deregistered: keeps its existing flows until they end or the delay passes; no new ones.
pub const TARGET_DRAINING: u16 = 2;
/// Failing its health check: its flows move to a healthy target.
pub const TARGET_UNHEALTHY: u16 = 3;

/// A target as the data plane needs it: where to send, never how it was configured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Target address, network byte order (outer destination in IPIP mode); 0 for a target
    /// named by IPv6 address (`addr6`).
    pub addr: u32,
    /// Group the target belongs to; a flow whose target moved group is picked again.
    pub group: u32,
    /// Layer-2 next hop: the target itself in DSR mode, the gateway towards it in IPIP mode.
    pub mac: [u8; 6],
    /// `TARGET_ACTIVE`, `TARGET_DRAINING`, `TARGET_UNHEALTHY` or `TARGET_FREE`.
    pub state: u16,
    /// The port the target serves on, network byte order. Where it differs from the
    /// listener's, the data plane rewrites the destination port (port translation).
    pub port: u16,
    /// Which of `Settings::interfaces` reaches the target (dsr and ipip; nat routes).
    pub egress: u16,
    /// Its weight (1 to 1000): least connections compares active connections per weight.
    pub weight: u16,
    /// Whether the target is named by an IPv6 address (`addr6`; `addr` then 0): ipip then
    /// encapsulates in IPv6 (ip6ip6, or IPv4-in-IPv6 for an IPv4 VIP).
    pub ipv6: u16,
    /// Its IPv6 address, network byte order, if it has one.
    pub addr6: [u32; 4],
}

pub const FORWARDING_DSR: u32 = 0;
pub const FORWARDING_IPIP: u32 = 1;
pub const FORWARDING_NAT: u32 = 2;

/// In a connection-table entry's `target`: the entry is a NAT flow's reverse entry. Its key is
/// the 5-tuple of the target's replies (target → client), and the rest of `target` is the
/// listener id, whose VIP and port the replies get as their source.
pub const FLOW_REVERSE: u32 = 1 << 31;
/// Low bits of `FlowEntry::last_seen_ns` that are flags, not time (the data plane's clock is
/// masked to leave them free; a few nanoseconds are nothing to an idle timeout).
pub const FLOW_FLAGS: u64 = 31;
/// The flow ended (an RST, or a FIN each way): it is kept only for its linger, never refreshed.
pub const FLOW_CLOSING: u64 = 1;
/// On a reverse entry: a FIN was seen from the client, and from the target.
pub const FLOW_FIN_CLIENT: u64 = 2;
pub const FLOW_FIN_TARGET: u64 = 4;
/// On a forward entry: the flow no longer counts as one of its target's active connections
/// (`ACTIVE`). The data plane sets it when the client sends a FIN or an RST, the controller when
/// the flow went idle or its target left. An entry without it is counted, exactly once: +1 when
/// written, −1 when the flag is set or the entry is overwritten.
pub const FLOW_ENDED: u64 = 8;
/// The flow has shown only its first packet (a TCP SYN, or a UDP flow's first datagram): a new
/// flow may take its entry. The client's next packet (for TCP, the ACK after its SYN; for UDP,
/// a second datagram), or for a NAT reverse entry the target's first reply, makes it
/// established, and a new flow never takes an established flow's entry: a flood of SYNs from
/// random sources turns over only the other embryonic flows.
pub const FLOW_EMBRYONIC: u64 = 16;

/// Per target group: which half of its double-buffered Maglev table is live.
///
/// The controller fills the inactive half and then flips `active_half` with one map write, so a
/// packet sees either the old table or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    pub active_half: u32,
    /// Number of targets in the live table; 0 means the group has nothing to send to.
    pub targets: u32,
    /// `FORWARDING_DSR`, `FORWARDING_IPIP` or `FORWARDING_NAT`.
    pub forwarding: u32,
    /// How a new flow picks its target: `ALGORITHM_MAGLEV`, `ALGORITHM_SOURCE_IP`,
    /// `ALGORITHM_ROUND_ROBIN` or `ALGORITHM_LEAST_CONNECTIONS`.
    pub algorithm: u32,
    /// Round robin: how many slots of the live table hold the sequence new flows take in turn;
    /// least connections: how many hold the targets, each once.
    pub sequence: u32,
    /// Stickiness: how long, in seconds, a client keeps the target it got, after its last new
    /// flow; 0 for none.
    pub stickiness_s: u32,
}

/// Maglev over the 5-tuple: the table slot from the flow's hash.
pub const ALGORITHM_MAGLEV: u32 = 0;
/// Maglev over the client's address alone: all of a client's flows go to one target.
pub const ALGORITHM_SOURCE_IP: u32 = 1;
/// The table holds a weighted sequence of targets, which new flows take in turn.
pub const ALGORITHM_ROUND_ROBIN: u32 = 2;
/// The table holds the targets: a new flow takes the one with the fewest active connections
/// per weight.
pub const ALGORITHM_LEAST_CONNECTIONS: u32 = 3;

/// Least connections compares every target of a group up to this many; a larger group compares
/// two candidates that the flow's hash chooses (the "power of two choices").
pub const LEAST_CONNECTIONS_SCAN: u32 = 32;

/// The two candidates, of `targets`, that least connections compares for a flow with
/// connection-table hash `hash` in a group larger than `LEAST_CONNECTIONS_SCAN`: one from each
/// half of the hash. The first also starts the scan of a smaller group.
#[inline(always)]
pub fn two_choices(hash: u64, targets: u32) -> [u32; 2] {
    [
        scale(hash >> 32, targets),
        scale(hash & 0xffff_ffff, targets),
    ]
}

/// A target's active connections from its `ACTIVE` word: a count that a race between CPUs took
/// below zero (the controller corrects it within a second) is none.
#[inline(always)]
pub fn connections(word: u64) -> u64 {
    if (word as i64) < 0 { 0 } else { word }
}

/// Least connections' comparison (IPVS wlc): whether a target with `a.0` active connections and
/// weight `a.1` has fewer per weight than one with `b`; compared as products, to spare a
/// division.
#[inline(always)]
pub fn fewer_connections(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 * b.1 < b.0 * a.1
}

/// A client of a listener: the key of the `STICKY` table (the target it keeps) and of the
/// `SOURCE_BUCKETS` table (its new flows' rate).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub listener: u32,
    /// The client's address, network byte order.
    pub client: u32,
}

/// A client of an IPv6 listener, as `ClientKey`: its whole address in the `STICKY6` table, its
/// /64 (the rest zero) in `SOURCE_BUCKETS6`, since one host commonly holds a whole /64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey6 {
    pub listener: u32,
    pub client: [u32; 4],
}

/// The target a client of a sticky listener keeps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sticky {
    /// Index into `TARGETS`, and the address it had: a slot freed and taken by another target
    /// does not inherit the clients.
    pub target: u32,
    pub addr: u32,
    /// When the client last opened a flow (the data plane's clock).
    pub last_ns: u64,
}

/// Global values the data plane reads on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Slots per Maglev table (a prime).
    pub maglev_size: u32,
    /// Per family, whether a listener of it forwards with NAT (`NAT_IPV4`, `NAT_IPV6`): only
    /// then may a packet of that family that is not for a VIP be a reply to translate, worth a
    /// connection-table lookup.
    pub nat: u32,
    /// Per family, whether its global deny-list (`DENIED_SOURCES`, `DENIED_SOURCES6`) holds any
    /// prefix: only then is the source of a packet for a listener looked up in it. Bit 0 IPv4,
    /// bit 1 IPv6.
    pub denied_sources: u32,
    /// Whether echo requests to a VIP are answered (`settings.answer_ping`).
    pub answer_ping: u32,
    /// Whether any listener has an IPv6 VIP: only then does the balancer hand IPv6 frames to
    /// `lb_balancer6`; without, they pass at once, and a balancer without IPv6 listeners pays
    /// nothing for IPv6 (neighbour discovery among it).
    pub ipv6: u32,
    pub pad: u32,
    /// The interfaces the program is attached to, first the one named first; a target's
    /// `egress` is an index into them.
    pub interfaces: [Egress; MAX_INTERFACES],
    /// The hash of the Maglev pick, from `hash_seed`: the same on every node that shares VIPs.
    pub pick: FlowHasher,
}

impl Settings {
    /// The slot of a new flow in its group's Maglev table.
    ///
    /// Both sides use this one function, so the controller (and its tests) can predict exactly
    /// which target the data plane picks.
    #[inline(always)]
    pub fn maglev_slot<K: FlowKeyOf>(&self, key: &K) -> u32 {
        scale(key.hash(&self.pick) >> 32, self.maglev_size)
    }
}

/// `Settings::nat`'s bits.
pub const NAT_IPV4: u32 = 1;
pub const NAT_IPV6: u32 = 2;

/// How many interfaces one balancer may be attached to.
pub const MAX_INTERFACES: usize = 8;

/// One of the balancer's interfaces, as a frame sent from it needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    pub ifindex: u32,
    /// Its IPv4 address, network byte order: the outer source in IPIP mode.
    pub addr: u32,
    /// Largest IP packet it sends; larger encapsulated packets are dropped and counted.
    pub mtu: u32,
    /// The source of every frame sent from it.
    pub mac: [u8; 6],
    pub pad: u16,
    /// Its global IPv6 address, network byte order: the outer source of IPv6 encapsulation.
    pub addr6: [u32; 4],
}

/// Packet, byte and new-flow counters, kept per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Why the data plane dropped a packet addressed to a VIP. Indexes the `DROPS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// TCP or UDP to a VIP on a port (or protocol) without a listener.
    NoListener = 0,
    /// Headers cut short or inconsistent.
    Malformed = 1,
    /// Fragments (IPv4, or IPv6's fragment header) carry no ports to balance on.
    Fragment = 2,
    /// The listener's target group has no target.
    NoTarget = 3,
    /// The encapsulated packet would exceed the interface MTU (with DF set, the client is told
    /// so: `IcmpCounter::TooBigSent`).
    TooBig = 4,
    /// The kernel refused to grow the frame for the outer header.
    EncapFailed = 5,
    /// The source is not in the listener's allow-list, or is in the global deny-list.
    DeniedSource = 6,
    /// A new flow found both of its connection-table buckets full of established flows.
    FlowTableFull = 7,
    /// A new flow beyond its listener's `max_new_flows_per_second`.
    ListenerRateLimit = 8,
    /// A new flow beyond its listener's `max_new_flows_per_second_per_source` for its source.
    SourceRateLimit = 9,
    /// An ICMP error to a VIP about no flow lb can place: it quotes no TCP or UDP packet from a
    /// listener, or a flow the connection table does not hold under an algorithm that cannot
    /// place it again (round robin, least connections).
    IcmpUnmatched = 10,
    /// An IPv6 packet with more extension headers before its TCP or UDP header than lb skips.
    ExtensionHeaders = 11,
}

impl DropReason {
    pub const COUNT: u32 = 12;
    pub const ALL: [DropReason; Self::COUNT as usize] = [
        Self::NoListener,
        Self::Malformed,
        Self::Fragment,
        Self::NoTarget,
        Self::TooBig,
        Self::EncapFailed,
        Self::DeniedSource,
        Self::FlowTableFull,
        Self::ListenerRateLimit,
        Self::SourceRateLimit,
        Self::IcmpUnmatched,
        Self::ExtensionHeaders,
    ];

    /// The label operators see in metrics and `lb status`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoListener => "no_listener",
            Self::Malformed => "malformed",
            Self::Fragment => "fragment",
            Self::NoTarget => "no_target",
            Self::TooBig => "too_big",
            Self::EncapFailed => "encap_failed",
            Self::DeniedSource => "denied_source",
            Self::FlowTableFull => "flow_table_full",
            Self::ListenerRateLimit => "listener_rate_limit",
            Self::SourceRateLimit => "source_rate_limit",
            Self::IcmpUnmatched => "icmp_unmatched",
            Self::ExtensionHeaders => "extension_headers",
        }
    }
}

/// ICMP messages the data plane sent, by kind. Indexes the `ICMP` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpCounter {
    /// Echo replies to echo requests for a VIP.
    EchoReply = 0,
    /// "Fragmentation needed" to a client whose packet would exceed the MTU once encapsulated.
    TooBigSent = 1,
    /// Errors about a flow's reply, sent to a VIP, forwarded to the flow's target.
    ErrorToTarget = 2,
    /// Errors about a NAT flow's request, from the target's side, forwarded to its client.
    ErrorToClient = 3,
}

impl IcmpCounter {
    pub const COUNT: u32 = 4;
    pub const ALL: [IcmpCounter; Self::COUNT as usize] = [
        Self::EchoReply,
        Self::TooBigSent,
        Self::ErrorToTarget,
        Self::ErrorToClient,
    ];

    /// The label operators see in metrics and `lb status`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EchoReply => "echo_reply",
            Self::TooBigSent => "too_big_sent",
            Self::ErrorToTarget => "error_to_target",
            Self::ErrorToClient => "error_to_client",
        }
    }
}

const _: () = {
    assert!(size_of::<ListenerKey>() == 8);
    assert!(size_of::<Listener>() == 16);
    assert!(size_of::<ListenerSlot>() == 24);
    assert!(size_of::<ListenerTable>() == 24);
    assert!(LISTENER_SLOTS.is_power_of_two() && LISTENER_SLOTS / 4 >= 3 * MAX_LISTENERS);
    assert!(size_of::<FlowKey>() == 16);
    assert!(core::mem::offset_of!(FlowKey, sport) == 8);
    assert!(core::mem::offset_of!(FlowKey, proto) == 12);
    assert!(size_of::<FlowEntry>() == 32);
    assert!(size_of::<FlowBucket>() == 32 * FLOW_WAYS);
    assert!(size_of::<FlowHasher>() == 88);
    assert!(size_of::<FlowTable>() == 96);
    assert!(size_of::<FlowKey6>() == 40);
    assert!(size_of::<FlowEntry6>() == 56);
    assert!(size_of::<FlowBucket6>() == 56 * FLOW_WAYS);
    assert!(size_of::<ListenerKey6>() == 20);
    assert!(size_of::<ListenerSlot6>() == 36);
    assert!(size_of::<ClientKey6>() == 20);
    assert!(size_of::<Target>() == 40);
    assert!(size_of::<ClientKey>() == 8);
    assert!(size_of::<Sticky>() == 16);
    assert!(size_of::<NewFlowLimits>() == 32);
    assert!(size_of::<Group>() == 24);
    assert!(size_of::<Egress>() == 36);
    assert!(size_of::<Settings>() == 24 + 36 * MAX_INTERFACES + 88);
    assert!(size_of::<Counters>() == 24);
};

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding (asserted above).
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::Listener {}
    unsafe impl aya::Pod for super::ListenerSlot<super::ListenerKey> {}
    unsafe impl aya::Pod for super::ListenerTable {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEntry<super::FlowKey> {}
    unsafe impl aya::Pod for super::FlowBucket<super::FlowKey> {}
    unsafe impl aya::Pod for super::FlowTable {}
    unsafe impl aya::Pod for super::FlowHasher {}
    unsafe impl aya::Pod for super::Target {}
    unsafe impl aya::Pod for super::Group {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::NewFlowLimits {}
    unsafe impl aya::Pod for super::Sticky {}
    unsafe impl aya::Pod for super::ListenerKey6 {}
    unsafe impl aya::Pod for super::ListenerSlot6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::FlowEntry6 {}
    unsafe impl aya::Pod for super::FlowBucket6 {}
    unsafe impl aya::Pod for super::ClientKey6 {}
}
