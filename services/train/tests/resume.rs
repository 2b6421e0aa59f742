//! Both long-running stages resume: data generation stopped by a token budget and continued
//! stores exactly what one uninterrupted run stores, and training continues from its
//! checkpoint at the next epoch and step.

mod common;

use candle_core::DType;
use eagle_engine::sampling::Rng;
use eagle_train::data::{generate, DataConfig, Prepared, Sample};
use eagle_train::shards::Dataset;
use eagle_train::trainer::{train, FrozenTarget, TrainConfig, TrainEvent};

use common::{scratch, tiny_target, TINY_VOCAB};

fn samples() -> Vec<Sample> {
    let mut rng = Rng::new(8);
    (0..60)
        .map(|k| {
            let len = 8 + (rng.uniform() * 40.0) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| (rng.uniform() * TINY_VOCAB as f64) as u32)
                .collect();
            let mut mask = vec![0u8; 3];
            mask.resize(len, 1);
            Sample {
                id: format!("s{k}"),
                ids,
                mask,
            }
        })
        .collect()
}

fn config(max_tokens: Option<usize>) -> DataConfig {
    DataConfig {
        model: "tiny".into(),
        input: "synthetic".into(),
        max_len: 32,
        held_out_frac: 0.2,
        dtype: DType::BF16,
        max_tokens,
        shard_tokens: 300,
        regen: None,
    }
}

/// The samples stored as data of the tiny target under `tag`, and the target's frozen parts.
fn training_data(tag: &str) -> (Dataset, FrozenTarget) {
    let target = tiny_target();
    let data_dir = scratch(tag);
    let records = samples().into_iter().map(Ok);
    generate(
        &target,
        records,
        Prepared::Sample,
        &data_dir,
        &config(None),
        &mut |_| {},
    )
    .unwrap();
    let frozen = FrozenTarget::from_target(&target);
    (Dataset::open(&data_dir).unwrap(), frozen)
}

/// One stored conversation: ids, mask, feature bytes, held out.
type Stored = (Vec<u32>, Vec<u8>, Vec<u8>, bool);

/// Every conversation of a data directory.
fn contents(dir: &std::path::Path) -> Vec<Stored> {
    let d = Dataset::open(dir).unwrap();
    d.convs
        .iter()
        .map(|c| {
            let (ids, mask) = d.ids_mask(c);
            (ids, mask, d.feature_bytes(c).to_vec(), c.held_out)
        })
        .collect()
}

