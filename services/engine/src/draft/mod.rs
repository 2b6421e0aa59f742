//! The draft side: an EAGLE head session and the tree builders that run it.
//!
//! Invariants:
//! - The head cache's slots `0..committed` hold the committed (token, feature) pairs in
//!   position order; drafting appends tree nodes after them and truncates back when done, so a
//!   draft never leaks into the next step.
//! - Greedy drafting (EAGLE-2) may shape the tree any way it likes: verification at T = 0 only
//!   follows the target's argmax.
//! - Sampling drafting must keep speculative sampling exact: each node's children are an
//!   ordered sample without replacement from that node's draft distribution q, and how many
//!   children a node gets is decided before they are drawn, from nodes no deeper than it
//!   (the recursive rejection sampling of Jeon et al., 2024, "Recursive Speculative Decoding",
//!   and SpecTr, Sun et al., 2023). EAGLE-2's value-dependent reranking is therefore used only
//!   at T = 0; at T > 0 the tree grows breadth-first within the node budget.
//! - A head with a reduced draft vocabulary (EAGLE-3) scores only its N tokens; every other
//!   token gets draft logit -inf, so q is the softmax over the N tokens and zero elsewhere.
//!   Verification still uses the target's full distribution, so both modes stay exact.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::head::EagleHead;
use crate::kernels::attention::Visibility;
use crate::kv_cache::KvCache;
use crate::layers::{use_cpu_kernels, Linear, Matrix};
use crate::loader::{Quant, WeightSource, Weights};
use crate::models::target::{embed_rows, lm_head, load_embed_and_lm_head};
use crate::models::TargetModel;
use crate::sampling::{log_softmax, sample_without_replacement, top_k, warp, Rng, SamplingParams};
use crate::spec::{SpecConfig, TreeBudget, TreeShape};
use crate::tree::{rerank, Candidate, DraftTree};

/// The head plus what it borrows from the target: the token embedding and the LM head.
pub struct Drafter {
    pub head: Arc<EagleHead>,
    embed: Matrix,
    /// The target's LM head, or the head's own over a reduced draft vocabulary.
    lm_head: Linear,
    /// With a reduced draft vocabulary: draft row -> target id.
    d2t: Option<Vec<u32>>,
    vocab: usize,
}

/// One sequence's draft state.
pub struct DraftSession {
    cache: KvCache,
    pending_tokens: Vec<u32>,
    pending_features: Vec<Tensor>,
}

impl DraftSession {
    /// Queues committed (token, feature) pairs: `tokens[i]` pairs with `features` row i.
    pub fn push(&mut self, tokens: &[u32], features: &Tensor) -> Result<()> {
        if features.dim(0)? != tokens.len() {
            return Err(EngineError::InvalidRequest(format!(
                "{} tokens but {} feature rows",
                tokens.len(),
                features.dim(0)?
            )));
        }
        self.pending_tokens.extend_from_slice(tokens);
        self.pending_features.push(features.clone());
        Ok(())
    }

    /// Committed pairs run through the head so far.
    pub fn committed(&self) -> usize {
        self.cache.len()
    }

    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// A node being run through the head: its token, the head output of its parent (the feature
/// it extends), and its ancestors' head-cache slots (root-first, excluding the committed root).
#[derive(Clone)]
struct Open {
    token: u32,
    parent_hidden: Tensor,
    ancestors: Vec<u32>,
}

/// What drafting produced, besides the tree.
#[derive(Clone, Debug, Default)]
pub struct DraftStats {
    /// Head forward passes in this draft.
    pub head_passes: usize,
    /// Candidates scored before reranking.
    pub scored: usize,
}

impl Drafter {
    pub fn new(head: Arc<EagleHead>, target: &TargetModel) -> Self {
        Self::assemble(
            head,
            target.embed.clone(),
            target.lm_head.clone(),
            target.cfg.vocab_size,
        )
    }

