//! The train / held-out split.
//!
//! Invariant: whether a record is held out depends only on its id and the held-out fraction,
//! never on file order, run, platform or how much data was generated before; so a resumed or
//! extended run never moves a conversation across the split, and held-out numbers measure
//! conversations training never saw.

/// 64-bit FNV-1a of the id, finalised with SplitMix64's mixer so that nearby ids spread over
/// the whole range.
pub fn id_hash(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Whether the record `id` belongs to the held-out set when a fraction `frac` is held out.
pub fn is_held_out(id: &str, frac: f64) -> bool {
    if frac <= 0.0 {
        return false;
    }
    // The top 53 bits as a uniform number in [0, 1).
    let u = (id_hash(id) >> 11) as f64 / (1u64 << 53) as f64;
    u < frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_is_respected_and_stable() {
        let held = (0..20_000)
            .filter(|i| is_held_out(&format!("rec_{i}"), 0.02))
            .count();
        assert!((300..500).contains(&held), "{held} of 20000 held out");
        assert_eq!(
            is_held_out("QWJhYvA_0", 0.02),
            is_held_out("QWJhYvA_0", 0.02)
        );
        assert!(!is_held_out("x", 0.0));
        assert!(is_held_out("x", 1.0));
    }
}
