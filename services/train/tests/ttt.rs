//! EAGLE-3 training with a training-time test (Li et al., 2025): on a tiny random target of 4
//! layers, data holding three layers' outputs trains an EAGLE-3 head, and unrolling the head on
//! its own outputs during training (4 steps) makes its held-out top-1 at steps 1..3 clearly
//! higher than that of the same head trained one step at a time, evaluated the same way, and
//! gives more tokens per target pass when drafting (both losslessly). The later steps' rows of
//! a batch are checked one by one.

mod common;

use candle_core::{DType, Device};
use eagle_engine::head::{EagleHead, HeadKind};
use eagle_engine::Engine;
use eagle_train::batch::{build_with, BatchShape};
use eagle_train::data::{generate, DataConfig, Prepared};
use eagle_train::shards::Dataset;
use eagle_train::trainer::{train, EpochLog, FrozenTarget, TrainConfig};

use common::{sampled_sequences, scratch, tiny_target_layers, tiny_tokenizer, tokens_per_pass};

const LAYERS: usize = 4;
const FEATURE_LAYERS: [usize; 3] = [1, 2, 3];
const PROMPT_LEN: usize = 4;
const SEQ_LEN: usize = 48;
const STEPS: usize = 4;

fn target() -> eagle_engine::models::TargetModel {
    let mut t = tiny_target_layers(LAYERS);
    t.set_draft_layers(&FEATURE_LAYERS).unwrap();
    t
}

fn train_head(data: &Dataset, out: &std::path::Path, ttt_steps: usize) -> Vec<EpochLog> {
    let tcfg = TrainConfig {
        epochs: 10,
        lr: 6e-3,
        batch_tokens: 512,
        warmup: 20,
        seed: 3,
        noise: 0.0,
        save_dtype: DType::F32,
        eagle3: true,
        ttt_steps,
        eval_steps: STEPS,
        draft_vocab: Some(128),
        ..TrainConfig::default()
    };
    let frozen = FrozenTarget::from_target(&target());
    let summary = train(&frozen, data, out, &tcfg, &mut |_| {}).unwrap();
    for l in &summary.log {
        eprintln!("ttt {ttt_steps}: {}", serde_json::to_string(l).unwrap());
    }
    summary.log
}

#[test]
fn unrolled_training_beats_single_step_training_at_later_steps() {
    let dir = scratch("ttt");
    let data_dir = dir.join("data");
    let cfg = DataConfig {
        model: "tiny4".into(),
        input: "sampled".into(),
        max_len: 256,
        held_out_frac: 0.15,
        dtype: DType::F16,
        max_tokens: None,
        shard_tokens: 8192,
        regen: None,
    };
    let man = generate(
        &target(),
        sampled_sequences(&target(), 400, 8, PROMPT_LEN, SEQ_LEN)
            .into_iter()
            .map(Ok),
        Prepared::Sample,
        &data_dir,
        &cfg,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(man.feature_layers, FEATURE_LAYERS.to_vec());
    let data = Dataset::open(&data_dir).unwrap();
    assert_eq!(data.layer_width(), 3 * data.hidden());
    later_steps_read_and_score_the_right_rows(&data);

    let single = train_head(&data, &dir.join("single"), 1);
    let unrolled = train_head(&data, &dir.join("unrolled"), STEPS);
    let (s, u) = (single.last().unwrap(), unrolled.last().unwrap());
    assert_eq!(s.heldout_acc_by_step.len(), STEPS);
    assert_eq!(u.heldout_acc_by_step.len(), STEPS);
    // Both learned the first step.
    for log in [&single, &unrolled] {
        let (first, last) = (&log[0], log.last().unwrap());
        assert!(
            last.heldout_acc > first.heldout_acc + 0.05,
            "step-0 top-1 {} -> {}",
            first.heldout_acc,
            last.heldout_acc
        );
    }
    // Unrolled training is much better once the head reads its own outputs.
    let later = |l: &EpochLog| l.heldout_acc_by_step[1..].iter().sum::<f64>() / (STEPS - 1) as f64;
    eprintln!(
        "top-1 by step: single-step {:?}, unrolled {:?}",
        s.heldout_acc_by_step, u.heldout_acc_by_step
    );
    assert!(
        later(u) > later(s) + 0.02 && later(u) > 1.3 * later(s),
        "steps 1..{}: unrolled {:.3} vs single-step {:.3}",
        STEPS - 1,
        later(u),
        later(s)
    );
    assert!(u.heldout_acc_by_step[STEPS - 1] > s.heldout_acc_by_step[STEPS - 1]);

    // Both heads draft with EAGLE output equal to vanilla; the unrolled one gets more tokens
    // per target pass.
    let tau = |name: &str| mean_accepted(&dir.join(name), &dir.join("tok"));
    let (tau_single, tau_unrolled) = (tau("single"), tau("unrolled"));
    eprintln!("tokens per target pass: single-step {tau_single:.3}, unrolled {tau_unrolled:.3}");
    assert!(
        tau_unrolled > tau_single,
        "tokens per pass: unrolled {tau_unrolled:.3} vs single-step {tau_single:.3}"
    );
}

/// Mean tokens per target pass of greedy EAGLE with the head in `head_dir`, checking every
/// output against vanilla decoding.
fn mean_accepted(head_dir: &std::path::Path, tok_dir: &std::path::Path) -> f64 {
    let head = EagleHead::load(head_dir, &target().cfg, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        head.kind,
        HeadKind::Eagle3 {
            layers: FEATURE_LAYERS
        }
    );
    let engine = Engine::from_parts(target(), Some(head), tiny_tokenizer(tok_dir));
    tokens_per_pass(&engine, 12, PROMPT_LEN, 40)
}

/// A batch's later steps: at step k row (conversation c, pair j) reads t_{j+1+k} at position
/// j+k, is scored against f_{j+1+k} (step 0's target of pair j+k) when that token is an
/// assistant token inside the conversation, and reads token 0 without a loss past its end.
fn later_steps_read_and_score_the_right_rows(data: &Dataset) {
    let convs = [0usize, 1];
    let shape = BatchShape {
        layer_inputs: true,
        steps: 3,
    };
    let b = build_with(data, &convs, 4096, shape, &Device::Cpu).unwrap();
    assert_eq!(b.later.len(), 2);
    assert_eq!(b.inputs.dims(), [b.len(), 3 * data.hidden()]);
    let next0 = b.next.to_vec2::<f32>().unwrap();
    let mut row = 0;
    for &c in &convs {
        let (ids, mask) = data.ids_mask(&data.convs[c]);
        let pairs = ids.len() - 1;
        for j in 0..pairs {
            for (k, step) in (1..).zip(&b.later) {
                let at = j + 1 + k;
                let inside = at < ids.len();
                assert_eq!(step.tokens[row + j], if inside { ids[at] } else { 0 });
                assert_eq!(step.positions[row + j], j + k);
                let scored = step
                    .loss_rows
                    .to_vec1::<u32>()
                    .unwrap()
                    .contains(&((row + j) as u32));
                assert_eq!(
                    scored,
                    inside && mask[at] == 1,
                    "conv {c} pair {j} step {k}"
                );
                if j + k < pairs {
                    let next = step.next.to_vec2::<f32>().unwrap();
                    assert_eq!(next[row + j], next0[row + j + k]);
                }
            }
        }
        row += pairs;
    }
    assert_eq!(row, b.len());
}