    /// The head with the target's embedding, and the head's own reduced-vocabulary LM head if
    /// it has one, else the target's.
    fn assemble(head: Arc<EagleHead>, embed: Matrix, target_lm_head: Linear, vocab: usize) -> Self {
        let (lm_head, d2t) = match &head.draft_vocab {
            Some(dv) => (dv.lm_head.clone(), Some(dv.d2t.clone())),
            None => (target_lm_head, None),
        };
        Drafter {
            head,
            embed,
            lm_head,
            d2t,
            vocab,
        }
    }

    /// A drafter for a process that holds no target (the cluster's draft service): loads only
    /// the target's token embedding and LM head from its weights, then the head from `head_dir`.
    pub fn load(
        src: &dyn WeightSource,
        cfg: &ModelConfig,
        head_dir: &std::path::Path,
        dtype: DType,
        quant: Quant,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let w = Weights::new(src, dtype, device.clone()).with_quant(quant);
        let (embed, lm_head) = load_embed_and_lm_head(&w, cfg)?;
        let head = EagleHead::load_with(
            head_dir,
            cfg,
            dtype,
            crate::generate::head_quant(quant),
            device,
        )?;
        Ok(Self::assemble(
            Arc::new(head),
            embed,
            lm_head,
            cfg.vocab_size,
        ))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Seconds one draft level takes with a frontier of `k` nodes: a head pass over them after
    /// a 64-pair prefix, and their LM head rows (best of 3). Sizes automatic trees.
    pub fn measure_level_cost(&self, k: usize) -> Result<f64> {
        let h = self.head.cfg.hidden_size;
        let prefix = 64;
        let mut sess = self.open(prefix + k + 1)?;
        let tokens: Vec<u32> = (0..prefix as u32)
            .map(|i| (i * 7919 + 13) % self.vocab as u32)
            .collect();
        let feats = Tensor::zeros((prefix, h), DType::F32, &self.head.device)?;
        sess.push(&tokens, &feats)?;
        let root_hidden = self.absorb(&mut sess)?;
        let committed = sess.cache.len();
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let mut nodes: Vec<Open> = (0..k)
                .map(|i| Open {
                    token: tokens[i % prefix],
                    parent_hidden: root_hidden.clone(),
                    ancestors: Vec::new(),
                })
                .collect();
            let t = std::time::Instant::now();
            let hidden = self.run_nodes(&mut sess, &mut nodes, committed, committed)?;
            std::hint::black_box(self.top_log_probs(&hidden, k)?);
            best = best.min(t.elapsed().as_secs_f64());
            sess.cache.truncate(committed);
        }
        Ok(best)
    }

    /// A session whose head cache holds `capacity` slots: committed pairs plus a draft.
    pub fn open(&self, capacity: usize) -> Result<DraftSession> {
        Ok(DraftSession {
            cache: self.head.new_cache(capacity)?,
            pending_tokens: Vec::new(),
            pending_features: Vec::new(),
        })
    }

    /// Draft logits over the target vocabulary, one row per hidden row.
    fn logits(&self, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
        let cpu = use_cpu_kernels(&self.head.device);
        let rows = lm_head(&self.lm_head, hidden, cpu)?.to_vec2::<f32>()?;
        let Some(d2t) = &self.d2t else {
            return Ok(rows);
        };
        Ok(rows
            .into_iter()
            .map(|row| {
                let mut full = vec![f32::NEG_INFINITY; self.vocab];
                for (&t, v) in d2t.iter().zip(row) {
                    full[t as usize] = v;
                }
                full
            })
            .collect())
    }

    /// The `k` most likely next tokens (target ids) and their log-probabilities, per hidden row.
    /// With a reduced draft vocabulary this works on the reduced rows: the other tokens have
    /// probability 0, so the values equal those of the full row, for a fraction of the work.
    fn top_log_probs(&self, hidden: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let cpu = use_cpu_kernels(&self.head.device);
        let rows = lm_head(&self.lm_head, hidden, cpu)?.to_vec2::<f32>()?;
        Ok(rows
            .iter()
            .map(|row| {
                top_k(&log_softmax(row), k)
                    .into_iter()
                    .map(|(i, lp)| (self.d2t.as_ref().map_or(i, |d| d[i as usize]), lp))
                    .collect()
            })
            .collect())
    }

