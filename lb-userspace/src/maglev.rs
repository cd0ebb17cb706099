//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), built in userspace and read by the
//! data plane as a flat table of target indices.
//!
//! Each target's preference list (offset, skip) comes from a hash of its address and port, never
//! from its position in the config, so the table depends only on the set of targets, their
//! weights and the seed: every lb node with the same config builds the same table.

use std::net::IpAddr;
#[cfg(test)]
use std::net::Ipv4Addr;

/// What Maglev needs to know of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    pub address: IpAddr,
    pub port: u16,
    pub weight: u32,
}

/// Builds a table of `size` slots (a prime). Each slot holds an index into `entries`.
///
/// Weighted fill: in every round each target earns `weight` credits and takes one slot per
/// `max_weight` credits it holds, so the heaviest target takes a slot every round and the others
/// in proportion. Equal weights give the classic algorithm.
///
/// Returns an empty table if `entries` is empty.
pub fn build(entries: &[Entry], size: u32, seed: u32) -> Vec<u32> {
    if entries.is_empty() {
        return Vec::new();
    }
    let size = size as u64;
    // Fill in address order so that the result does not depend on the order of `entries`.
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by_key(|&i| entries[i]);
    let prefs: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let e = &entries[i];
            let offset = target_hash(e, seed, 0x5bd1_e995) as u64 % size;
            let skip = target_hash(e, seed, 0x1b87_3593) as u64 % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight.max(1)).max().unwrap_or(1) as u64;
    let mut credit = vec![0u64; order.len()];
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    loop {
        for (k, &i) in order.iter().enumerate() {
            credit[k] += entries[i].weight.max(1) as u64;
            if credit[k] < max_weight {
                continue;
            }
            credit[k] -= max_weight;
            let (offset, skip) = prefs[k];
            let mut slot = ((offset + next[k] * skip) % size) as usize;
            while table[slot] != u32::MAX {
                next[k] += 1;
                slot = ((offset + next[k] * skip) % size) as usize;
            }
            table[slot] = i as u32;
            next[k] += 1;
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
}

/// Murmur3's 32-bit body and finaliser over a target's address and port. An IPv4 address is
/// one word, as before IPv6 came, so an upgrade keeps every IPv4 group's table.
fn target_hash(e: &Entry, seed: u32, salt: u32) -> u32 {
    let mut h = seed ^ salt;
    let len = match e.address {
        IpAddr::V4(a) => {
            h = murmur_round(h, u32::from(a));
            8
        }
        IpAddr::V6(a) => {
            for word in a.octets().chunks(4) {
                h = murmur_round(h, u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
            }
            20
        }
    };
    h = murmur_round(h, e.port as u32);
    murmur_finish(h ^ len)
}

fn murmur_round(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

fn murmur_finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: u32) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                address: Ipv4Addr::from(0xc633_6400 + i).into(),
                port: 80,
                weight: 1,
            })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &t in table {
            counts[t as usize] += 1;
        }
        counts
    }

    #[test]
    fn every_slot_is_filled_with_a_valid_index() {
        let t = targets(7);
        let table = build(&t, 65537, 0);
        assert_eq!(table.len(), 65537);
        assert!(table.iter().all(|&i| (i as usize) < t.len()));
    }

    #[test]
    fn equal_weights_balance_within_one_percent() {
        let t = targets(100);
        let counts = shares(&build(&t, 65537, 0), t.len());
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(
            (max - min) as f64 / min as f64 <= 0.01,
            "min {min} max {max} slots per target"
        );
    }

    #[test]
    fn removing_one_target_moves_about_one_nth_of_slots() {
        for n in [10u32, 100] {
            let before_targets = targets(n);
            let before = build(&before_targets, 65537, 7);
            let removed = (n / 2) as usize;
            let mut after_targets = before_targets.clone();
            after_targets.remove(removed);
            let after = build(&after_targets, 65537, 7);
            // Compare by target identity, not index: indices shift after the removed one.
            let moved = before
                .iter()
                .zip(&after)
                .filter(|&(&b, &a)| before_targets[b as usize] != after_targets[a as usize])
                .count();
            let fraction = moved as f64 / before.len() as f64;
            let ideal = 1.0 / n as f64;
            // Classic Maglev moves a little more than the ideal; BENCHMARKS.md tracks how much.
            assert!(
                fraction <= 2.0 * ideal,
                "n={n}: {fraction:.4} of slots moved, ideal {ideal:.4}"
            );
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut t = targets(3);
        t[0].weight = 2;
        t[1].weight = 1;
        t[2].weight = 4;
        let counts = shares(&build(&t, 65537, 0), 3);
        let per_weight: Vec<f64> = counts
            .iter()
            .zip(&t)
            .map(|(&c, e)| c as f64 / e.weight as f64)
            .collect();
        let mean = per_weight.iter().sum::<f64>() / 3.0;
        for p in per_weight {
            assert!((p - mean).abs() / mean < 0.02, "{counts:?}");
        }
    }

    #[test]
    fn table_does_not_depend_on_order() {
        let t = targets(20);
        let mut reversed = t.clone();
        reversed.reverse();
        let a: Vec<Entry> = build(&t, 4099, 3).iter().map(|&i| t[i as usize]).collect();
        let b: Vec<Entry> = build(&reversed, 4099, 3)
            .iter()
            .map(|&i| reversed[i as usize])
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn seed_changes_the_table() {
        let t = targets(20);
        assert_ne!(build(&t, 4099, 1), build(&t, 4099, 2));
    }

    /// Clients pick source ports in steps (Linux uses even ports for connect): the Maglev pick
    /// must still spread such flows evenly over a table.
    #[test]
    fn the_pick_spreads_sequential_source_ports() {
        let t = targets(3);
        let table = build(&t, 65537, 0);
        let settings = lb_common::Settings {
            maglev_size: 65537,
            nat: 0,
            denied_sources: 0,
            answer_ping: 0,
            ipv6: 0,
            pad: 0,
            interfaces: Default::default(),
            pick: lb_common::FlowHasher::from_seed(0),
        };
        let mut counts = [0usize; 3];
        for i in 0..3000u16 {
            let key = lb_common::FlowKey {
                src: u32::from_ne_bytes([198, 51, 100, 2]),
                dst: u32::from_ne_bytes([203, 0, 113, 10]),
                sport: (32768 + 2 * i).to_be(),
                dport: 80u16.to_be(),
                proto: lb_common::PROTO_TCP,
                pad: [0; 3],
            };
            // The data plane builds its keys with `new`, word by word: the same bytes.
            assert_eq!(
                key,
                lb_common::FlowKey::new(key.src, key.dst, key.sport, key.dport, key.proto)
            );
            counts[table[settings.maglev_slot(&key) as usize] as usize] += 1;
        }
        for c in counts {
            assert!((900..=1100).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn empty_group_gives_empty_table() {
        assert!(build(&[], 65537, 0).is_empty());
    }
}