#[test]
fn data_generation_resumes_where_it_stopped() {
    let target = tiny_target();
    let records = || samples().into_iter().map(Ok);
    let once = scratch("once");
    let m1 = generate(
        &target,
        records(),
        Prepared::Sample,
        &once,
        &config(None),
        &mut |_| {},
    )
    .unwrap();
    assert!(m1.complete);
    assert_eq!(m1.conversations, 60);
    assert!(m1.held_out_conversations > 3 && m1.held_out_conversations < 25);

    let twice = scratch("twice");
    let part = generate(
        &target,
        records(),
        Prepared::Sample,
        &twice,
        &config(Some(700)),
        &mut |_| {},
    )
    .unwrap();
    assert!(!part.complete);
    assert!(part.tokens >= 700 && part.tokens < m1.tokens);
    // The same budget again: nothing to do.
    let same = generate(
        &target,
        records(),
        Prepared::Sample,
        &twice,
        &config(Some(700)),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(same, part);
    // No budget: continue to the end.
    let rest = generate(
        &target,
        records(),
        Prepared::Sample,
        &twice,
        &config(None),
        &mut |_| {},
    )
    .unwrap();
    assert!(rest.complete);
    assert_eq!(rest.conversations, m1.conversations);
    assert_eq!(rest.tokens, m1.tokens);
    assert_eq!(contents(&once), contents(&twice));

    // Other settings are refused rather than mixed in.
    let mut other = config(None);
    other.max_len = 16;
    let err = generate(
        &target,
        records(),
        Prepared::Sample,
        &twice,
        &other,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
}

#[test]
fn training_resumes_from_its_checkpoint() {
    let (data, frozen) = training_data("resume-data");
    let out = scratch("resume-head");
    let mut cfg = TrainConfig {
        epochs: 2,
        lr: 1e-3,
        batch_tokens: 128,
        warmup: 2,
        draft_vocab: Some(64),
        ..TrainConfig::default()
    };
    let first = train(&frozen, &data, &out, &cfg, &mut |_| {}).unwrap();
    assert_eq!(first.log.len(), 3);
    let steps = first.log[2].step;
    cfg.epochs = 3;
    cfg.resume = true;
    let second = train(&frozen, &data, &out, &cfg, &mut |_| {}).unwrap();
    assert_eq!(second.log.len(), 1, "only the new epoch runs");
    assert_eq!(second.log[0].epoch, 3);
    assert_eq!(second.log[0].step, steps + steps / 2);
    let lines = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    // The head keeps its draft vocabulary through the checkpoint.
    let head =
        eagle_engine::head::EagleHead::load(&out, &frozen.cfg, DType::F32, &frozen.device).unwrap();
    assert_eq!(head.draft_vocab.unwrap().d2t.len(), 64);
}

/// A run stopped in the middle of an epoch and at an epoch's end, and resumed each time,
/// ends with the same head, bit for bit, and the same log as one uninterrupted run: the
/// checkpoint holds the AdamW moments, the batch reached and the epoch's running sums.
#[test]
fn a_resumed_run_equals_an_uninterrupted_one_bit_for_bit() {
    let (data, frozen) = training_data("exact-data");
    let cfg = TrainConfig {
        epochs: 2,
        lr: 3e-3,
        batch_tokens: 128,
        warmup: 2,
        save_dtype: DType::F32,
        ..TrainConfig::default()
    };
    let straight = scratch("exact-straight");
    let whole = train(&frozen, &data, &straight, &cfg, &mut |_| {}).unwrap();
    assert!(whole.finished);
    let per_epoch = whole.log[1].step;
    assert!(per_epoch >= 4, "{per_epoch} steps per epoch");

    let split = scratch("exact-split");
    let mut checkpoints = 0;
    let mut part = cfg.clone();
    // Stop in the middle of epoch 1, with periodic checkpoints on the way.
    part.stop_at_step = Some(per_epoch / 2 + 1);
    part.checkpoint_every = Some(2);
    let s1 = train(&frozen, &data, &split, &part, &mut |e| {
        if let TrainEvent::Checkpoint { .. } = e {
            checkpoints += 1
        }
    })
    .unwrap();
    assert!(!s1.finished);
    assert_eq!(s1.step, per_epoch / 2 + 1);
    assert!(checkpoints >= 2, "{checkpoints} checkpoints");
    assert!(
        !split.join("model.safetensors").exists(),
        "no final head yet"
    );
    // Resume to the end of epoch 1 (a stop exactly there), then to the end.
    part.resume = true;
    part.checkpoint_every = None;
    part.stop_at_step = Some(per_epoch);
    let s2 = train(&frozen, &data, &split, &part, &mut |_| {}).unwrap();
    assert!(!s2.finished);
    assert_eq!(s2.step, per_epoch);
    assert_eq!(s2.log.len(), 1, "epoch 1's line");
    part.stop_at_step = None;
    let s3 = train(&frozen, &data, &split, &part, &mut |_| {}).unwrap();
    assert!(s3.finished);
    assert_eq!(s3.step, whole.step);

    let bytes = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        bytes(&straight) == bytes(&split),
        "the resumed head differs from the uninterrupted one"
    );
    let lines = |d: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("elapsed_s");
                v
            })
            .collect()
    };
    assert_eq!(lines(&straight), lines(&split));
}

/// With patience, a run whose held-out loss stops improving ends early, and the head written
/// is the best one (here the weights cannot move: a learning rate of zero).
#[test]
fn patience_ends_a_run_that_stopped_improving() {
    let (data, frozen) = training_data("patience-data");
    let out = scratch("patience-head");
    let cfg = TrainConfig {
        epochs: 6,
        lr: 0.0,
        batch_tokens: 128,
        warmup: 0,
        patience: Some(1),
        ..TrainConfig::default()
    };
    let mut stopped = None;
    let s = train(&frozen, &data, &out, &cfg, &mut |e| {
        if let TrainEvent::EarlyStop { epoch } = e {
            stopped = Some(epoch)
        }
    })
    .unwrap();
    assert!(s.finished);
    assert_eq!(stopped, Some(2), "epoch 2 did not beat epoch 1");
    assert_eq!(s.log.last().unwrap().epoch, 2);
    assert!(
        out.join("model.safetensors").exists(),
        "the best head is written"
    );
    let zero = TrainConfig {
        patience: Some(0),
        ..cfg
    };
    assert!(train(&frozen, &data, &scratch("patience-0"), &zero, &mut |_| {}).is_err());
}