    /// Runs the queued committed pairs through the head. Returns the head output at the last
    /// pair: the predicted feature of the root's position.
    fn absorb(&self, sess: &mut DraftSession) -> Result<Tensor> {
        if sess.pending_tokens.is_empty() {
            return Err(EngineError::InvalidRequest(
                "draft: no committed tokens to extend (push the prompt first)".into(),
            ));
        }
        let tokens = std::mem::take(&mut sess.pending_tokens);
        let feats = Tensor::cat(&std::mem::take(&mut sess.pending_features), 0)?;
        let start = sess.cache.len();
        let m = tokens.len();
        let embeds = embed_rows(&self.embed, &tokens, self.vocab, &self.head.device)?;
        let positions: Vec<usize> = (start..start + m).collect();
        let out = self.head.forward(
            &mut sess.cache,
            &embeds,
            &feats,
            &positions,
            &Visibility::causal(start, m),
        )?;
        Ok(out.i(m - 1)?)
    }

    /// Runs drafted `nodes` (all at head position `position`) after the committed prefix
    /// `committed`; each sees the prefix, its ancestors and itself. Returns their outputs.
    fn run_nodes(
        &self,
        sess: &mut DraftSession,
        nodes: &mut [Open],
        committed: usize,
        position: usize,
    ) -> Result<Tensor> {
        let start = sess.cache.len();
        let tokens: Vec<u32> = nodes.iter().map(|n| n.token).collect();
        let embeds = embed_rows(&self.embed, &tokens, self.vocab, &self.head.device)?;
        let feats: Vec<&Tensor> = nodes.iter().map(|n| &n.parent_hidden).collect();
        let feats = Tensor::stack(&feats, 0)?;
        let extra = nodes
            .iter_mut()
            .enumerate()
            .map(|(j, n)| {
                n.ancestors.push((start + j) as u32);
                n.ancestors.clone()
            })
            .collect();
        let vis = Visibility {
            prefix: committed,
            extra,
            ..Default::default()
        };
        let positions = vec![position; nodes.len()];
        self.head
            .forward(&mut sess.cache, &embeds, &feats, &positions, &vis)
    }

    /// Builds a draft tree rooted at `root` (the last committed token, whose pair must be the
    /// last one pushed). `budget` sizes greedy dynamic trees; sampled and static trees use
    /// `cfg.total_token` as given.
    pub fn draft(
        &self,
        sess: &mut DraftSession,
        root: u32,
        cfg: &SpecConfig,
        sampling: &SamplingParams,
        rng: &mut Rng,
        budget: &TreeBudget,
    ) -> Result<(DraftTree, DraftStats)> {
        if sess.pending_tokens.last() != Some(&root) {
            return Err(EngineError::InvalidRequest(
                "draft: the root must be the last committed token".into(),
            ));
        }
        let root_hidden = self.absorb(sess)?;
        let committed = sess.cache.len();
        let result = match (&cfg.shape, sampling.is_greedy()) {
            (TreeShape::Dynamic, true) => {
                self.dynamic_greedy(sess, root, root_hidden, committed, cfg, budget)
            }
            (TreeShape::Dynamic, false) => {
                // The size is fixed before any child is drawn (see `TreeBudget::sampled_nodes`).
                let sized = SpecConfig {
                    total_token: (budget.sampled_nodes() + 1) as i32,
                    ..cfg.clone()
                };
                self.dynamic_sampled(sess, root, root_hidden, committed, &sized, sampling, rng)
            }
            (TreeShape::Static(shape), _) => {
                self.static_tree(sess, root, root_hidden, committed, shape, sampling, rng)
            }
        };
        sess.cache.truncate(committed);
        result
    }

