//! Training an EAGLE head (Li et al., 2024) on stored features, with candle autograd.
//!
//! Invariants:
//! - The head that trains is the engine's head: each step builds an [`EagleHead`] from the
//!   trainable variables (f32 master weights, cast to the compute dtype by candle ops) and runs
//!   its differentiable cache-free forward ([`EagleHead::forward_masked`]), the same decoder
//!   layer that serves. The engine's CPU kernels, which record no graph, are never used here.
//! - The target's embedding and LM head are frozen; with a reduced draft vocabulary the head's
//!   own LM head (rows of the target's) is frozen too (see `vocab.rs`).
//! - The final head is written with [`EagleHead::save`], in the published format, so
//!   `EagleHead::load` reads it back; a checkpoint (f32 weights + step count) is written after
//!   every epoch and `resume` continues from it on the same schedule (the AdamW moments restart
//!   from zero).
//!
//! Recipe (EAGLE paper): input features get uniform noise U(-0.1, 0.1); loss = SmoothL1 + 0.1 x
//! soft cross-entropy on assistant positions; AdamW (betas 0.9, 0.95), linear warm-up then decay,
//! gradient clipping by global norm.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use eagle_engine::config::ModelConfig;
use eagle_engine::head::{DraftVocab, EagleHead};
use eagle_engine::layers::{Linear, Matrix};
use eagle_engine::loader::{open_model, Weights};
use eagle_engine::models::target::embed_rows;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::Rng;
use serde::{Deserialize, Serialize};

use crate::batch::{build, pack, Batch};
use crate::error::{Result, TrainError};
use crate::loss::{eagle_loss, LossHeads, LossOut};
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
    /// Start from this head instead of a random one.
    pub init: Option<PathBuf>,
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
            init: None,
        }
    }
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
}

#[derive(Serialize, Deserialize)]
struct TrainerState {
    epoch: usize,
    step: usize,
}

pub const CHECKPOINT: &str = "checkpoint";
pub const LOG: &str = "train_log.jsonl";
const STATE: &str = "trainer_state.json";

/// The trainable head: f32 variables under published names, plus a frozen draft vocabulary.
struct Params {
    cfg: ModelConfig,
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
#[derive(Default)]
struct Meter {
    v: f64,
    p: f64,
    correct: usize,
    rows: usize,
}

impl Meter {
    fn add(&mut self, o: &LossOut) {
        self.v += o.vloss * o.rows as f64;
        self.p += o.ploss * o.rows as f64;
        self.correct += o.correct;
        self.rows += o.rows;
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
    /// With a reduced vocabulary: the share of assistant tokens it covers.
    pub vocab_coverage: Option<f64>,
}

fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
}

fn noise(shape: (usize, usize), half: f64, rng: &mut Rng, device: &Device) -> Result<Tensor> {
    if half <= 0.0 {
        return Ok(Tensor::zeros(shape, DType::F32, device)?);
    }
    if device.is_cpu() {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * half) as f32)
            .collect();
        return Ok(Tensor::from_vec(v, shape, device)?);
    }
    Ok(Tensor::rand(-half as f32, half as f32, shape, device)?)
}

/// Forward pass of one batch: the loss over its loss rows.
fn batch_loss(
    head: &EagleHead,
    target: &FrozenTarget,
    heads: &LossHeads,
    b: &Batch,
    inputs: &Tensor,
    w_cls: f64,
) -> Result<Option<LossOut>> {
    if b.n_loss == 0 {
        return Ok(None);
    }
    let embeds = embed_rows(
        &target.embed,
        &b.tokens,
        target.cfg.vocab_size,
        &target.device,
    )?;
    let pred = head.forward_masked(&embeds, inputs, &b.positions, &b.mask)?;
    let pred = pred.index_select(&b.loss_rows, 0)?;
    let next = b.next.index_select(&b.loss_rows, 0)?;
    Ok(Some(eagle_loss(&pred, &next, heads, w_cls)?))
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
    let mut m = Meter::default();
    for convs in batches {
        let b = build(data, convs, cfg.batch_tokens, &target.device)?;
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
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let device = target.device.clone();
    if !device.is_cpu() {
        // The input noise is drawn on the device there (on the CPU, from our own seeded Rng).
        device.set_seed(cfg.seed)?;
    }
    let ckpt = out.join(CHECKPOINT);
    let state_path = ckpt.join(STATE);

    // The starting head and where in the run we are.
    let (head, mut epoch0, mut step) = if cfg.resume && state_path.exists() {
        let s: TrainerState = serde_json::from_slice(
            &std::fs::read(&state_path).map_err(|e| TrainError::io(&state_path, e))?,
        )
        .map_err(|e| TrainError::data(&state_path, e.to_string()))?;
        let h = EagleHead::load(&ckpt, tc, DType::F32, &device)?;
        (h, s.epoch, s.step)
    } else if let Some(dir) = &cfg.init {
        (EagleHead::load(dir, tc, DType::F32, &device)?, 0, 0)
    } else {
        let h = EagleHead::init_random(tc, cfg.seed, DType::F32, &Device::Cpu)?;
        (h, 0, 0)
    };
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
        params.vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        },
    )?;
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
        first_step: step,
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
    if epoch0 == 0 && step == 0 {
        if !cfg.resume {
            let _ = std::fs::remove_file(&log_path);
        }
        events(TrainEvent::Evaluating);
        let m = evaluate(&params, target, &heads, data, &held_batches, cfg)?;
        let line = EpochLog::new((0, 0, 0.0), None, &m, cfg.w_cls, t0);
        events(TrainEvent::Epoch(&line));
        write_log(&line, &mut log)?;
    }
    let mut rng = Rng::new(cfg.seed ^ 0x5eed);
    while epoch0 < cfg.epochs {
        let epoch = epoch0 + 1;
        let mut order = train_ids.clone();
        shuffle(
            &mut order,
            &mut Rng::new(cfg.seed.wrapping_add(epoch as u64)),
        );
        let batches = pack(data, &order, cfg.batch_tokens);
        let mut meter = Meter::default();
        let mut lr = cfg.lr;
        for convs in &batches {
            let b = build(data, convs, cfg.batch_tokens, &device)?;
            let inputs =
                (&b.inputs + noise((b.len(), data.hidden()), cfg.noise, &mut rng, &device)?)?;
            let head = params.head(cfg.compute_dtype, false)?;
            let Some(o) = batch_loss(&head, target, &heads, &b, &inputs, cfg.w_cls)? else {
                continue;
            };
            let mut grads = o.objective.backward()?;
            params.grad_norm_clip(&mut grads, cfg.grad_clip)?;
            lr = sched.lr(step);
            opt.set_learning_rate(lr);
            opt.step(&grads)?;
            step += 1;
            meter.add(&o);
            events(TrainEvent::Step {
                step,
                loss: o.total(cfg.w_cls),
                lr,
            });
        }
        events(TrainEvent::Evaluating);
        let m = evaluate(&params, target, &heads, data, &held_batches, cfg)?;
        let line = EpochLog::new((epoch, step, lr), Some(&meter), &m, cfg.w_cls, t0);
        events(TrainEvent::Epoch(&line));
        write_log(&line, &mut log)?;
        params.save(&ckpt, DType::F32)?;
        let state = TrainerState { epoch, step };
        std::fs::write(&state_path, serde_json::to_string(&state).expect("state"))
            .map_err(|e| TrainError::io(&state_path, e))?;
        epoch0 = epoch;
    }
    params.save(out, cfg.save_dtype)?;
    Ok(TrainSummary {
        log,
        out: out.to_path_buf(),
        vocab_coverage,
    })
}
