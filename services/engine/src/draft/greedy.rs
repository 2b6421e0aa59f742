//! EAGLE-2's dynamic tree at T = 0 (Li et al., 2024, "EAGLE-2: Faster Inference of Language
//! Models with Dynamic Draft Trees", section 4), one level at a time.
//!
//! Invariants:
//! - Each level expands the `top_k` candidates of the previous level with the highest
//!   cumulative draft log-probability (ties by candidate order), less those whose likeliest
//!   child could not pay for its verification and a share of the level (automatic budgets:
//!   `TreeBudget::worth_expanding` per node, the child's chance taken as its parent's times
//!   the head's top probability at the level before); each gets its `top_k` best children.
//!   The final tree is the `keep` best of every candidate scored (`rerank`), so it is
//!   connected: a child never outscores its parent.
//! - The tree's size maximises the expected tokens per second of the target pass it joins
//!   (`TreeBudget::keep`), the other sessions' rows and tokens in that pass included.
//! - The builder holds no model: the caller runs each level's nodes through the head (alone or
//!   beside other sessions' levels) and hands back their outputs, so a tree is the same
//!   whoever shares the pass.

use candle_core::{IndexOp, Tensor};

use super::{DraftStats, Open};
use crate::error::Result;
use crate::spec::{BatchLoad, SpecConfig, TreeBudget};
use crate::tree::{rerank, Candidate, DraftTree};

pub(super) struct Greedy<'a> {
    root: u32,
    k: usize,
    max_depth: usize,
    budget: &'a TreeBudget,
    load: BatchLoad,
    /// The depth of the next level to run (the root's children are depth 1).
    depth: usize,
    cands: Vec<Candidate>,
    /// (candidate index, node) of the level to expand next.
    frontier: Vec<(usize, Open)>,
    /// The nodes of the level being run.
    running: Vec<Open>,
    /// The log-probability the head gave its likeliest next token at the last level run (the
    /// root's, at first): how sure it is one level down, which a child's chance inherits.
    sure: f32,
    stats: DraftStats,
}

