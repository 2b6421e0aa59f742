//! Training an EAGLE head (Li et al., 2024) on stored features, with candle autograd: EAGLE-1/2
//! heads on the target's last features, EAGLE-3 heads (Li et al., 2025) on three of its
//! layers' outputs, either one step ahead or unrolled on their own outputs for several steps
//! (EAGLE-3's training-time test, `EagleHead::forward_ttt`; see `batch.rs`).
//!
//! Invariants:
//! - The head that trains is the engine's head: each step builds an [`EagleHead`] from the
//!   trainable variables (f32 master weights, cast to the compute dtype by candle ops) and runs
//!   its differentiable cache-free forward ([`EagleHead::forward_masked`]), the same decoder
//!   layer that serves. The engine's CPU kernels, which record no graph, are never used here.
//! - The target's embedding and LM head are frozen; with a reduced draft vocabulary the head's
//!   own LM head (rows of the target's) is frozen too (see `vocab.rs`).
//! - The final head is written with [`EagleHead::save`], in the published format, so
//!   `EagleHead::load` reads it back.
//! - A checkpoint (f32 weights, AdamW moments, epoch, step, the batch reached within the epoch
//!   and that epoch's running sums) is written after every epoch, every `checkpoint_every`
//!   steps and when a step or time limit stops the run. `resume` continues from it exactly:
//!   batch order and input noise are functions of (seed, epoch, batch), so a resumed run takes
//!   the steps an uninterrupted one takes, bit for bit on the CPU.
//! - With `patience`, the head in `out` is always the one with the lowest held-out loss so far
//!   (usable while the run goes on), and the run ends after `patience` epochs without a better
//!   one: training for as long as it keeps improving.
//!
//! Recipe (EAGLE paper): input features get uniform noise U(-0.1, 0.1); loss = SmoothL1 + 0.1 x
//! soft cross-entropy on assistant positions; AdamW (betas 0.9, 0.95), linear warm-up then decay,
//! gradient clipping by global norm. EAGLE-3: the soft cross-entropy alone, through the head's
//! own output norm; step k of a training-time test weighted 0.8^k (the reference's). One
//! deviation from the EAGLE-3 reference: a reduced draft vocabulary's LM head (rows of the
//! target's) stays frozen here, as for EAGLE-1/2 heads, where the reference trains it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use eagle_engine::config::ModelConfig;
use eagle_engine::head::{DraftVocab, EagleHead, HeadKind};
use eagle_engine::layers::{Linear, Matrix, TttKv};
use eagle_engine::loader::{open_model, Weights};
use eagle_engine::models::target::embed_rows;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::Rng;
use serde::{Deserialize, Serialize};

use crate::batch::{build_with, pack, Batch, BatchShape};
use crate::error::{Result, TrainError};
use crate::loss::{classification, eagle_loss, LossHeads, LossOut};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use crate::shards::Dataset;
use crate::vocab::{count_tokens, coverage, top_tokens};

/// Training settings.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f64,
    /// Pairs per optimizer step (conversations are packed up to this).
    pub batch_tokens: usize,
    /// Warm-up steps.
    pub warmup: usize,
    /// Final learning rate as a fraction of `lr`.
    pub lr_floor: f64,
    /// Global gradient-norm limit.
    pub grad_clip: f64,
    /// Half-width of the uniform noise on input features.
    pub noise: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Weight of the classification term.
    pub w_cls: f64,
    pub seed: u64,
    /// Reduced draft vocabulary size.
    pub draft_vocab: Option<usize>,
    /// dtype of the matrix products (f32 master weights either way).
    #[serde(skip)]
    pub compute_dtype: DType,
    /// dtype of the final head's weights.
    #[serde(skip)]
    pub save_dtype: DType,
    /// Continue from `out/checkpoint`.
    pub resume: bool,
    /// Also checkpoint every this many optimizer steps (besides every epoch's end).
    pub checkpoint_every: Option<usize>,
    /// Checkpoint and stop once the run reaches this optimizer step (the run resumes later).
    pub stop_at_step: Option<usize>,
    /// Checkpoint and stop after this long (a long run split over sessions).
    #[serde(skip)]
    pub time_limit: Option<std::time::Duration>,
    /// Keep the head with the lowest held-out loss (written to `out` after each epoch that
    /// improves it) and end the run after this many epochs without improvement.
    pub patience: Option<usize>,
    /// Start from this head instead of a random one.
    pub init: Option<PathBuf>,
    /// Train an EAGLE-3 head (on data with the target's layer features) instead of EAGLE-1/2.
    pub eagle3: bool,
    /// Steps of the training-time test (EAGLE-3): the head is unrolled on its own outputs this
    /// many steps per row, step k weighted 0.8^k; 1 trains one step, as EAGLE-1/2 do.
    pub ttt_steps: usize,
    /// Steps the held-out evaluation unrolls, for its accuracy by step (at least `ttt_steps`).
    pub eval_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 4,
            lr: 3e-4,
            batch_tokens: 2048,
            warmup: 100,
            lr_floor: 0.1,
            grad_clip: 0.5,
            noise: 0.1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            w_cls: 0.1,
            seed: 0,
            draft_vocab: None,
            compute_dtype: DType::F32,
            save_dtype: DType::F16,
            resume: false,
            checkpoint_every: None,
            stop_at_step: None,
            time_limit: None,
            patience: None,
            init: None,
            eagle3: false,
            ttt_steps: 1,
            eval_steps: 5,
        }
    }
}

