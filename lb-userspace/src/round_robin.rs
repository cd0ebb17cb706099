//! Smooth weighted round robin (as nginx does it): the order in which a round-robin group's
//! targets take new flows, written into the group's table for the data plane to walk.
//!
//! Every turn, each target earns its weight in credit; the richest takes the turn and pays the
//! total weight. Weights 3:1 give a a b a, interleaved, never a a a b.

/// The sequence for targets of these `weights`: indices into `weights`, each as often as its
/// weight (after dividing all weights by their greatest common divisor). At most `max_len`
/// long: heavier sums are scaled down to fit, every target keeping at least one turn.
pub fn sequence(weights: &[u32], max_len: usize) -> Vec<u32> {
    if weights.is_empty() || max_len == 0 {
        return Vec::new();
    }
    let divisor = weights.iter().fold(0, |g, &w| gcd(g, w.max(1)));
    let mut weights: Vec<u64> = weights
        .iter()
        .map(|&w| (w.max(1) / divisor) as u64)
        .collect();
    let total: u64 = weights.iter().sum();
    if total > max_len as u64 {
        // One turn each, and the room left shared by weight: the sum stays within `max_len`.
        let room = max_len.saturating_sub(weights.len()) as u64;
        for w in &mut weights {
            *w = 1 + *w * room / total;
        }
    }
    let total: i64 = weights.iter().sum::<u64>() as i64;
    let mut credit = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, &w) in credit.iter_mut().zip(&weights) {
                *c += w as i64;
            }
            // The first of the richest: ties go in the targets' order.
            let (turn, _) = credit
                .iter()
                .enumerate()
                .fold(
                    (0, i64::MIN),
                    |best, (i, &c)| if c > best.1 { (i, c) } else { best },
                );
            credit[turn] -= total;
            turn as u32
        })
        .take(max_len)
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_interleaved_smoothly() {
        assert_eq!(sequence(&[3, 1], 100), [0, 0, 1, 0]);
        assert_eq!(sequence(&[5, 1, 1], 100), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(sequence(&[1, 1, 1], 100), [0, 1, 2]);
    }

    #[test]
    fn each_target_gets_its_weight_in_turns() {
        let seq = sequence(&[2, 1, 1], 100);
        let count = |i| seq.iter().filter(|&&t| t == i).count();
        assert_eq!((count(0), count(1), count(2)), (2, 1, 1));
        // Common factors go: 600:300 is 2:1.
        assert_eq!(sequence(&[600, 300], 100), [0, 1, 0]);
    }

    #[test]
    fn a_sum_over_the_table_is_scaled_down_keeping_every_target() {
        let weights: Vec<u32> = (1..=200).collect();
        let seq = sequence(&weights, 1009);
        assert!(seq.len() <= 1009, "{} turns", seq.len());
        for i in 0..200 {
            assert!(seq.contains(&i), "target {i} has no turn");
        }
        assert!(sequence(&[], 10).is_empty());
    }
}
