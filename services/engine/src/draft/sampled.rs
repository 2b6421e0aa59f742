//! The dynamic tree at T > 0, one level at a time: breadth-first growth within a node budget
//! fixed before any child is drawn.
//!
//! Invariants (what keeps speculative sampling exact; Jeon et al., 2024, "Recursive
//! Speculative Decoding", and SpecTr, Sun et al., 2023):
//! - A node's children are an ordered sample without replacement from its draft distribution
//!   q, and `tree.draft_probs[node]` holds that q for verification.
//! - How many children a node gets depends only on nodes at or above its level (their scores,
//!   the budget left), never on the children themselves.
//! - The root gets `top_k` children; each level expands the `top_k` best-scoring nodes (by
//!   their own cumulative log q), in score order, with `sample_branch` children each while the
//!   budget lasts.
//! - The builder holds no model, only the session's random stream: a tree depends on the
//!   head's outputs and the draws, not on who shares the pass.

use candle_core::{IndexOp, Tensor};

use super::{DraftStats, Open};
use crate::error::Result;
use crate::sampling::{sample_without_replacement, warp, Rng, SamplingParams};
use crate::spec::SpecConfig;
use crate::tree::DraftTree;

pub(super) struct Sampled<'a> {
    budget: usize,
    top_k: usize,
    branch: usize,
    max_depth: usize,
    sampling: &'a SamplingParams,
    rng: &'a mut Rng,
    tree: DraftTree,
    /// Per tree node: cumulative log q, and the head input that expands it.
    scores: Vec<f32>,
    opens: Vec<Option<Open>>,
    /// The nodes added by the last level.
    level: Vec<usize>,
    /// The tree nodes being expanded, and their head inputs, in the level being run.
    expand: Vec<usize>,
    running: Vec<Open>,
    /// The depth of the next level to run.
    depth: usize,
    stats: DraftStats,
}

impl<'a> Sampled<'a> {
    /// Starts from the root's draft logits over the target vocabulary; `cfg.total_token` is
    /// the node budget, fixed already.
    pub(super) fn new(
        root: u32,
        root_hidden: &Tensor,
        root_logits: &[f32],
        cfg: &SpecConfig,
        sampling: &'a SamplingParams,
        rng: &'a mut Rng,
    ) -> Self {
        let budget = cfg.node_budget();
        let mut tree = DraftTree::root(root);
        let q = warp(root_logits, sampling);
        let mut scores = vec![0f32];
        let mut opens: Vec<Option<Open>> = vec![None];
        let mut level = Vec::new();
        for t in sample_without_replacement(&q, cfg.top_k.max(1).min(budget), rng) {
            let i = tree.push(0, t);
            scores.push(q[t as usize].ln());
            opens.push(Some(Open {
                token: t,
                parent_hidden: root_hidden.clone(),
                ancestors: Vec::new(),
            }));
            level.push(i);
        }
        tree.draft_probs[0] = Some(q);
        Sampled {
            budget,
            top_k: cfg.top_k.max(1),
            branch: cfg.sample_branch.max(1),
            max_depth: cfg.depth,
            sampling,
            rng,
            tree,
            scores,
            opens,
            level,
            expand: Vec::new(),
            running: Vec::new(),
            depth: 1,
            stats: DraftStats {
                head_passes: 1,
                scored: 0,
            },
        }
    }

    pub(super) fn depth(&self) -> usize {
        self.depth
    }

    /// The nodes to run through the head next, or `None` once the tree is complete.
    pub(super) fn next_level(&mut self) -> Option<&mut [Open]> {
        let room = self.budget.saturating_sub(self.tree.len() - 1);
        if self.depth >= self.max_depth || room == 0 || self.level.is_empty() {
            return None;
        }
        let scores = &self.scores;
        let mut expand = self.level.clone();
        expand.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        expand.truncate(self.top_k.min(room.div_ceil(self.branch)));
        self.running = expand
            .iter()
            .map(|&i| self.opens[i].clone().expect("a drafted node"))
            .collect();
        self.expand = expand;
        Some(&mut self.running)
    }

    /// The head's outputs for the level just run and each node's draft logits over the target
    /// vocabulary: draws each expanded node's children.
    pub(super) fn take(&mut self, hidden: &Tensor, logits: Vec<Vec<f32>>) -> Result<()> {
        self.stats.head_passes += 1;
        let mut next = Vec::new();
        for (row, (&node, logits)) in self.expand.iter().zip(logits).enumerate() {
            let room = self.budget.saturating_sub(self.tree.len() - 1);
            if room == 0 {
                break;
            }
            let q = warp(&logits, self.sampling);
            for t in sample_without_replacement(&q, self.branch.min(room), self.rng) {
                let c = self.tree.push(node, t);
                self.scores.push(self.scores[node] + q[t as usize].ln());
                self.opens.push(Some(Open {
                    token: t,
                    parent_hidden: hidden.i(row)?,
                    ancestors: self.running[row].ancestors.clone(),
                }));
                next.push(c);
            }
            self.tree.draft_probs[node] = Some(q);
        }
        self.level = next;
        self.depth += 1;
        Ok(())
    }

    pub(super) fn finish(self) -> (DraftTree, DraftStats) {
        let mut stats = self.stats;
        stats.scored = self.tree.len() - 1;
        (self.tree, stats)
    }
}