/// The weight of step k's loss in a training-time test (the reference's 0.8^k).
fn step_weight(k: usize) -> f64 {
    0.8f64.powi(k as i32)
}

/// What the head borrows from the target, frozen.
pub struct FrozenTarget {
    pub cfg: ModelConfig,
    /// [vocab, hidden].
    pub embed: Matrix,
    pub lm_head: Linear,
    pub device: Device,
}

impl FrozenTarget {
    pub fn from_target(t: &TargetModel) -> Self {
        FrozenTarget {
            cfg: t.cfg.clone(),
            embed: t.embed.clone(),
            lm_head: t.lm_head.clone(),
            device: t.device.clone(),
        }
    }

    /// Loads only the embedding and the LM head of a model (.gguf or HF directory).
    pub fn load(model: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let opened = open_model(model)?;
        let cfg = opened.config;
        let w = Weights::new(opened.source.as_ref(), dtype, device.clone());
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let embed = w.get("model.embed_tokens.weight", &[v, h])?;
        let lm = match w.get_opt("lm_head.weight", &[v, h])? {
            Some(t) if !cfg.tie_word_embeddings => t,
            _ => embed.clone(),
        };
        Ok(FrozenTarget {
            cfg,
            embed: Matrix::Dense(embed),
            lm_head: Linear::new(lm, None)?,
            device: device.clone(),
        })
    }
}

/// One line of `train_log.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub step: usize,
    pub lr: f64,
    /// Mean over the epoch's steps (absent for the initial evaluation).
    pub train_loss: Option<f64>,
    pub train_acc: Option<f64>,
    pub heldout_loss: f64,
    pub heldout_vloss: f64,
    pub heldout_ploss: f64,
    /// Top-1: the draft's argmax equals the target's next-token argmax.
    pub heldout_acc: f64,
    pub heldout_positions: usize,
    /// Held-out top-1 by step of the unrolled head (step 0 is `heldout_acc`): at step k the
    /// head reads its own outputs of the k steps before with the true tokens, so on greedy
    /// target answers this is the chance that a chain's k-th draft token is accepted given
    /// the ones before were (EAGLE's per-position acceptance at T = 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub heldout_acc_by_step: Vec<f64>,
    pub elapsed_s: f64,
}

impl EpochLog {
    /// The line for `(epoch, step, lr)` from the epoch's training meter (none before training)
    /// and the held-out evaluation.
    fn new(
        (epoch, step, lr): (usize, usize, f64),
        train: Option<&Meter>,
        held: &Meter,
        w_cls: f64,
        t0: Instant,
    ) -> Self {
        EpochLog {
            epoch,
            step,
            lr,
            train_loss: train.map(|t| t.vloss() + w_cls * t.ploss()),
            train_acc: train.map(Meter::acc),
            heldout_loss: held.vloss() + w_cls * held.ploss(),
            heldout_vloss: held.vloss(),
            heldout_ploss: held.ploss(),
            heldout_acc: held.acc(),
            heldout_positions: held.rows,
            heldout_acc_by_step: held.acc_by_step(),
            elapsed_s: t0.elapsed().as_secs_f64(),
        }
    }
}

