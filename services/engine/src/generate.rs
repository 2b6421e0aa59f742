//! The in-process speculative pipeline, in the spirit of the reference `eagenerate`:
//! build an [`Engine`] from a target path and a head path, then generate from token ids or chat
//! messages, optionally streaming tokens as they are accepted.
//!
//! One step of EAGLE-2: draft a tree from the head (`draft.rs`), verify it on the target in one
//! forward pass (`session.rs`, `verify.rs`), commit the accepted tokens and their features to
//! the head, repeat. Invariant: the emitted tokens are exactly those of vanilla decoding at
//! T = 0, and distributed as vanilla sampling at T > 0. If drafting fails, the step falls back
//! to a plain decode step, which loses nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device};

use crate::chat::Message;
use crate::draft::{DraftSession, Drafter};
use crate::error::{EngineError, Result};
use crate::head::EagleHead;
use crate::loader::{open_model, Quant};
use crate::models::TargetModel;
use crate::sampling::{choose, Rng, SamplingParams};
use crate::session::TargetSession;
use crate::spec::{CostProfile, SpecConfig, TreeBudget, AUTO_MAX_TOKENS};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Vanilla,
    Eagle,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "vanilla" => Ok(Mode::Vanilla),
            "eagle" => Ok(Mode::Eagle),
            o => Err(format!("unknown mode {o:?} (eagle or vanilla)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Length,
    Eos,
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub mode: Mode,
    pub spec: SpecConfig,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        GenerateRequest {
            prompt,
            max_new_tokens,
            sampling: SamplingParams::greedy(),
            mode: Mode::Eagle,
            spec: SpecConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerateOutput {
    /// The generated tokens only (no prompt, no EOS).
    pub tokens: Vec<u32>,
    pub finish: Option<FinishReason>,
    /// Target forward passes, the prefill included.
    pub steps: usize,
    /// Tokens produced by each target forward pass.
    pub accepted: Vec<usize>,
    /// Steps that fell back to plain decoding because drafting failed.
    pub fallback_steps: usize,
    /// Tree sizes (root included) verified at each speculative step.
    pub tree_sizes: Vec<usize>,
    /// Draft levels of each speculative step's tree (0: the root alone).
    pub tree_depths: Vec<usize>,
    /// Draft tokens accepted at each speculative step (the bonus token not counted).
    pub drafts_accepted: Vec<usize>,
    /// Seconds each speculative step spent drafting its tree (every draft level).
    pub draft_s: Vec<f64>,
    /// Seconds of each speculative step's verification: the target pass over the tree and the
    /// choice of the accepted path.
    pub verify_s: Vec<f64>,
    pub prefill_s: f64,
    pub wall_s: f64,
}

impl GenerateOutput {
    /// Per-position acceptance over this generation's speculative steps.
    pub fn position_acceptance(&self) -> crate::acceptance::PositionAcceptance {
        let mut p = crate::acceptance::PositionAcceptance::default();
        p.add_steps(&self.tree_depths, &self.drafts_accepted);
        p
    }

    /// Tokens per target forward pass.
    pub fn mean_accepted(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.tokens.len() as f64 / self.steps as f64
        }
    }
}

/// How to load an engine.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub model: PathBuf,
    pub head: Option<PathBuf>,
    pub dtype: DType,
    /// Whether matrices stay quantized (CPU): see [`Quant`] and `device::parse_precision`.
    pub quant: Quant,
    pub device: Device,
}

/// How a head loads for a target loaded as `target`: a quantized target gets a Q8_0 head (its
/// float weights quantized at load; drafting is then as cheap as the target's own passes).
pub fn head_quant(target: Quant) -> Quant {
    match target {
        Quant::None => Quant::None,
        Quant::Native | Quant::Q8_0 => Quant::Q8_0,
    }
}

/// A loaded target, its tokenizer and optionally an EAGLE head.
pub struct Engine {
    pub target: Arc<TargetModel>,
    pub drafter: Option<Drafter>,
    pub tokenizer: Tokenizer,
    cost: Mutex<Option<CostProfile>>,
}

impl Engine {
    /// Loads the model and head; `progress(done, total)` reports layers loaded.
    pub fn load(opts: &LoadOptions, progress: &mut dyn FnMut(usize, usize)) -> Result<Self> {
        let opened = open_model(&opts.model)?;
        crate::device::check_precision(
            &crate::device::Precision {
                dtype: opts.dtype,
                quant: opts.quant,
            },
            &opts.device,
        )?;
        let mut target = TargetModel::load_with(
            opened.source.as_ref(),
            opened.config,
            opts.dtype,
            opts.quant,
            &opts.device,
            crate::parallel::Shard::single(),
            progress,
        )?;
        let drafter = match &opts.head {
            Some(dir) => {
                let head = EagleHead::load_with(
                    dir,
                    &target.cfg,
                    opts.dtype,
                    head_quant(opts.quant),
                    &opts.device,
                )?;
                target.set_draft_layers(head.kind.target_layers())?;
                Some(Drafter::new(Arc::new(head), &target))
            }
            None => None,
        };
        Ok(Engine {
            target: Arc::new(target),
            drafter,
            tokenizer: opened.tokenizer,
            cost: Mutex::new(None),
        })
    }

    /// An engine over a loaded target and head; the target gives the features the head reads.
    /// Panics when the head reads a layer the target does not have (`EagleHead::load` checks
    /// this against the target's config).
    pub fn from_parts(
        mut target: TargetModel,
        head: Option<EagleHead>,
        tokenizer: Tokenizer,
    ) -> Self {
        if let Some(h) = &head {
            target
                .set_draft_layers(h.kind.target_layers())
                .expect("the head was built for this target");
        }
        let drafter = head.map(|h| Drafter::new(Arc::new(h), &target));
        Engine {
            target: Arc::new(target),
            drafter,
            tokenizer,
            cost: Mutex::new(None),
        }
    }

    /// Chat messages through the model's template, as token ids.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.tokenizer.encode_chat(messages)
    }

    /// The measured verification cost profile, measured on first use.
    pub fn cost_profile(&self) -> Result<CostProfile> {
        let mut guard = self.cost.lock().expect("cost profile lock");
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let mut c = measure_costs(&self.target)?;
        if let Some(d) = &self.drafter {
            c.draft_level_s = d.measure_level_cost(SpecConfig::default().top_k)?;
        }
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Sets the cost profile (from a previous measurement, or for tests).
    pub fn set_cost_profile(&self, c: CostProfile) {
        *self.cost.lock().expect("cost profile lock") = Some(c);
    }

    pub fn generate(&self, req: &GenerateRequest) -> Result<GenerateOutput> {
        self.generate_stream(req, &mut |_| true)
    }

    /// Generates, calling `on_tokens` with each batch of accepted tokens; returning false
    /// cancels.
    pub fn generate_stream(
        &self,
        req: &GenerateRequest,
        on_tokens: &mut dyn FnMut(&[u32]) -> bool,
    ) -> Result<GenerateOutput> {
        self.validate(req)?;
        // The one-time cost calibration is an engine cost, like loading: not timed here.
        let profile =
            if req.mode == Mode::Eagle && self.drafter.is_some() && req.spec.total_token < 0 {
                Some(self.cost_profile()?)
            } else {
                None
            };
        let t0 = Instant::now();
        let target = &*self.target;
        let spec = &req.spec;
        let mut rng = Rng::new(req.sampling.seed);
        let tree_room = spec.node_budget() + 1;
        let capacity = req.prompt.len() + req.max_new_tokens + tree_room + 1;
        let mut sess = TargetSession::new(target, capacity)?;
        let mut out = GenerateOutput::default();
        let eos = self.tokenizer.eos_ids().to_vec();

        let choose = |logits: &[f32], rng: &mut Rng| choose(logits, &req.sampling, rng);
        // Emits tokens, applying EOS and the length limit. Returns false when generation ends.
        let emit =
            |out: &mut GenerateOutput, toks: &[u32], on: &mut dyn FnMut(&[u32]) -> bool| -> bool {
                out.steps += 1;
                out.accepted.push(toks.len());
                let mut take = Vec::new();
                for &t in toks {
                    if eos.contains(&t) {
                        out.finish = Some(FinishReason::Eos);
                        break;
                    }
                    take.push(t);
                    if out.tokens.len() + take.len() >= req.max_new_tokens {
                        out.finish = Some(FinishReason::Length);
                        break;
                    }
                }
                out.tokens.extend_from_slice(&take);
                if !take.is_empty() && !on(&take) {
                    out.finish = Some(FinishReason::Cancelled);
                }
                out.finish.is_none()
            };

        let (feats, logits) = sess.prefill(target, &req.prompt)?;
        let mut last = choose(&logits, &mut rng);
        out.prefill_s = t0.elapsed().as_secs_f64();
        let going = emit(&mut out, &[last], on_tokens);

        let drafter = match (req.mode, &self.drafter) {
            (Mode::Eagle, Some(d)) => Some(d),
            // `validate` refused EAGLE mode without a head.
            (Mode::Eagle, None) | (Mode::Vanilla, _) => None,
        };
        let mut draft_sess: Option<DraftSession> = None;
        if let (Some(d), true) = (drafter, going) {
            let mut ds = d.open(capacity + spec.draft_slots())?;
            let mut shifted: Vec<u32> = req.prompt[1..].to_vec();
            shifted.push(last);
            ds.push(&shifted, &feats)?;
            draft_sess = Some(ds);
        }
        let budget = TreeBudget::for_spec(spec, profile);

        let mut going = going;
        // A tree's deepest node sits `depth` positions past the prefix: near the end of the
        // model's context, steps decode plainly instead.
        let max_pos = target.cfg.max_position_embeddings;
        let tree_depth = match &spec.shape {
            crate::spec::TreeShape::Dynamic => spec.depth,
            crate::spec::TreeShape::Static(s) => s.max_depth(),
        };
        while going {
            let room = sess.cache.len() + tree_depth < max_pos;
            let drafting = Instant::now();
            let drafted = match (drafter, draft_sess.as_mut()) {
                (Some(d), Some(ds)) if room => {
                    match d.draft(ds, last, spec, &req.sampling, &mut rng, &budget) {
                        Ok((tree, _)) => Some(tree),
                        Err(e) => {
                            tracing::warn!(error = %e, "drafting failed; decoding this step plainly");
                            None
                        }
                    }
                }
                _ => None,
            };
            match drafted {
                Some(tree) => {
                    out.draft_s.push(drafting.elapsed().as_secs_f64());
                    out.tree_sizes.push(tree.len());
                    out.tree_depths.push(tree.max_depth());
                    let verifying = Instant::now();
                    let v = sess.verify(target, &tree, &req.sampling, &mut rng)?;
                    out.verify_s.push(verifying.elapsed().as_secs_f64());
                    let toks = v.verdict.tokens.clone();
                    out.drafts_accepted.push(toks.len() - 1);
                    last = *toks.last().expect("a verdict has a bonus token");
                    going = emit(&mut out, &toks, on_tokens);
                    if let Some(ds) = draft_sess.as_mut() {
                        ds.push(&toks, &v.features)?;
                    }
                }
                None => {
                    let (f, logits) = sess.decode(target, last)?;
                    let next = choose(&logits, &mut rng);
                    if drafter.is_some() {
                        out.fallback_steps += 1;
                    }
                    if let Some(ds) = draft_sess.as_mut() {
                        ds.push(&[next], &f)?;
                    }
                    last = next;
                    going = emit(&mut out, &[next], on_tokens);
                }
            }
        }
        out.wall_s = t0.elapsed().as_secs_f64();
        Ok(out)
    }

    fn validate(&self, req: &GenerateRequest) -> Result<()> {
        if req.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if req.max_new_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        req.sampling.validate()?;
        req.spec.validate()?;
        if req.mode == Mode::Eagle && self.drafter.is_none() {
            return Err(EngineError::InvalidRequest(
                "EAGLE mode needs a head: load one with --head (or `eagle head init`)".into(),
            ));
        }
        let limit = self.target.cfg.max_position_embeddings;
        let needed = req.prompt.len() + req.max_new_tokens;
        if needed > limit {
            return Err(EngineError::ContextOverflow { needed, limit });
        }
        let vocab = self.target.cfg.vocab_size as u32;
        if let Some(bad) = req.prompt.iter().find(|&&t| t >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
    }
}

/// Timing rounds over the verification sizes.
const COST_ROUNDS: usize = 5;

/// Times target forwards of n new tokens after a 64-token prefix, for n up to
/// [`AUTO_MAX_TOKENS`]; each point is the fastest of [`COST_ROUNDS`] rounds over all sizes.
pub fn measure_costs(target: &TargetModel) -> Result<CostProfile> {
    let prefix: Vec<u32> = (0..64u32)
        .map(|i| (i * 7919 + 13) % target.cfg.vocab_size as u32)
        .collect();
    let mut sess = TargetSession::new(target, prefix.len() + AUTO_MAX_TOKENS + 1)?;
    sess.prefill(target, &prefix)?;
    let base = sess.cache.len();
    let sizes = [1usize, 2, 4, 8, 16, 32, AUTO_MAX_TOKENS];
    let trees: Vec<crate::tree::DraftTree> = sizes
        .iter()
        .map(|&n| {
            let mut tree = crate::tree::DraftTree::root(prefix[0]);
            for i in 1..n {
                tree.push(i - 1, prefix[i % prefix.len()]);
            }
            tree
        })
        .collect();
    // Rounds over all sizes, the fastest of each kept: a machine busy for a while (another
    // process loading or measuring beside this one) then slows every size alike instead of
    // some sizes only, which would bend the curve and mis-size every tree afterwards.
    let mut best = vec![f64::INFINITY; sizes.len()];
    for _ in 0..COST_ROUNDS {
        for (tree, best) in trees.iter().zip(&mut best) {
            let t = Instant::now();
            let vis = crate::kernels::attention::Visibility::tree(base, &tree.parents);
            let f = target.forward(&mut sess.cache, &tree.tokens, &tree.positions(base), &vis)?;
            // Greedy verification reads the LM head at a node; reading the logits back also
            // waits for an asynchronous device.
            target.logits(&f.narrow(0, 0, 1)?)?.to_vec2::<f32>()?;
            *best = best.min(t.elapsed().as_secs_f64());
            sess.cache.truncate(base);
        }
    }
    let points = sizes.into_iter().zip(best).collect();
    Ok(CostProfile {
        points,
        ..Default::default()
    }
    .monotone())
}