impl<'a> Greedy<'a> {
    /// Starts from the root's `top_k` (token, log-probability) pairs; `root_hidden` is the head
    /// output the root's children extend.
    pub(super) fn new(
        root: u32,
        root_hidden: &Tensor,
        root_top: Vec<(u32, f32)>,
        cfg: &SpecConfig,
        budget: &'a TreeBudget,
        load: BatchLoad,
    ) -> Self {
        let sure = root_top.first().map_or(f32::NEG_INFINITY, |c| c.1);
        let cands: Vec<Candidate> = root_top
            .into_iter()
            .map(|(t, lp)| Candidate {
                token: t,
                parent: None,
                score: lp,
            })
            .collect();
        let frontier = cands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    i,
                    Open {
                        token: c.token,
                        parent_hidden: root_hidden.clone(),
                        ancestors: Vec::new(),
                    },
                )
            })
            .collect();
        Greedy {
            root,
            k: cfg.top_k.max(1),
            max_depth: cfg.depth,
            budget,
            load,
            depth: 1,
            cands,
            frontier,
            running: Vec::new(),
            sure,
            stats: DraftStats {
                head_passes: 1,
                scored: 0,
            },
        }
    }

    pub(super) fn top_k(&self) -> usize {
        self.k
    }

    /// The depth of the level [`Self::next_level`] returns.
    pub(super) fn depth(&self) -> usize {
        self.depth
    }

    /// The nodes to run through the head next, or `None` once the tree is complete (the depth
    /// limit, or the cost model says a deeper level does not pay).
    pub(super) fn next_level(&mut self) -> Option<&mut [Open]> {
        if self.depth >= self.max_depth || self.frontier.is_empty() {
            return None;
        }
        // Only the nodes whose likeliest child could still pay for itself: its chance is about
        // the parent's times how sure the head was one level up (EAGLE-2's confidence, one
        // level ahead). With a fixed budget every node passes, as in EAGLE-2.
        let (budget, cands, sure) = (self.budget, &self.cands, self.sure);
        self.frontier
            .retain(|(ci, _)| budget.worth_expanding(cands[*ci].score + sure));
        if self.frontier.is_empty() {
            return None;
        }
        self.running = self.frontier.iter().map(|(_, o)| o.clone()).collect();
        Some(&mut self.running)
    }

    /// The head's outputs for the level just run and each node's `top_k` next tokens.
    pub(super) fn take(&mut self, hidden: &Tensor, tops: Vec<Vec<(u32, f32)>>) -> Result<()> {
        self.stats.head_passes += 1;
        let mut children: Vec<(usize, usize)> = Vec::new(); // (candidate index, level row)
        self.sure = f32::NEG_INFINITY;
        for (row, ((ci, _), top)) in self.frontier.iter().zip(tops).enumerate() {
            let base = self.cands[*ci].score;
            for (t, lp) in top {
                self.sure = self.sure.max(lp);
                self.cands.push(Candidate {
                    token: t,
                    parent: Some(*ci),
                    score: base + lp,
                });
                children.push((self.cands.len() - 1, row));
            }
        }
        let cands = &self.cands;
        let mut order: Vec<usize> = (0..children.len()).collect();
        order.sort_by(|&a, &b| {
            let (ca, cb) = (children[a].0, children[b].0);
            cands[cb]
                .score
                .total_cmp(&cands[ca].score)
                .then(ca.cmp(&cb))
        });
        self.frontier = order
            .into_iter()
            .take(self.k)
            .map(|j| {
                let (ci, row) = children[j];
                Ok((
                    ci,
                    Open {
                        token: cands[ci].token,
                        parent_hidden: hidden.i(row)?,
                        ancestors: self.running[row].ancestors.clone(),
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        self.depth += 1;
        Ok(())
    }

    /// The tree: the best candidates by cumulative score, as many as the budget keeps.
    pub(super) fn finish(self) -> (DraftTree, DraftStats) {
        let mut stats = self.stats;
        stats.scored = self.cands.len();
        let mut scores: Vec<f32> = self.cands.iter().map(|c| c.score).collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        let n = self.budget.keep(&scores, stats.head_passes, &self.load);
        (rerank(self.root, &self.cands, n), stats)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::spec::CostProfile;

    /// Automatic budgets expand only the frontier nodes whose likeliest child could pay: here
    /// the bar is 0.2 (a 16-token pass costs 4 one-token passes, a level 0.05 of one), and a
    /// child's chance is its parent's times 0.6, how sure the head was of the root's best
    /// child: 0.6 x 0.6 passes, 0.3 x 0.6 does not. Fixed budgets expand every node, as
    /// EAGLE-2 does.
    #[test]
    fn unlikely_nodes_are_not_drafted_further_under_measured_costs() {
        let hidden = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let top = vec![(11, 0.6f32.ln()), (12, 0.3f32.ln()), (13, 0.05f32.ln())];
        let cfg = SpecConfig::default();
        let auto = TreeBudget::Auto(CostProfile {
            points: vec![(1, 1.0), (16, 3.25)],
            draft_level_s: 0.05,
        });
        let fixed = TreeBudget::Fixed(8);
        let run = |budget: &TreeBudget| {
            let mut g = Greedy::new(1, &hidden, top.clone(), &cfg, budget, BatchLoad::default());
            let level = g.next_level().expect("the best node pays");
            level.iter().map(|o| o.token).collect::<Vec<u32>>()
        };
        assert_eq!(run(&auto), vec![11]);
        assert_eq!(run(&fixed), vec![11, 12, 13]);
        // An unsure head (0.3 at best): no child can pay, so no level runs.
        let unsure = vec![(11, 0.3f32.ln()), (12, 0.2f32.ln())];
        let mut g = Greedy::new(1, &hidden, unsure, &cfg, &auto, BatchLoad::default());
        assert!(g.next_level().is_none());
    }
}
