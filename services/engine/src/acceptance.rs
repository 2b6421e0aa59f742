//! Per-position acceptance of draft tokens, as the EAGLE papers report it ("k-α": the
//! probability that the draft token at depth k + 1 is accepted when the k before it were).
//!
//! Invariant: a verify pass over a tree of `depth` draft levels that accepted `a` draft tokens
//! (the bonus token not counted) tried position k iff k <= a and k < depth, and accepted it iff
//! k < a. The conditional rate at k is accepted / tried; the product of the rates up to k is
//! the unconditional share of passes that reached depth k + 1 when every tree is that deep.
//! A pass that stopped at a shallow tree's last level gave its next position no chance, so it
//! is not counted there (EAGLE measures with chains as deep as the positions reported).

use serde::Serialize;

/// Positions reported: k = 0..5, as EAGLE reports 0-α to 5-α.
pub const POSITIONS: usize = 6;

/// Tried and accepted counts per position over many verify passes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PositionAcceptance {
    pub tried: [u64; POSITIONS],
    pub accepted: [u64; POSITIONS],
    /// Verify passes counted.
    pub passes: u64,
}

/// The rates, for reports.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AcceptanceRates {
    /// Position k: accepted / tried (`None` where no pass tried it).
    pub conditional: Vec<Option<f64>>,
    /// Position k: the share of all passes whose accepted path reached depth k + 1.
    pub reached: Vec<f64>,
    pub passes: u64,
}

impl PositionAcceptance {
    /// Counts one verify pass over a tree of `depth` draft levels that accepted `accepted`
    /// draft tokens.
    pub fn add(&mut self, depth: usize, accepted: usize) {
        debug_assert!(
            accepted <= depth,
            "accepted {accepted} of a {depth}-deep tree"
        );
        self.passes += 1;
        for k in 0..POSITIONS.min(depth).min(accepted + 1) {
            self.tried[k] += 1;
            if k < accepted {
                self.accepted[k] += 1;
            }
        }
    }

    /// Counts every speculative step of a generation (`tree_depths[i]` levels, `accepted[i]`
    /// draft tokens accepted).
    pub fn add_steps(&mut self, tree_depths: &[usize], accepted: &[usize]) {
        for (&d, &a) in tree_depths.iter().zip(accepted) {
            self.add(d, a);
        }
    }

    pub fn merge(&mut self, o: &PositionAcceptance) {
        for k in 0..POSITIONS {
            self.tried[k] += o.tried[k];
            self.accepted[k] += o.accepted[k];
        }
        self.passes += o.passes;
    }

    pub fn rates(&self) -> AcceptanceRates {
        AcceptanceRates {
            conditional: (0..POSITIONS)
                .map(|k| {
                    (self.tried[k] > 0).then(|| self.accepted[k] as f64 / self.tried[k] as f64)
                })
                .collect(),
            reached: (0..POSITIONS)
                .map(|k| self.accepted[k] as f64 / self.passes.max(1) as f64)
                .collect(),
            passes: self.passes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_tried_and_accepted_by_depth() {
        let mut p = PositionAcceptance::default();
        p.add(3, 0); // tried 0, rejected
        p.add(3, 2); // 0 and 1 accepted, 2 tried and rejected
        p.add(2, 2); // 0 and 1 accepted; position 2 not tried (the tree ended)
        p.add(0, 0); // a root-only tree tries nothing
        assert_eq!(p.tried, [3, 2, 1, 0, 0, 0]);
        assert_eq!(p.accepted, [2, 2, 0, 0, 0, 0]);
        let r = p.rates();
        assert_eq!(r.passes, 4);
        assert_eq!(r.conditional[0], Some(2.0 / 3.0));
        assert_eq!(r.conditional[1], Some(1.0));
        assert_eq!(r.conditional[2], Some(0.0));
        assert_eq!(r.conditional[3], None);
        assert_eq!(r.reached[..3], [0.5, 0.5, 0.0]);
        // Merging equals counting everything in one.
        let mut a = PositionAcceptance::default();
        a.add(3, 0);
        a.add(3, 2);
        let mut b = PositionAcceptance::default();
        b.add(2, 2);
        b.add(0, 0);
        a.merge(&b);
        assert_eq!(a, p);
    }
}
