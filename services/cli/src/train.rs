//! `eagle train`: train an EAGLE head on data from `eagle data`, and write it in the published
//! format (config.json + model.safetensors) for `--head`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use eagle_train::shards::{parse_feature_dtype, Dataset};
use eagle_train::trainer::{train, FrozenTarget, TrainConfig, TrainEvent};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models;
use crate::runtime::{parse_device, parse_dtype, resolve_or_fetch};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Target model the data was made with (its embedding and LM head are used, frozen).
    #[arg(long, env = "EAGLE_MODEL", default_value = models::DEFAULT_MODEL)]
    pub model: String,
    /// Data directory written by `eagle data`.
    #[arg(long, env = "EAGLE_TRAIN_DATA")]
    pub data: PathBuf,
    /// Output head directory: the final head, `checkpoint/` and `train_log.jsonl`.
    #[arg(long, env = "EAGLE_TRAIN_OUT")]
    pub out: PathBuf,
    #[arg(long, env = "EAGLE_TRAIN_EPOCHS", default_value_t = 4)]
    pub epochs: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, env = "EAGLE_TRAIN_LR", default_value_t = 3e-4)]
    pub lr: f64,
    /// Token pairs per optimizer step (conversations are packed up to this).
    #[arg(long, env = "EAGLE_TRAIN_BATCH_TOKENS", default_value_t = 2048)]
    pub batch_tokens: usize,
    /// Linear warm-up steps, then cosine decay.
    #[arg(long, env = "EAGLE_TRAIN_WARMUP", default_value_t = 100)]
    pub warmup: usize,
    /// Gradient clipping by global norm (0: off).
    #[arg(long, env = "EAGLE_TRAIN_GRAD_CLIP", default_value_t = 0.5)]
    pub grad_clip: f64,
    /// Reduced draft vocabulary (EAGLE-3): the N most frequent assistant tokens.
    #[arg(long, env = "EAGLE_DRAFT_VOCAB")]
    pub draft_vocab: Option<usize>,
    /// Continue from OUT/checkpoint exactly where it stopped (weights, AdamW moments, epoch,
    /// step and batch; the same data, seed and settings give the same steps).
    #[arg(long)]
    pub resume: bool,
    /// Also write OUT/checkpoint every N optimizer steps (it is always written after each
    /// epoch): a run killed in the middle of a long epoch loses at most N steps.
    #[arg(long, env = "EAGLE_TRAIN_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<usize>,
    /// Checkpoint and stop after this many minutes (continue later with --resume): long runs
    /// split over machine sessions.
    #[arg(long, env = "EAGLE_TRAIN_MAX_MINUTES")]
    pub max_minutes: Option<f64>,
    /// Checkpoint and stop on reaching this optimizer step (continue later with --resume).
    #[arg(long, env = "EAGLE_TRAIN_STOP_AT_STEP")]
    pub stop_at_step: Option<usize>,
    /// Keep the head with the lowest held-out loss in OUT (written after each epoch that
    /// improves it, usable while training goes on) and stop after N epochs without a better
    /// one: with a large --epochs, training runs for as long as it keeps improving.
    #[arg(long, env = "EAGLE_TRAIN_PATIENCE")]
    pub patience: Option<usize>,
    /// Start from this head directory instead of a random initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Device: cpu, or cuda / cuda:N (needs a build with `--features cuda`).
    #[arg(long, env = "EAGLE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// dtype of the frozen target embedding / LM head: f32, bf16 or f16.
    #[arg(long, env = "EAGLE_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// dtype of the head's matrix products: f32, or bf16 on CUDA (master weights stay f32).
    #[arg(long, env = "EAGLE_TRAIN_COMPUTE_DTYPE", default_value = "f32")]
    pub compute_dtype: String,
    /// dtype of the saved head: f16, bf16 or f32.
    #[arg(long, env = "EAGLE_TRAIN_SAVE_DTYPE", default_value = "f16")]
    pub save_dtype: String,
    /// Seed for initialisation, shuffling and noise.
    #[arg(long, env = "EAGLE_TRAIN_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Train an EAGLE-3 head: fc over three target layers, its own norm, cross-entropy only.
    /// The data must hold those layers (`eagle data --feature-layers eagle3`); a reduced
    /// --draft-vocab is usual (the published heads have 32k).
    #[arg(long, env = "EAGLE_TRAIN_EAGLE3")]
    pub eagle3: bool,
    /// Steps of the training-time test: each row's head is unrolled on its own outputs this
    /// many steps, step k's loss weighted 0.8^k (EAGLE-3 uses 7; 1 is no test). Each step
    /// costs about one more forward and backward pass.
    #[arg(long, env = "EAGLE_TRAIN_TTT_STEPS", default_value_t = 1)]
    pub ttt_steps: usize,
    /// Steps the held-out evaluation unrolls: the log's top-1 by step (at T = 0 on greedy
    /// answers, the acceptance of a chain's k-th draft token).
    #[arg(long, env = "EAGLE_TRAIN_EVAL_STEPS", default_value_t = 5)]
    pub eval_steps: usize,
    /// Half-width of the uniform noise on step 0's input features (EAGLE: 0.1; default 0.1,
    /// or 0 with --eagle3, as the EAGLE-3 reference adds none).
    #[arg(long, env = "EAGLE_TRAIN_NOISE")]
    pub noise: Option<f64>,
}

