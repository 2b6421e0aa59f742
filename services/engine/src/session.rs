//! The target side of one sequence: prefill, single-token decode, and tree verification with
//! KV compaction. This is the worker's job in the cluster; the in-process engine calls the same
//! functions.
//!
//! Invariant: after every call, the cache holds exactly the committed tokens that have been run
//! through the target, in position order, and nothing else.

use candle_core::{IndexOp, Tensor};

use crate::error::Result;
use crate::kernels::attention::Visibility;
use crate::kv_cache::KvCache;
use crate::layers::use_cpu_kernels;
use crate::models::TargetModel;
use crate::sampling::{Rng, SamplingParams};
use crate::tree::DraftTree;
use crate::verify::{verify_greedy, verify_sampling_with, AcceptRule, Recursive, Verdict};

/// Nodes of the draft's best chain whose logits verification computes in one pass.
const PREFETCH_LOGITS: usize = 3;

pub struct TargetSession {
    pub cache: KvCache,
}

/// Verification's result: the verdict and the features of the kept nodes (the root and the
/// accepted path), one row each, which the draft side pairs with the new tokens.
pub struct Verified {
    pub verdict: Verdict,
    pub features: Tensor,
}

impl TargetSession {
    pub fn new(target: &TargetModel, capacity: usize) -> Result<Self> {
        Ok(TargetSession {
            cache: target.new_cache(capacity)?,
        })
    }

    /// Runs the prompt (or, on a later turn, new tokens after the cached prefix). Returns the
    /// features of every new token and the logits at the last one.
    pub fn prefill(&mut self, target: &TargetModel, tokens: &[u32]) -> Result<(Tensor, Vec<f32>)> {
        let start = self.cache.len();
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let vis = Visibility::causal(start, tokens.len());
        let feats = target.forward(&mut self.cache, tokens, &positions, &vis)?;
        let last = feats.i(tokens.len() - 1..tokens.len())?;
        let logits = target.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?;
        Ok((feats, logits))
    }

    /// Runs one token. Returns its features [1, H] and logits.
    pub fn decode(&mut self, target: &TargetModel, token: u32) -> Result<(Tensor, Vec<f32>)> {
        self.prefill(target, &[token])
    }

    /// Runs the tree (its root is the last committed token), walks it, compacts the cache to
    /// the root and the accepted path, and returns the verdict with the kept features.
    pub fn verify(
        &mut self,
        target: &TargetModel,
        tree: &DraftTree,
        sampling: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<Verified> {
        self.verify_with_rule(target, tree, sampling, rng, &Recursive)
    }

    /// [`TargetSession::verify`] with a chosen acceptance rule for sampling (tests use this to
    /// show that a wrong rule is caught).
    pub fn verify_with_rule(
        &mut self,
        target: &TargetModel,
        tree: &DraftTree,
        sampling: &SamplingParams,
        rng: &mut Rng,
        rule: &dyn AcceptRule,
    ) -> Result<Verified> {
        let start = self.cache.len();
        let vis = Visibility::tree(start, &tree.parents);
        let feats = target.forward(&mut self.cache, &tree.tokens, &tree.positions(start), &vis)?;
        // The walk reads the LM head at the nodes it visits. The draft's own best chain is the
        // likeliest walk: its first nodes' logits come from one LM-head pass (each row's bits
        // are the same as alone on the CPU kernels), the rest on demand.
        let mut ready: Vec<(usize, Vec<f32>)> = Vec::new();
        if use_cpu_kernels(&target.device) {
            let chain = tree.best_chain(PREFETCH_LOGITS);
            let idx = Tensor::new(
                chain
                    .iter()
                    .map(|&c| c as u32)
                    .collect::<Vec<_>>()
                    .as_slice(),
                feats.device(),
            )?;
            let rows = target
                .logits(&feats.index_select(&idx, 0)?)?
                .to_vec2::<f32>()?;
            ready = chain.into_iter().zip(rows).collect();
        }
        let mut logits_at = |i: usize| -> Result<Vec<f32>> {
            if let Some(k) = ready.iter().position(|(n, _)| *n == i) {
                return Ok(ready.swap_remove(k).1);
            }
            Ok(target
                .logits(&feats.i(i..i + 1)?)?
                .squeeze(0)?
                .to_vec1::<f32>()?)
        };
        let verdict = if sampling.is_greedy() {
            verify_greedy(tree, &mut logits_at)?
        } else {
            verify_sampling_with(tree, &mut logits_at, sampling, rng, rule)?
        };
        let kept = verdict.kept_nodes();
        self.cache.compact(start, &kept)?;
        let idx: Vec<u32> = kept.iter().map(|&k| k as u32).collect();
        let idx = Tensor::new(idx.as_slice(), feats.device())?;
        let features = feats.index_select(&idx, 0)?;
        Ok(Verified { verdict, features })
    }
}
