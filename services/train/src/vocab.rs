//! A reduced draft vocabulary, as in EAGLE-3 (Li et al., 2025, "EAGLE-3: Scaling up Inference
//! Acceleration of Large Language Models via Training-Time Test"): the head scores only the N
//! target tokens that are most frequent in the training data's assistant replies, which makes
//! its LM head N/V as costly.
//!
//! Invariant: the map is a set of N distinct target ids in increasing order (`d2t[i]` is the
//! target id of draft index i; stored as EAGLE-3 does, as offsets `d2t[i] - i`), chosen by count
//! with ties to the lower id, so the same data always gives the same vocabulary. Losslessness
//! does not depend on the choice: tokens outside it only get draft probability zero.
//!
//! The head's own LM head starts as the target LM head's rows for these ids, and stays frozen
//! during training here (the EAGLE-1 feature loss keeps the head's output in the target's
//! feature space, where the target's rows are already right); it is stored in the head so the
//! engine computes only N logits per draft node.

use crate::shards::Dataset;

/// How often each target id occurs on loss-masked (assistant) positions of the training split.
pub fn count_tokens(data: &Dataset, vocab: usize) -> Vec<u64> {
    let mut counts = vec![0u64; vocab];
    for i in data.split(false) {
        let (ids, mask) = data.ids_mask(&data.convs[i]);
        for (t, m) in ids.iter().zip(&mask) {
            if *m == 1 && (*t as usize) < vocab {
                counts[*t as usize] += 1;
            }
        }
    }
    counts
}

/// The `n` most frequent ids (ties: lower id first), padded with the lowest unseen ids when
/// fewer than `n` occur, in increasing id order.
pub fn top_tokens(counts: &[u64], n: usize) -> Vec<u32> {
    let n = n.min(counts.len());
    let mut order: Vec<u32> = (0..counts.len() as u32).collect();
    order.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    let mut keep: Vec<u32> = order[..n].to_vec();
    keep.sort_unstable();
    keep
}

/// Fraction of the counted occurrences that the kept ids cover.
pub fn coverage(counts: &[u64], keep: &[u32]) -> f64 {
    let total: u64 = counts.iter().sum();
    let kept: u64 = keep.iter().map(|&t| counts[t as usize]).sum();
    kept as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_frequent_in_id_order() {
        let counts = [5, 0, 9, 9, 1, 0];
        assert_eq!(top_tokens(&counts, 3), vec![0, 2, 3]);
        // Fewer seen than asked: the lowest unseen ids fill in.
        assert_eq!(top_tokens(&counts, 5), vec![0, 1, 2, 3, 4]);
        assert!((coverage(&counts, &[2, 3]) - 18.0 / 24.0).abs() < 1e-12);
    }
}