/// A line above the bar, or on stderr when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let data = Dataset::open(&a.data)?;
    let path = resolve_or_fetch(&a.model)?;
    let target = FrozenTarget::load(&path, parse_dtype(&a.dtype)?, &device)
        .with_context(|| format!("loading {}", path.display()))?;
    let cfg = TrainConfig {
        epochs: a.epochs,
        lr: a.lr,
        batch_tokens: a.batch_tokens,
        warmup: a.warmup,
        grad_clip: a.grad_clip,
        seed: a.seed,
        draft_vocab: a.draft_vocab,
        compute_dtype: parse_dtype(&a.compute_dtype)?,
        save_dtype: parse_feature_dtype(&a.save_dtype)?,
        resume: a.resume,
        checkpoint_every: a.checkpoint_every,
        stop_at_step: a.stop_at_step,
        patience: a.patience,
        time_limit: a
            .max_minutes
            .map(|m| std::time::Duration::from_secs_f64(m.max(0.0) * 60.0)),
        init: a.init.clone(),
        eagle3: a.eagle3,
        ttt_steps: a.ttt_steps,
        eval_steps: a.eval_steps,
        noise: a.noise.unwrap_or(if a.eagle3 {
            0.0
        } else {
            TrainConfig::default().noise
        }),
        ..TrainConfig::default()
    };
    eprintln!(
        "training on {}: {} conversations ({} held out), {} tokens",
        a.data.display(),
        data.manifest.conversations,
        data.manifest.held_out_conversations,
        data.manifest.tokens
    );
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "train [{bar:30}] {pos}/{len} steps {per_sec} eta {eta} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    let summary = train(&target, &data, &a.out, &cfg, &mut |e| {
        match e {
        TrainEvent::Start {
            total_steps,
            first_step,
            ..
        } => {
            bar.set_length(total_steps as u64);
            bar.set_position(first_step as u64);
        }
        TrainEvent::Step { step, loss, lr } => {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        }
        TrainEvent::Evaluating => bar.set_message("evaluating held-out".to_string()),
        TrainEvent::Checkpoint { step } => {
            bar.set_message(format!("checkpoint written at step {step}"))
        }
        TrainEvent::EarlyStop { epoch } => say(&bar, format!(
            "epoch {epoch}: no better held-out loss for {} epochs; stopping (the best head is in {})",
            a.patience.unwrap_or(0),
            a.out.display()
        )),
        TrainEvent::Epoch(l) => say(&bar, format!(
            "epoch {}: train loss {} | held-out loss {:.4} (smooth-l1 {:.4}, ce {:.4}) top-1 {:.3} on {} positions; by step {}",
            l.epoch,
            l.train_loss.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            l.heldout_loss,
            l.heldout_vloss,
            l.heldout_ploss,
            l.heldout_acc,
            l.heldout_positions,
            l.heldout_acc_by_step
                .iter()
                .map(|a| format!("{a:.3}"))
                .collect::<Vec<_>>()
                .join(" / ")
        )),
    }
    })?;
    bar.finish_and_clear();
    if let Some(c) = summary.vocab_coverage {
        eprintln!(
            "draft vocabulary covers {:.2}% of the training assistant tokens",
            c * 100.0
        );
    }
    if !summary.finished {
        eprintln!(
            "stopped at step {} with a checkpoint in {}; continue with the same command and \
             --resume",
            summary.step,
            summary.out.join(eagle_train::trainer::CHECKPOINT).display()
        );
        return Ok(());
    }
    eprintln!(
        "head written to {} (use it with --head {})",
        summary.out.display(),
        summary.out.display()
    );
    if let Some(last) = summary.log.last() {
        println!("{}", serde_json::to_string(last)?);
    }
    Ok(())
}