/// Progress reports.
pub enum TrainEvent<'a> {
    Start {
        total_steps: usize,
        steps_per_epoch: usize,
        first_step: usize,
    },
    Step {
        step: usize,
        loss: f64,
        lr: f64,
    },
    Evaluating,
    Epoch(&'a EpochLog),
    /// A checkpoint was written within an epoch (at a step or time limit, or periodically).
    Checkpoint {
        step: usize,
    },
    /// `patience` epochs passed without a better held-out loss: the run ends here.
    EarlyStop {
        epoch: usize,
    },
}

/// Where a run stands, saved with each checkpoint.
#[derive(Default, Serialize, Deserialize)]
struct TrainerState {
    /// Epochs completed.
    epoch: usize,
    /// Optimizer steps taken.
    step: usize,
    /// Batches of epoch `epoch + 1` already trained on (0 at an epoch's end).
    #[serde(default)]
    batch: usize,
    /// That epoch's training sums so far.
    #[serde(default)]
    meter: Meter,
    /// AdamW's step count; absent in checkpoints written before the moments were saved (they
    /// then restart from zero).
    #[serde(default)]
    adam_t: Option<usize>,
    /// The lowest held-out loss at an epoch's end so far, and the epochs since it.
    #[serde(default)]
    best: Option<(f64, usize)>,
}

pub const CHECKPOINT: &str = "checkpoint";
pub const LOG: &str = "train_log.jsonl";
const STATE: &str = "trainer_state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

/// Writes a checkpoint whole: into `checkpoint.tmp` (the state file last), then in place of
/// the previous one, so a run killed while writing keeps a complete checkpoint. Records
/// AdamW's step count in `state`.
fn write_checkpoint(
    out: &Path,
    params: &Params,
    opt: &AdamW,
    state: &mut TrainerState,
) -> Result<()> {
    state.adam_t = Some(opt.steps());
    let (dir, tmp) = (out.join(CHECKPOINT), out.join(format!("{CHECKPOINT}.tmp")));
    let _ = std::fs::remove_dir_all(&tmp);
    params.save(&tmp, DType::F32)?;
    opt.save(&tmp.join(OPTIMIZER))?;
    let state_path = tmp.join(STATE);
    std::fs::write(&state_path, serde_json::to_string(state).expect("state"))
        .map_err(|e| TrainError::io(&state_path, e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))
}

/// The checkpoint to resume from: `checkpoint`, or a complete `checkpoint.tmp` when a run was
/// killed between removing the old one and renaming the new one.
fn find_checkpoint(out: &Path) -> Option<PathBuf> {
    [CHECKPOINT.to_string(), format!("{CHECKPOINT}.tmp")]
        .into_iter()
        .map(|d| out.join(d))
        .find(|d| d.join(STATE).exists())
}

/// The seed of batch `batch` of epoch `epoch`'s input noise.
fn noise_seed(seed: u64, epoch: usize, batch: usize) -> u64 {
    (seed ^ 0x5eed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(((epoch as u64) << 32) ^ batch as u64)
}

/// The trainable head: f32 variables under published names, plus a frozen draft vocabulary.
struct Params {
    cfg: ModelConfig,
    kind: HeadKind,
    vars: Vec<(String, Var)>,
    draft: Option<DraftVocab>,
    device: Device,
}

impl Params {
    fn from_head(head: &EagleHead, device: &Device) -> Result<Self> {
        let mut vars = Vec::new();
        let mut names: Vec<(String, Tensor)> = head
            .tensors()?
            .into_iter()
            .filter(|(k, _)| k != "lm_head.weight" && k != "d2t")
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, t) in names {
            let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
            vars.push((k, Var::from_tensor(&t)?));
        }
        Ok(Params {
            cfg: head.cfg.clone(),
            kind: head.kind.clone(),
            vars,
            draft: head.draft_vocab.clone(),
            device: device.clone(),
        })
    }

    /// The head over the variables' current values, differentiable w.r.t. them.
    fn head(&self, dtype: DType, with_vocab: bool) -> Result<EagleHead> {
        let mut map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        if let (true, Some(dv)) = (with_vocab, &self.draft) {
            dv.insert_tensors(&mut map, &self.device)?;
        }
        Ok(EagleHead::from_tensors(
            map,
            self.cfg.clone(),
            self.kind.clone(),
            dtype,
            &self.device,
        )?)
    }

    fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        Ok(self.head(DType::F32, true)?.save(dir, dtype)?)
    }

    fn grad_norm_clip(
        &self,
        grads: &mut candle_core::backprop::GradStore,
        clip: f64,
    ) -> Result<f64> {
        let mut sq = 0f64;
        for (_, v) in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if clip > 0.0 && norm > clip {
            let s = clip / (norm + 1e-6);
            for (_, v) in &self.vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * s)?);
                }
            }
        }
        Ok(norm)
    }
}

