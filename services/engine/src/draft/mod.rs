//! The draft side: EAGLE head sessions, and the tree builders that run them a level at a time,
//! so that the trees of many sessions share each head pass (the draft service's batches).
//! `greedy.rs` grows EAGLE-2's tree at T = 0, `sampled.rs` the tree at T > 0; static EAGLE-1
//! trees are built here, alone.
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
//! - A tree does not depend on the other sessions it is drafted with: the head's and the LM
//!   head's rows are computed independently on the CPU kernels (`crate::kernels`), and each
//!   builder holds only its own session's state and random stream.
//! - A head with a reduced draft vocabulary (EAGLE-3) scores only its N tokens; every other
//!   token gets draft logit -inf, so q is the softmax over the N tokens and zero elsewhere.
//!   Verification still uses the target's full distribution, so both modes stay exact.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::head::{EagleHead, HeadRows};
use crate::kernels::attention::Visibility;
use crate::kv_cache::KvCache;
use crate::layers::{use_cpu_kernels, Linear, Matrix};
use crate::loader::{Quant, WeightSource, Weights};
use crate::models::target::{embed_rows, lm_head, load_embed_and_lm_head};
use crate::models::TargetModel;
use crate::sampling::{
    sample_without_replacement, top_k, top_log_probs, warp, Rng, SamplingParams,
};
use crate::spec::{BatchLoad, SpecConfig, TreeBudget, TreeShape};
use crate::tree::DraftTree;

mod greedy;
mod sampled;

use greedy::Greedy;
use sampled::Sampled;

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
    /// Values per token of the target features the head reads.
    feature_width: usize,
}

