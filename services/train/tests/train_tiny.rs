//! Training works: on a tiny random target, a few hundred steps of EAGLE training on data the
//! target itself generated lower the held-out loss clearly and make greedy EAGLE generation
//! accept more tokens per target pass than the untrained head, while the output stays
//! identical to vanilla decoding.

mod common;

use candle_core::{DType, Device};
use eagle_engine::head::EagleHead;
use eagle_engine::Engine;
use eagle_train::data::{generate, DataConfig, Prepared};
use eagle_train::shards::Dataset;
use eagle_train::trainer::{train, FrozenTarget, TrainConfig};

use common::{sampled_sequences, scratch, tiny_target, tiny_tokenizer, tokens_per_pass};

const PROMPT_LEN: usize = 4;
const SEQ_LEN: usize = 64;

/// Mean tokens per target pass of greedy EAGLE with `head` over a few prompts, checking each
/// output against vanilla decoding.
fn mean_accepted(head: EagleHead) -> f64 {
    let tok = tiny_tokenizer(&scratch("tok"));
    let engine = Engine::from_parts(tiny_target(), Some(head), tok);
    tokens_per_pass(&engine, 8, PROMPT_LEN, 48)
}

#[test]
fn training_lowers_loss_and_raises_acceptance() {
    let dir = scratch("tiny");
    let data_dir = dir.join("data");
    let target = tiny_target();
    let samples = sampled_sequences(&target, 320, 5, PROMPT_LEN, SEQ_LEN);
    let cfg = DataConfig {
        model: "tiny".into(),
        input: "sampled".into(),
        max_len: 256,
        held_out_frac: 0.1,
        dtype: DType::F16,
        max_tokens: None,
        shard_tokens: 8192,
        regen: None,
    };
    let man = generate(
        &target,
        samples.into_iter().map(Ok),
        Prepared::Sample,
        &data_dir,
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    assert!(man.complete);
    assert_eq!(man.conversations, 320);
    assert!(man.shards.len() > 1, "several shards: {:?}", man.shards);
    assert!(man.held_out_conversations > 10);

    let data = Dataset::open(&data_dir).unwrap();
    let frozen = FrozenTarget::from_target(&target);
    let head_dir = dir.join("head");
    let tcfg = TrainConfig {
        epochs: 8,
        lr: 2e-3,
        batch_tokens: 512,
        warmup: 20,
        seed: 3,
        save_dtype: DType::F32,
        ..TrainConfig::default()
    };
    let summary = train(&frozen, &data, &head_dir, &tcfg, &mut |_| {}).unwrap();
    for l in &summary.log {
        eprintln!("{}", serde_json::to_string(l).unwrap());
    }
    let first = &summary.log[0];
    let last = summary.log.last().unwrap();
    assert!(last.step >= 250, "only {} steps", last.step);
    assert!(
        last.heldout_loss < 0.7 * first.heldout_loss,
        "held-out loss {} -> {}",
        first.heldout_loss,
        last.heldout_loss
    );
    assert!(
        last.heldout_acc > first.heldout_acc + 0.1,
        "held-out top-1 {} -> {}",
        first.heldout_acc,
        last.heldout_acc
    );
    let log_lines = std::fs::read_to_string(head_dir.join("train_log.jsonl")).unwrap();
    assert_eq!(log_lines.lines().count(), 9);

    let cfg = tiny_target().cfg.clone();
    let untrained = EagleHead::init_random(&cfg, tcfg.seed, DType::F32, &Device::Cpu).unwrap();
    let trained = EagleHead::load(&head_dir, &cfg, DType::F32, &Device::Cpu).unwrap();
    let before = mean_accepted(untrained);
    let after = mean_accepted(trained);
    eprintln!("mean accepted: untrained {before:.3}, trained {after:.3}");
    assert!(
        after > before + 0.3,
        "mean accepted length {before:.3} (untrained) vs {after:.3} (trained)"
    );
}