/// Sums of a sequence of batch losses.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Meter {
    v: f64,
    p: f64,
    correct: usize,
    rows: usize,
    /// (correct, rows) by step of the unrolled head.
    #[serde(default)]
    by_step: Vec<(usize, usize)>,
}

impl Meter {
    fn add(&mut self, s: &Scored) {
        let o = &s.step0;
        self.v += o.vloss * o.rows as f64;
        self.p += o.ploss * o.rows as f64;
        self.correct += o.correct;
        self.rows += o.rows;
        if self.by_step.len() < s.by_step.len() {
            self.by_step.resize(s.by_step.len(), (0, 0));
        }
        for (m, (c, r)) in self.by_step.iter_mut().zip(&s.by_step) {
            m.0 += c;
            m.1 += r;
        }
    }
    fn acc_by_step(&self) -> Vec<f64> {
        self.by_step
            .iter()
            .map(|&(c, r)| c as f64 / r.max(1) as f64)
            .collect()
    }
    fn vloss(&self) -> f64 {
        self.v / self.rows.max(1) as f64
    }
    fn ploss(&self) -> f64 {
        self.p / self.rows.max(1) as f64
    }
    fn acc(&self) -> f64 {
        self.correct as f64 / self.rows.max(1) as f64
    }
}

/// The outcome of a training run.
pub struct TrainSummary {
    pub log: Vec<EpochLog>,
    pub out: PathBuf,
    /// False when a step or time limit stopped the run at a checkpoint (resume it later); the
    /// final head is written only when the run finishes.
    pub finished: bool,
    /// Optimizer steps taken in all.
    pub step: usize,
    /// With a reduced vocabulary: the share of assistant tokens it covers.
    pub vocab_coverage: Option<f64>,
}

fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
}

/// Uniform noise in [-half, half) drawn from `seed` (on the CPU from our own Rng; on a GPU
/// from the device's generator, seeded with it).
fn noise(shape: (usize, usize), half: f64, seed: u64, device: &Device) -> Result<Tensor> {
    if half <= 0.0 {
        return Ok(Tensor::zeros(shape, DType::F32, device)?);
    }
    if device.is_cpu() {
        let rng = &mut Rng::new(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * half) as f32)
            .collect();
        return Ok(Tensor::from_vec(v, shape, device)?);
    }
    device.set_seed(seed)?;
    Ok(Tensor::rand(-half as f32, half as f32, shape, device)?)
}

/// One batch's losses: the objective of every step together, step 0's figures, and the top-1
/// counts of every step.
struct Scored {
    objective: Tensor,
    step0: LossOut,
    by_step: Vec<(usize, usize)>,
}