impl DraftSession {
    /// Queues committed (token, feature) pairs: `tokens[i]` pairs with `features` row i (the
    /// target's draft features, [m, head feature width]).
    pub fn push(&mut self, tokens: &[u32], features: &Tensor) -> Result<()> {
        let (rows, width) = features.dims2()?;
        if rows != tokens.len() {
            return Err(EngineError::InvalidRequest(format!(
                "{} tokens but {rows} feature rows",
                tokens.len()
            )));
        }
        if width != self.feature_width {
            return Err(EngineError::InvalidRequest(format!(
                "features {width} wide: the head reads {} values per token",
                self.feature_width
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

/// One session's draft in a batch: see [`Drafter::draft`].
pub struct DraftJob<'a> {
    pub sess: &'a mut DraftSession,
    pub root: u32,
    pub cfg: &'a SpecConfig,
    pub sampling: &'a SamplingParams,
    pub rng: &'a mut Rng,
    pub budget: &'a TreeBudget,
    /// The rest of the target pass this tree joins (greedy automatic trees are sized for the
    /// batch); `BatchLoad::default()` for a sequence alone.
    pub load: BatchLoad,
}

/// A session's rows for a head pass: embeddings, features, positions and visibility.
type HeadInputs = (Tensor, Tensor, Vec<usize>, Visibility);

/// A dynamic tree being grown a level at a time.
enum Build<'a> {
    Greedy(Greedy<'a>),
    Sampled(Sampled<'a>),
}

impl Build<'_> {
    fn depth(&self) -> usize {
        match self {
            Build::Greedy(g) => g.depth(),
            Build::Sampled(s) => s.depth(),
        }
    }

    fn next_level(&mut self) -> Option<&mut [Open]> {
        match self {
            Build::Greedy(g) => g.next_level(),
            Build::Sampled(s) => s.next_level(),
        }
    }

    fn finish(self) -> (DraftTree, DraftStats) {
        match self {
            Build::Greedy(g) => g.finish(),
            Build::Sampled(s) => s.finish(),
        }
    }
}

/// Fails every session of a shared pass that failed.
fn fail_all(out: &mut [Option<Result<(DraftTree, DraftStats)>>], which: &[usize], e: &EngineError) {
    for &i in which {
        out[i] = Some(Err(EngineError::Candle(candle_core::Error::Msg(format!(
            "the shared head pass failed: {e}"
        )))));
    }
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
        let width = self.head.feature_width();
        let prefix = 64;
        let mut sess = self.open(prefix + k + 1)?;
        let tokens: Vec<u32> = (0..prefix as u32)
            .map(|i| (i * 7919 + 13) % self.vocab as u32)
            .collect();
        let feats = Tensor::zeros((prefix, width), DType::F32, &self.head.device)?;
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
            std::hint::black_box(self.lm_rows(std::slice::from_ref(&hidden))?);
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
            feature_width: self.head.feature_width(),
        })
    }

    /// LM-head rows (over the draft vocabulary) of several [m_i, H] head outputs (through an
    /// EAGLE-3 head's output norm first): on the CPU kernels one pass over all their rows,
    /// whose results do not depend on each other.
    fn lm_rows(&self, hiddens: &[Tensor]) -> Result<Vec<Vec<Vec<f32>>>> {
        let cpu = use_cpu_kernels(&self.head.device);
        let scores = |h: &Tensor| lm_head(&self.lm_head, &self.head.lm_input(h)?, cpu);
        if !cpu || hiddens.len() == 1 {
            return hiddens
                .iter()
                .map(|h| Ok(scores(h)?.to_vec2::<f32>()?))
                .collect();
        }
        if hiddens.is_empty() {
            return Ok(Vec::new());
        }
        let mut all = scores(&Tensor::cat(hiddens, 0)?)?
            .to_vec2::<f32>()?
            .into_iter();
        Ok(hiddens
            .iter()
            .map(|h| all.by_ref().take(h.dim(0).unwrap_or(0)).collect())
            .collect())
    }

    /// A draft row over the target vocabulary: with a reduced draft vocabulary every other
    /// token gets -inf.
    fn full_row(&self, row: &[f32]) -> Vec<f32> {
        let Some(d2t) = &self.d2t else {
            return row.to_vec();
        };
        let mut full = vec![f32::NEG_INFINITY; self.vocab];
        for (&t, &v) in d2t.iter().zip(row) {
            full[t as usize] = v;
        }
        full
    }

    /// The `k` most likely next tokens (target ids) and their log-probabilities. With a reduced
    /// draft vocabulary this works on the reduced row: the other tokens have probability 0, so
    /// the values equal those of the full row, for a fraction of the work.
    fn top_of(&self, row: &[f32], k: usize) -> Vec<(u32, f32)> {
        top_log_probs(row, k)
            .into_iter()
            .map(|(i, lp)| (self.d2t.as_ref().map_or(i, |d| d[i as usize]), lp))
            .collect()
    }

    /// Draft logits over the target vocabulary, one row per hidden row.
    fn logits(&self, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
        let rows = self.lm_rows(std::slice::from_ref(hidden))?.remove(0);
        Ok(rows.iter().map(|r| self.full_row(r)).collect())
    }

    /// Runs the queued committed pairs through the head. Returns the head output at the last
    /// pair: the predicted feature of the root's position.
    fn absorb(&self, sess: &mut DraftSession) -> Result<Tensor> {
        if sess.pending_tokens.is_empty() {
            return Err(EngineError::InvalidRequest(
                "draft: no committed tokens to extend (push the prompt first)".into(),
            ));
        }
        let mut out = [None];
        match (
            self.absorb_batch(&mut [sess], &[0], &mut out).pop(),
            out[0].take(),
        ) {
            (Some((_, hidden)), _) => Ok(hidden),
            (None, Some(Err(e))) => Err(e),
            _ => unreachable!("absorbing a session runs it or fails it"),
        }
    }

    /// The head inputs of drafted `nodes` (all at head position `position`), written from
    /// cache slot `start` after the committed prefix `committed`: each sees the prefix, its
    /// ancestors and itself (its own slot is added to its ancestors here).
    fn node_inputs(
        &self,
        nodes: &mut [Open],
        start: usize,
        committed: usize,
        position: usize,
    ) -> Result<HeadInputs> {
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
        Ok((embeds, feats, vec![position; nodes.len()], vis))
    }

    /// Runs drafted `nodes` of one session; see [`Self::node_inputs`]. Returns their outputs.
    fn run_nodes(
        &self,
        sess: &mut DraftSession,
        nodes: &mut [Open],
        committed: usize,
        position: usize,
    ) -> Result<Tensor> {
        let start = sess.cache.len();
        let (embeds, feats, positions, vis) =
            self.node_inputs(nodes, start, committed, position)?;
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
        let job = DraftJob {
            sess,
            root,
            cfg,
            sampling,
            rng,
            budget,
            load: BatchLoad::default(),
        };
        self.draft_batch(vec![job])
            .pop()
            .expect("one result per job")
    }

    /// Builds the trees of several sessions together: their committed pairs in one head pass,
    /// then one head pass and one LM-head pass per tree level over the nodes of every session
    /// still growing (static EAGLE-1 trees are built alone after the shared passes). Each
    /// session gets exactly the tree [`Self::draft`] gives it alone (the CPU kernels' rows do
    /// not depend on each other); a session that fails (a wrong root, a full cache) fails
    /// alone.
    pub fn draft_batch(&self, jobs: Vec<DraftJob<'_>>) -> Vec<Result<(DraftTree, DraftStats)>> {
        let mut out: Vec<Option<Result<(DraftTree, DraftStats)>>> =
            jobs.iter().map(|_| None).collect();
        let mut sessions = Vec::with_capacity(jobs.len());
        let mut rest = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.into_iter().enumerate() {
            let DraftJob {
                sess,
                root,
                cfg,
                sampling,
                rng,
                budget,
                load,
            } = job;
            if sess.pending_tokens.last() != Some(&root) {
                out[i] = Some(Err(EngineError::InvalidRequest(
                    "draft: the root must be the last committed token".into(),
                )));
            }
            sessions.push(sess);
            rest.push(Some((root, cfg, sampling, rng, budget, load)));
        }
        // The committed pairs of every session: the root's head output ends each.
        let absorbing: Vec<usize> = (0..sessions.len()).filter(|&i| out[i].is_none()).collect();
        let roots = self.absorb_batch(&mut sessions, &absorbing, &mut out);
        let committed: Vec<usize> = sessions.iter().map(|s| s.cache.len()).collect();
        let live: Vec<usize> = roots.iter().map(|(i, _)| *i).collect();
        let root_rows = roots
            .iter()
            .map(|(_, h)| h.unsqueeze(0))
            .collect::<candle_core::Result<Vec<Tensor>>>()
            .map_err(EngineError::from)
            .and_then(|hiddens| self.lm_rows(&hiddens));
        let root_rows = match root_rows {
            Ok(r) => r,
            Err(e) => {
                fail_all(&mut out, &live, &e);
                Vec::new()
            }
        };
        let mut builds: Vec<(usize, Build<'_>)> = Vec::new();
        for ((i, hidden), rows) in roots.into_iter().zip(root_rows) {
            let (root, cfg, sampling, rng, budget, load) = rest[i].take().expect("one job each");
            let row = &rows[0];
            match (&cfg.shape, sampling.is_greedy()) {
                (TreeShape::Dynamic, true) => builds.push((
                    i,
                    Build::Greedy(Greedy::new(
                        root,
                        &hidden,
                        self.top_of(row, cfg.top_k.max(1)),
                        cfg,
                        budget,
                        load,
                    )),
                )),
                (TreeShape::Dynamic, false) => {
                    // The size is fixed before any child is drawn (`TreeBudget::sampled_nodes`).
                    let sized = SpecConfig {
                        total_token: (budget.sampled_nodes() + 1) as i32,
                        ..cfg.clone()
                    };
                    let logits = self.full_row(row);
                    builds.push((
                        i,
                        Build::Sampled(Sampled::new(root, &hidden, &logits, &sized, sampling, rng)),
                    ));
                }
                (TreeShape::Static(shape), _) => {
                    let sess = &mut *sessions[i];
                    out[i] = Some(self.static_tree(
                        sess,
                        root,
                        hidden,
                        committed[i],
                        shape,
                        sampling,
                        rng,
                    ));
                    sess.cache.truncate(committed[i]);
                }
            }
        }
        // One head pass and one LM-head pass per level, over every tree still growing.
        loop {
            let mut level: Vec<(usize, usize, &mut [Open], usize)> = Vec::new();
            for (b, (i, build)) in builds.iter_mut().enumerate() {
                if out[*i].is_some() {
                    continue;
                }
                let depth = build.depth();
                if let Some(nodes) = build.next_level() {
                    level.push((b, *i, nodes, depth));
                }
            }
            if level.is_empty() {
                break;
            }
            for (b, hidden, rows) in self.run_level(&mut sessions, &committed, &mut level, &mut out)
            {
                let (i, build) = &mut builds[b];
                let r = match build {
                    Build::Greedy(g) => {
                        let k = g.top_k();
                        g.take(&hidden, rows.iter().map(|r| self.top_of(r, k)).collect())
                    }
                    Build::Sampled(s) => {
                        s.take(&hidden, rows.iter().map(|r| self.full_row(r)).collect())
                    }
                };
                if let Err(e) = r {
                    out[*i] = Some(Err(e));
                }
            }
        }
        for (i, build) in builds {
            if out[i].is_none() {
                out[i] = Some(Ok(build.finish()));
            }
        }
        for i in live {
            sessions[i].cache.truncate(committed[i]);
        }
        out.into_iter()
            .map(|r| r.expect("every job has a result"))
            .collect()
    }

    /// Runs the queued committed pairs of sessions `which` through the head in one pass.
    /// Returns (session, head output at its last pair: the predicted feature of the root's
    /// position) for those that ran; the others get their error in `out`.
    fn absorb_batch(
        &self,
        sessions: &mut [&mut DraftSession],
        which: &[usize],
        out: &mut [Option<Result<(DraftTree, DraftStats)>>],
    ) -> Vec<(usize, Tensor)> {
        let mut inputs = Vec::new();
        for &i in which {
            let sess = &mut *sessions[i];
            let m = sess.pending_tokens.len();
            let start = sess.cache.len();
            let prepared = sess.cache.reserve(m).and_then(|()| {
                let embeds = embed_rows(
                    &self.embed,
                    &sess.pending_tokens,
                    self.vocab,
                    &self.head.device,
                )?;
                let feats = self.head.fuse(&Tensor::cat(&sess.pending_features, 0)?)?;
                Ok((embeds, feats))
            });
            sess.pending_tokens.clear();
            sess.pending_features.clear();
            match prepared {
                Ok((embeds, feats)) => inputs.push((
                    i,
                    (
                        embeds,
                        feats,
                        (start..start + m).collect::<Vec<usize>>(),
                        Visibility::causal(start, m),
                    ),
                )),
                Err(e) => out[i] = Some(Err(e)),
            }
        }
        let ran: Vec<usize> = inputs.iter().map(|x| x.0).collect();
        match self.head_pass(sessions, &inputs) {
            Ok(hidden) => ran
                .into_iter()
                .zip(hidden)
                .filter_map(|(i, h)| {
                    let m = h.dim(0).ok()?;
                    match h.i(m - 1) {
                        Ok(last) => Some((i, last)),
                        Err(e) => {
                            out[i] = Some(Err(e.into()));
                            None
                        }
                    }
                })
                .collect(),
            Err(e) => {
                fail_all(out, &ran, &e);
                Vec::new()
            }
        }
    }

    /// Runs one level of several sessions' trees: their nodes in one head pass, then one
    /// LM-head pass. Returns (builder, head outputs, LM-head rows) per level that ran; a
    /// session whose cache cannot hold its level fails alone, in `out`.
    fn run_level(
        &self,
        sessions: &mut [&mut DraftSession],
        committed: &[usize],
        level: &mut [(usize, usize, &mut [Open], usize)],
        out: &mut [Option<Result<(DraftTree, DraftStats)>>],
    ) -> Vec<(usize, Tensor, Vec<Vec<f32>>)> {
        let (mut builders, mut inputs) = (Vec::new(), Vec::new());
        for (b, i, nodes, depth) in level.iter_mut() {
            let sess = &*sessions[*i];
            let start = sess.cache.len();
            let prepared = sess.cache.reserve(nodes.len()).and_then(|()| {
                self.node_inputs(nodes, start, committed[*i], committed[*i] - 1 + *depth)
            });
            match prepared {
                Ok(x) => {
                    builders.push(*b);
                    inputs.push((*i, x));
                }
                Err(e) => out[*i] = Some(Err(e)),
            }
        }
        let who: Vec<usize> = inputs.iter().map(|x| x.0).collect();
        let result = self.head_pass(sessions, &inputs).and_then(|hidden| {
            let lm = self.lm_rows(&hidden)?;
            Ok((hidden, lm))
        });
        match result {
            Ok((hidden, lm)) => builders
                .into_iter()
                .zip(hidden)
                .zip(lm)
                .map(|((b, h), rows)| (b, h, rows))
                .collect(),
            Err(e) => {
                fail_all(out, &who, &e);
                Vec::new()
            }
        }
    }

    /// One head pass over the prepared rows of distinct sessions (their index in `sessions`).
    fn head_pass(
        &self,
        sessions: &mut [&mut DraftSession],
        inputs: &[(usize, HeadInputs)],
    ) -> Result<Vec<Tensor>> {
        let mut by_index: Vec<Option<&mut DraftSession>> =
            sessions.iter_mut().map(|s| Some(&mut **s)).collect();
        let mut rows: Vec<HeadRows<'_>> = inputs
            .iter()
            .map(|(i, (embeds, features, positions, vis))| HeadRows {
                cache: &mut by_index[*i].take().expect("a session once").cache,
                embeds,
                features,
                positions,
                vis,
            })
            .collect();
        self.head.forward_batch(&mut rows)
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
