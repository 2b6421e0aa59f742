//! The target side of sequences: prefill, single-token decode, and tree verification with
//! KV compaction, for one session or for the pending steps of many in one target pass
//! (iteration-level batching: Orca, Yu et al., 2022; vLLM). This is the worker's job in the
//! cluster; the in-process engine calls the same functions with one session.
//!
//! Invariants:
//! - After every call, each cache holds exactly the committed tokens that have been run
//!   through the target, in position order, and nothing else.
//! - A session's results in a batch are the bits it gets alone: the pass shares matmuls, never
//!   reductions, across rows (see `crate::kernels`), attention stays within each session's
//!   cache, and its sampling draws only from its own generator.

use candle_core::{IndexOp, Tensor};

use crate::error::Result;
use crate::kernels::attention::Visibility;
use crate::kv_cache::KvCache;
use crate::layers::use_cpu_kernels;
use crate::models::{Rows, States, TargetModel};
use crate::sampling::{Rng, SamplingParams};
use crate::tree::DraftTree;
use crate::verify::{verify_greedy, verify_sampling_with, AcceptRule, Recursive, Verdict};

/// Nodes of the draft's best chain whose logits verification computes in one pass.
const PREFETCH_LOGITS: usize = 3;

pub struct TargetSession {
    pub cache: KvCache,
}

/// Verification's result: the verdict and the draft features of the kept nodes (the root and
/// the accepted path), one row each, which the draft side pairs with the new tokens.
pub struct Verified {
    pub verdict: Verdict,
    pub features: Tensor,
}

/// What one session asks of a pass.
pub enum Work<'a> {
    /// Tokens after the cache: a prompt, a chunk of one, or one decoded token. With `logits`,
    /// the last token's logits come back.
    Extend { tokens: &'a [u32], logits: bool },
    /// A draft tree whose root is the last committed token, walked as `sampling` says.
    Verify {
        tree: &'a DraftTree,
        sampling: &'a SamplingParams,
        rng: &'a mut Rng,
        rule: &'a dyn AcceptRule,
    },
}

/// What one session got from a pass.
pub enum Done {
    /// The draft features [m, width] of the tokens run (see [`TargetModel::forward_batch_states`]),
    /// and the last one's logits if asked for.
    Extended {
        features: Tensor,
        logits: Option<Vec<f32>>,
    },
    Verified(Verified),
}

/// One session's inputs to a pass.
struct Plan {
    start: usize,
    tokens: Vec<u32>,
    positions: Vec<usize>,
    vis: Visibility,
    /// Rows (of this session's) whose logits one LM-head pass over the batch computes.
    logit_rows: Vec<usize>,
}

impl Plan {
    fn new(cache: &KvCache, work: &Work<'_>, cpu: bool) -> Plan {
        let start = cache.len();
        match work {
            Work::Extend { tokens, logits } => Plan {
                start,
                tokens: tokens.to_vec(),
                positions: (start..start + tokens.len()).collect(),
                vis: Visibility::causal(start, tokens.len()),
                logit_rows: if *logits && !tokens.is_empty() {
                    vec![tokens.len() - 1]
                } else {
                    Vec::new()
                },
            },
            // The walk reads the LM head at the nodes it visits. The draft's own best chain is
            // the likeliest walk: its first nodes' logits come with the batch's LM-head pass
            // (each row's bits are the same as alone on the CPU kernels), the rest on demand.
            Work::Verify { tree, .. } => Plan {
                start,
                tokens: tree.tokens.clone(),
                positions: tree.positions(start),
                vis: Visibility::tree(start, &tree.parents),
                logit_rows: if cpu {
                    tree.best_chain(PREFETCH_LOGITS)
                } else {
                    Vec::new()
                },
            },
        }
    }
}