/// Forward pass of one batch: the loss over its loss rows, at every step of the training-time
/// test it carries. `inputs` are step 0's features (the stored ones, or for EAGLE-3 the target
/// layers' outputs, which the head fuses first).
fn batch_loss(
    head: &EagleHead,
    target: &FrozenTarget,
    heads: &LossHeads,
    b: &Batch,
    inputs: &Tensor,
    w_cls: f64,
) -> Result<Option<Scored>> {
    if b.n_loss == 0 && b.later.iter().all(|s| s.n_loss == 0) {
        return Ok(None);
    }
    let embed =
        |tokens: &[u32]| embed_rows(&target.embed, tokens, target.cfg.vocab_size, &target.device);
    let eagle3 = head.eagle3.is_some();
    // Step k's loss over `rows`, weighted 0.8^k.
    let score = |pred: &Tensor, rows: &Tensor, next: &Tensor, k: usize| -> Result<LossOut> {
        let pred = pred.index_select(rows, 0)?;
        let next = next.index_select(rows, 0)?;
        if eagle3 {
            return classification(&head.lm_input_masked(&pred)?, &next, heads, step_weight(k));
        }
        let mut o = eagle_loss(&pred, &next, heads, w_cls)?;
        if k > 0 {
            o.objective = (o.objective * step_weight(k))?;
        }
        Ok(o)
    };
    let features = head.fuse_masked(inputs)?;
    let embeds = embed(&b.tokens)?;
    let mut past = TttKv::default();
    let mut pred = if b.later.is_empty() {
        head.forward_masked(&embeds, &features, &b.positions, &b.mask)?
    } else {
        head.forward_ttt(&embeds, &features, &b.positions, &b.mask, &mut past)?
    };
    let step0 = if b.n_loss > 0 {
        score(&pred, &b.loss_rows, &b.next, 0)?
    } else {
        LossOut {
            objective: Tensor::zeros((), DType::F32, &target.device)?,
            vloss: 0.0,
            ploss: 0.0,
            correct: 0,
            rows: 0,
        }
    };
    let mut objective = step0.objective.clone();
    let mut by_step = vec![(step0.correct, step0.rows)];
    for (k, step) in (1..).zip(&b.later) {
        pred = head.forward_ttt(
            &embed(&step.tokens)?,
            &pred,
            &step.positions,
            &b.mask,
            &mut past,
        )?;
        if step.n_loss == 0 {
            by_step.push((0, 0));
            continue;
        }
        let o = score(&pred, &step.loss_rows, &step.next, k)?;
        objective = (objective + o.objective)?;
        by_step.push((o.correct, o.rows));
    }
    Ok(Some(Scored {
        objective,
        step0,
        by_step,
    }))
}

/// The batch layout of training (`steps` = its training-time test) or evaluation.
fn shape(cfg: &TrainConfig, steps: usize) -> BatchShape {
    BatchShape {
        layer_inputs: cfg.eagle3,
        steps: steps.max(1),
    }
}

fn evaluate(
    params: &Params,
    target: &FrozenTarget,
    heads: &LossHeads,
    data: &Dataset,
    batches: &[Vec<usize>],
    cfg: &TrainConfig,
) -> Result<Meter> {
    let head = params.head(cfg.compute_dtype, false)?;
    let steps = cfg.eval_steps.max(cfg.ttt_steps);
    let mut m = Meter::default();
    for convs in batches {
        let b = build_with(
            data,
            convs,
            cfg.batch_tokens,
            shape(cfg, steps),
            &target.device,
        )?;
        if let Some(o) = batch_loss(&head, target, heads, &b, &b.inputs, cfg.w_cls)? {
            m.add(&o);
        }
    }
    Ok(m)
}