    /// EAGLE-2 at T = 0: expand the best `top_k` nodes per level by cumulative
    /// log-probability, then rerank everything scored.
    fn dynamic_greedy(
        &self,
        sess: &mut DraftSession,
        root: u32,
        root_hidden: Tensor,
        committed: usize,
        cfg: &SpecConfig,
        budget: &TreeBudget,
    ) -> Result<(DraftTree, DraftStats)> {
        let k = cfg.top_k.max(1);
        let mut stats = DraftStats {
            head_passes: 1,
            scored: 0,
        };
        let mut cands: Vec<Candidate> = self
            .top_log_probs(&root_hidden.unsqueeze(0)?, k)?
            .remove(0)
            .into_iter()
            .map(|(t, lp)| Candidate {
                token: t,
                parent: None,
                score: lp,
            })
            .collect();
        // Frontier: (candidate index, open node).
        let mut frontier: Vec<(usize, Open)> = cands
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
        for depth in 1..cfg.depth {
            let best = frontier
                .iter()
                .map(|(ci, _)| cands[*ci].score)
                .fold(f32::NEG_INFINITY, f32::max);
            if !budget.worth_expanding(best) {
                break;
            }
            let mut opens: Vec<Open> = frontier.iter().map(|(_, o)| o.clone()).collect();
            let hidden = self.run_nodes(sess, &mut opens, committed, committed - 1 + depth)?;
            stats.head_passes += 1;
            let tops = self.top_log_probs(&hidden, k)?;
            let mut children: Vec<(usize, usize)> = Vec::new(); // (candidate index, frontier row)
            for (row, ((ci, _), top)) in frontier.iter().zip(tops).enumerate() {
                let base = cands[*ci].score;
                for (t, lp) in top {
                    cands.push(Candidate {
                        token: t,
                        parent: Some(*ci),
                        score: base + lp,
                    });
                    children.push((cands.len() - 1, row));
                }
            }
            let mut order: Vec<usize> = (0..children.len()).collect();
            order.sort_by(|&a, &b| {
                let (ca, cb) = (children[a].0, children[b].0);
                cands[cb]
                    .score
                    .total_cmp(&cands[ca].score)
                    .then(ca.cmp(&cb))
            });
            frontier = order
                .into_iter()
                .take(k)
                .map(|j| {
                    let (ci, row) = children[j];
                    let parent = &opens[row];
                    Ok((
                        ci,
                        Open {
                            token: cands[ci].token,
                            parent_hidden: hidden.i(row)?,
                            ancestors: parent.ancestors.clone(),
                        },
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
        }
        stats.scored = cands.len();
        let mut scores: Vec<f32> = cands.iter().map(|c| c.score).collect();
        scores.sort_by(|a, b| b.total_cmp(a));
        let n = budget.keep(&scores, stats.head_passes);
        Ok((rerank(root, &cands, n), stats))
    }

    /// T > 0: breadth-first growth. The root gets `top_k` children; at each level the
    /// `top_k` best-scoring nodes (by their own cumulative log q) are expanded, in score order,
    /// with `sample_branch` children each while the budget lasts. Child counts depend only on
    /// nodes at or above the parent's level, never on the children themselves.
    #[allow(clippy::too_many_arguments)]
    fn dynamic_sampled(
        &self,
        sess: &mut DraftSession,
        root: u32,
        root_hidden: Tensor,
        committed: usize,
        cfg: &SpecConfig,
        sampling: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<(DraftTree, DraftStats)> {
        let budget = cfg.node_budget();
        let mut stats = DraftStats {
            head_passes: 1,
            scored: 0,
        };
        let mut tree = DraftTree::root(root);
        let q = warp(&self.logits(&root_hidden.unsqueeze(0)?)?[0], sampling);
        let mut scores = vec![0f32];
        let mut opens: Vec<Option<Open>> = vec![None];
        let mut level: Vec<usize> = Vec::new();
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
        let branch = cfg.sample_branch.max(1);
        for depth in 1..cfg.depth {
            let room = budget.saturating_sub(tree.len() - 1);
            if room == 0 || level.is_empty() {
                break;
            }
            let mut expand = level.clone();
            expand.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            expand.truncate(cfg.top_k.max(1).min(room.div_ceil(branch)));
            let mut batch: Vec<Open> = expand.iter().map(|&i| opens[i].clone().unwrap()).collect();
            let hidden = self.run_nodes(sess, &mut batch, committed, committed - 1 + depth)?;
            stats.head_passes += 1;
            let logits = self.logits(&hidden)?;
            let mut next = Vec::new();
            for (row, &node) in expand.iter().enumerate() {
                let room = budget.saturating_sub(tree.len() - 1);
                if room == 0 {
                    break;
                }
                let q = warp(&logits[row], sampling);
                for t in sample_without_replacement(&q, branch.min(room), rng) {
                    let c = tree.push(node, t);
                    scores.push(scores[node] + q[t as usize].ln());
                    opens.push(Some(Open {
                        token: t,
                        parent_hidden: hidden.i(row)?,
                        ancestors: batch[row].ancestors.clone(),
                    }));
                    next.push(c);
                }
                tree.draft_probs[node] = Some(q);
            }
            level = next;
        }
        stats.scored = tree.len() - 1;
        Ok((tree, stats))
    }

    /// EAGLE-1 static tree: the shape is fixed; a node's r-th child is the draft's r-th best
    /// token (greedy) or its r-th draw without replacement (sampling).
    #[allow(clippy::too_many_arguments)]
    fn static_tree(
        &self,
        sess: &mut DraftSession,
        root: u32,
        root_hidden: Tensor,
        committed: usize,
        shape: &crate::tree::StaticShape,
        sampling: &SamplingParams,
        rng: &mut Rng,
    ) -> Result<(DraftTree, DraftStats)> {
        let mut stats = DraftStats {
            head_passes: 1,
            scored: 0,
        };
        let mut tree = DraftTree::root(root);
        // Per tree node: its rank path and the head state needed to expand it.
        let mut paths: Vec<Vec<usize>> = vec![vec![]];
        let mut opens: Vec<Option<Open>> = vec![None];
        let mut hiddens: Vec<Option<Tensor>> = vec![Some(root_hidden)];
        let mut level = vec![0usize];
        for depth in 0..shape.max_depth() {
            // Run the head on this level's non-root nodes that have children.
            let to_run: Vec<usize> = level
                .iter()
                .copied()
                .filter(|&i| i != 0 && shape.branching(&paths[i]) > 0)
                .collect();
            if !to_run.is_empty() {
                let mut batch: Vec<Open> =
                    to_run.iter().map(|&i| opens[i].clone().unwrap()).collect();
                let hidden = self.run_nodes(sess, &mut batch, committed, committed - 1 + depth)?;
                stats.head_passes += 1;
                for (row, &i) in to_run.iter().enumerate() {
                    hiddens[i] = Some(hidden.i(row)?);
                    opens[i] = Some(batch[row].clone());
                }
            }
            let mut next = Vec::new();
            for &i in &level {
                let b = shape.branching(&paths[i]);
                if b == 0 {
                    continue;
                }
                let h = hiddens[i].clone().unwrap();
                let logits = &self.logits(&h.unsqueeze(0)?)?[0];
                let toks: Vec<u32> = if sampling.is_greedy() {
                    top_k(logits, b).into_iter().map(|(t, _)| t).collect()
                } else {
                    let q = warp(logits, sampling);
                    let s = sample_without_replacement(&q, b, rng);
                    tree.draft_probs[i] = Some(q);
                    s
                };
                let ancestors = opens[i]
                    .as_ref()
                    .map(|o| o.ancestors.clone())
                    .unwrap_or_default();
                for (r, t) in toks.into_iter().enumerate() {
                    let c = tree.push(i, t);
                    let mut p = paths[i].clone();
                    p.push(r);
                    paths.push(p);
                    opens.push(Some(Open {
                        token: t,
                        parent_hidden: h.clone(),
                        ancestors: ancestors.clone(),
                    }));
                    hiddens.push(None);
                    next.push(c);
                }
            }
            level = next;
        }
        stats.scored = tree.len() - 1;
        Ok((tree, stats))
    }
}