/// Runs the work of every session in `jobs` in one target pass and returns each one's result,
/// in order. A session whose work cannot run (its cache is full, its tokens pass the context)
/// gets its error and the others go on; the outer error is a failure of the pass itself, which
/// every session shares. A session must appear at most once.
pub fn run_batch(
    target: &TargetModel,
    mut jobs: Vec<(&mut TargetSession, Work<'_>)>,
) -> Result<Vec<Result<Done>>> {
    let cpu = use_cpu_kernels(&target.device);
    let plans: Vec<Plan> = jobs
        .iter()
        .map(|(s, w)| Plan::new(&s.cache, w, cpu))
        .collect();
    let mut results: Vec<Option<Result<Done>>> = jobs.iter().map(|_| None).collect();
    let mut ran = Vec::with_capacity(jobs.len());
    let mut rows = Vec::with_capacity(jobs.len());
    for (i, ((sess, _), plan)) in jobs.iter_mut().zip(&plans).enumerate() {
        let r = Rows {
            cache: &mut sess.cache,
            tokens: &plan.tokens,
            positions: &plan.positions,
            vis: &plan.vis,
        };
        match target.check_rows(&r) {
            Ok(()) => {
                rows.push(r);
                ran.push(i);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    let states = if rows.is_empty() {
        Vec::new()
    } else {
        target.forward_batch_states(&mut rows)?
    };
    drop(rows);
    let last: Vec<&Tensor> = states.iter().map(|s| &s.last).collect();
    let mut ready = batch_logits(target, &ran, &plans, &last)?;
    for (&i, states) in ran.iter().zip(states) {
        let (sess, work) = &mut jobs[i];
        let done = match work {
            Work::Extend { .. } => Ok(Done::Extended {
                features: states.draft,
                logits: ready[i].pop().map(|(_, l)| l),
            }),
            Work::Verify {
                tree,
                sampling,
                rng,
                rule,
            } => sess
                .walk(
                    target,
                    plans[i].start,
                    tree,
                    states,
                    std::mem::take(&mut ready[i]),
                    sampling,
                    rng,
                    *rule,
                )
                .map(Done::Verified),
        };
        results[i] = Some(done);
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every job has a result"))
        .collect())
}

/// Logits already computed for some rows of one session: (row, logits).
type ReadyLogits = Vec<(usize, Vec<f32>)>;

/// The logits of every planned row of the sessions that ran, from one LM-head pass over all of
/// them, per session.
fn batch_logits(
    target: &TargetModel,
    ran: &[usize],
    plans: &[Plan],
    feats: &[&Tensor],
) -> Result<Vec<ReadyLogits>> {
    let mut out: Vec<ReadyLogits> = plans.iter().map(|_| Vec::new()).collect();
    let mut picked = Vec::new();
    for (&i, f) in ran.iter().zip(feats) {
        for &r in &plans[i].logit_rows {
            picked.push(f.i(r..r + 1)?);
        }
    }
    if picked.is_empty() {
        return Ok(out);
    }
    let mut all = target
        .logits(&Tensor::cat(&picked, 0)?)?
        .to_vec2::<f32>()?
        .into_iter();
    for &i in ran {
        for &r in &plans[i].logit_rows {
            out[i].push((r, all.next().expect("one logits row per picked row")));
        }
    }
    Ok(out)
}

impl TargetSession {
    pub fn new(target: &TargetModel, capacity: usize) -> Result<Self> {
        Ok(TargetSession {
            cache: target.new_cache(capacity)?,
        })
    }

    /// Runs one work item alone (a batch of one).
    fn run(&mut self, target: &TargetModel, work: Work<'_>) -> Result<Done> {
        run_batch(target, vec![(self, work)])?.remove(0)
    }

    /// Runs the prompt (or, on a later turn, new tokens after the cached prefix). Returns the
    /// features of every new token and the logits at the last one.
    pub fn prefill(&mut self, target: &TargetModel, tokens: &[u32]) -> Result<(Tensor, Vec<f32>)> {
        match self.run(
            target,
            Work::Extend {
                tokens,
                logits: true,
            },
        )? {
            Done::Extended {
                features,
                logits: Some(logits),
            } => Ok((features, logits)),
            _ => unreachable!("an extension with logits"),
        }
    }

    /// Runs one token. Returns its draft features [1, width] and logits.
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
        let work = Work::Verify {
            tree,
            sampling,
            rng,
            rule,
        };
        match self.run(target, work)? {
            Done::Verified(v) => Ok(v),
            Done::Extended { .. } => unreachable!("a verification"),
        }
    }

    /// After the tree's pass: walks it (with the logits `ready` for some nodes, the rest on
    /// demand), compacts the cache to the root and the accepted path, and keeps their draft
    /// features.
    #[allow(clippy::too_many_arguments)]
    fn walk(
        &mut self,
        target: &TargetModel,
        start: usize,
        tree: &DraftTree,
        states: States,
        mut ready: ReadyLogits,
        sampling: &SamplingParams,
        rng: &mut Rng,
        rule: &dyn AcceptRule,
    ) -> Result<Verified> {
        let mut logits_at = |i: usize| -> Result<Vec<f32>> {
            if let Some(k) = ready.iter().position(|(n, _)| *n == i) {
                return Ok(ready.swap_remove(k).1);
            }
            Ok(target
                .logits(&states.last.i(i..i + 1)?)?
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
        let idx = Tensor::new(idx.as_slice(), states.draft.device())?;
        let features = states.draft.index_select(&idx, 0)?;
        Ok(Verified { verdict, features })
    }
}