/// Trains a head for `target` on `data`, writing checkpoints, `train_log.jsonl` and the final
/// head (config.json + model.safetensors) to `out`.
pub fn train(
    target: &FrozenTarget,
    data: &Dataset,
    out: &Path,
    cfg: &TrainConfig,
    events: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary> {
    let tc = &target.cfg;
    if data.hidden() != tc.hidden_size || data.manifest.vocab_size != tc.vocab_size {
        return Err(TrainError::data(
            &data.dir,
            format!(
                "features of hidden size {} and vocabulary {} do not fit a target of hidden {} \
                 and vocabulary {}: the data was made with another model ({})",
                data.hidden(),
                data.manifest.vocab_size,
                tc.hidden_size,
                tc.vocab_size,
                data.manifest.model
            ),
        ));
    }
    if cfg.batch_tokens < 2 || cfg.epochs == 0 {
        return Err(TrainError::Config(
            "batch_tokens must be at least 2 and epochs at least 1".into(),
        ));
    }
    if cfg.patience == Some(0) {
        return Err(TrainError::Config(
            "patience must be at least 1 epoch".into(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let device = target.device.clone();
    let resume_from = cfg.resume.then(|| find_checkpoint(out)).flatten();

    let kind = if cfg.eagle3 {
        let layers: [usize; 3] = data
            .manifest
            .feature_layers
            .clone()
            .try_into()
            .map_err(|_| {
                TrainError::data(
                    &data.dir,
                    format!(
                    "an EAGLE-3 head trains on the outputs of three target layers (`eagle data \
                     --feature-layers eagle3`); this data holds layers {:?}",
                    data.manifest.feature_layers
                ),
                )
            })?;
        HeadKind::Eagle3 { layers }
    } else {
        HeadKind::Eagle
    };
    if cfg.eagle3 && cfg.draft_vocab.is_none() && cfg.init.is_none() && !cfg.resume {
        return Err(TrainError::Config(
            "an EAGLE-3 head carries its own LM head: give it a draft vocabulary (--draft-vocab N; \
             the target's vocabulary size for all of it)"
                .into(),
        ));
    }
    if cfg.ttt_steps == 0 {
        return Err(TrainError::Config(
            "ttt_steps must be at least 1 (1: no training-time test)".into(),
        ));
    }
    // The loss logged: EAGLE-3 trains on the classification term alone.
    let w_log = if cfg.eagle3 { 1.0 } else { cfg.w_cls };

    // The starting head and where in the run we are.
    let (head, mut state) = if let Some(ckpt) = &resume_from {
        let state_path = ckpt.join(STATE);
        let s: TrainerState = serde_json::from_slice(
            &std::fs::read(&state_path).map_err(|e| TrainError::io(&state_path, e))?,
        )
        .map_err(|e| TrainError::data(&state_path, e.to_string()))?;
        (EagleHead::load(ckpt, tc, DType::F32, &device)?, s)
    } else if let Some(dir) = &cfg.init {
        let h = EagleHead::load(dir, tc, DType::F32, &device)?;
        (h, TrainerState::default())
    } else {
        let h = EagleHead::init_random_kind(tc, kind.clone(), cfg.seed, DType::F32, &Device::Cpu)?;
        (h, TrainerState::default())
    };
    if head.kind != kind {
        return Err(TrainError::Config(format!(
            "the starting head is {:?}, but this run trains {kind:?}",
            head.kind
        )));
    }
    let mut params = Params::from_head(&head, &device)?;
    let mut vocab_coverage = None;
    match (&params.draft, cfg.draft_vocab) {
        (Some(dv), Some(n)) if dv.d2t.len() != n => {
            return Err(TrainError::Config(format!(
                "the starting head has a draft vocabulary of {}, not {n}",
                dv.d2t.len()
            )))
        }
        (None, Some(n)) => {
            let counts = count_tokens(data, tc.vocab_size);
            let keep = top_tokens(&counts, n);
            vocab_coverage = Some(coverage(&counts, &keep));
            let idx = Tensor::new(keep.as_slice(), &device)?;
            let rows = target.lm_head.weight.dense()?.index_select(&idx, 0)?;
            params.draft = Some(DraftVocab::new(
                Linear::new(rows, None)?,
                keep,
                tc.vocab_size,
            )?);
        }
        _ => {}
    }
    let heads = LossHeads {
        target: target.lm_head.clone(),
        draft: match &params.draft {
            Some(dv) => dv.lm_head.clone(),
            None => target.lm_head.clone(),
        },
        d2t: match &params.draft {
            Some(dv) => Some((Tensor::new(dv.d2t.as_slice(), &device)?, dv.d2t.clone())),
            None => None,
        },
    };

    let mut opt = AdamW::new(
        &params.vars,
        AdamWConfig {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;
    if let (Some(ckpt), Some(t)) = (&resume_from, state.adam_t) {
        opt.load(&ckpt.join(OPTIMIZER), t, &device)?;
    }
    let train_ids = data.split(false);
    let held_ids = data.split(true);
    if train_ids.is_empty() {
        return Err(TrainError::data(&data.dir, "no training conversations"));
    }
    let held_batches = pack(data, &held_ids, cfg.batch_tokens);
    let steps_per_epoch = pack(data, &train_ids, cfg.batch_tokens).len();
    let sched = Schedule {
        base_lr: cfg.lr,
        warmup: cfg.warmup,
        total: steps_per_epoch * cfg.epochs,
        floor: cfg.lr_floor,
    };
    events(TrainEvent::Start {
        total_steps: sched.total,
        steps_per_epoch,
        first_step: state.step,
    });
    let t0 = Instant::now();
    let log_path = out.join(LOG);
    let mut log = Vec::new();
    let write_log = |line: &EpochLog, log: &mut Vec<EpochLog>| -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| TrainError::io(&log_path, e))?;
        writeln!(f, "{}", serde_json::to_string(line).expect("log line"))
            .map_err(|e| TrainError::io(&log_path, e))?;
        log.push(line.clone());
        Ok(())
    };
    if resume_from.is_none() {
        let _ = std::fs::remove_file(&log_path);
        events(TrainEvent::Evaluating);
        let m = evaluate(&params, target, &heads, data, &held_batches, cfg)?;
        let line = EpochLog::new((0, 0, 0.0), None, &m, w_log, t0);
        events(TrainEvent::Epoch(&line));
        write_log(&line, &mut log)?;
    }
    let limit_reached = |step: usize| {
        cfg.stop_at_step.is_some_and(|s| step >= s)
            || cfg.time_limit.is_some_and(|d| t0.elapsed() >= d)
    };
    let mut lr = sched.lr(state.step.saturating_sub(1));
    // False when a step or time limit stops the run at a checkpoint.
    let mut finished = true;
    'epochs: while state.epoch < cfg.epochs {
        let epoch = state.epoch + 1;
        let mut order = train_ids.clone();
        shuffle(
            &mut order,
            &mut Rng::new(cfg.seed.wrapping_add(epoch as u64)),
        );
        let batches = pack(data, &order, cfg.batch_tokens);
        for (k, convs) in batches.iter().enumerate().skip(state.batch) {
            let b = build_with(
                data,
                convs,
                cfg.batch_tokens,
                shape(cfg, cfg.ttt_steps),
                &device,
            )?;
            let seed = noise_seed(cfg.seed, epoch, k);
            let inputs = (&b.inputs + noise(b.inputs.dims2()?, cfg.noise, seed, &device)?)?;
            let head = params.head(cfg.compute_dtype, false)?;
            state.batch = k + 1;
            let Some(o) = batch_loss(&head, target, &heads, &b, &inputs, cfg.w_cls)? else {
                continue;
            };
            let mut grads = o.objective.backward()?;
            params.grad_norm_clip(&mut grads, cfg.grad_clip)?;
            lr = sched.lr(state.step);
            opt.set_learning_rate(lr);
            opt.step(&grads)?;
            state.step += 1;
            state.meter.add(&o);
            events(TrainEvent::Step {
                step: state.step,
                loss: o.step0.total(w_log),
                lr,
            });
            let stop = limit_reached(state.step) && state.batch < batches.len();
            let periodic = cfg
                .checkpoint_every
                .is_some_and(|n| n > 0 && state.step.is_multiple_of(n));
            if stop || periodic {
                write_checkpoint(out, &params, &opt, &mut state)?;
                events(TrainEvent::Checkpoint { step: state.step });
            }
            if stop {
                finished = false;
                break 'epochs;
            }
        }
        events(TrainEvent::Evaluating);
        let m = evaluate(&params, target, &heads, data, &held_batches, cfg)?;
        let line = EpochLog::new((epoch, state.step, lr), Some(&state.meter), &m, w_log, t0);
        events(TrainEvent::Epoch(&line));
        write_log(&line, &mut log)?;
        let best = match state.best {
            Some((loss, since)) if line.heldout_loss >= loss => Some((loss, since + 1)),
            _ => {
                if cfg.patience.is_some() {
                    params.save(out, cfg.save_dtype)?;
                }
                Some((line.heldout_loss, 0))
            }
        };
        state = TrainerState {
            epoch,
            step: state.step,
            batch: 0,
            meter: Meter::default(),
            adam_t: state.adam_t,
            best,
        };
        write_checkpoint(out, &params, &opt, &mut state)?;
        let patience_out =
            matches!((cfg.patience, best), (Some(p), Some((_, since))) if since >= p);
        if patience_out {
            events(TrainEvent::EarlyStop { epoch });
            break;
        }
        if limit_reached(state.step) && state.epoch < cfg.epochs {
            finished = false;
            break;
        }
    }
    // With patience, the best head is already in `out`; a stopped run writes none yet.
    if finished && cfg.patience.is_none() {
        params.save(out, cfg.save_dtype)?;
    }
    Ok(TrainSummary {
        log,
        out: out.to_path_buf(),
        finished,
        step: state.step,
        vocab_coverage,
    })
}
