//! `eagle data --regenerate`: the stored answer of every conversation is exactly the target's
//! own greedy continuation of its prompt (checked against a session decoding it alone), ends
//! at the end-of-turn token, is the same whatever the batch, and a run stopped by its token
//! budget and resumed stores what one uninterrupted run stores. Sampled answers are seeded
//! per conversation, so they too do not depend on batching or resumes.

mod common;

use candle_core::DType;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{argmax, Rng};
use eagle_engine::session::TargetSession;
use eagle_train::data::{generate, DataConfig, Prepared, Sample};
use eagle_train::regen::RegenConfig;
use eagle_train::shards::Dataset;

use common::{scratch, tiny_target, TINY_VOCAB};

const MAX_LEN: usize = 40;

/// Conversations with a prompt of 3-14 tokens and a dataset reply the target will replace.
fn samples() -> Vec<Sample> {
    let mut rng = Rng::new(21);
    (0..24)
        .map(|k| {
            let prompt = 3 + (rng.uniform() * 12.0) as usize;
            let len = prompt + 5 + (rng.uniform() * 20.0) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| (rng.uniform() * TINY_VOCAB as f64) as u32)
                .collect();
            let mut mask = vec![0u8; prompt];
            mask.resize(len, 1);
            Sample {
                id: format!("c{k}"),
                ids,
                mask,
            }
        })
        .collect()
}

fn config(regen: RegenConfig, eos: &[u32], max_tokens: Option<usize>) -> DataConfig {
    DataConfig {
        model: "tiny".into(),
        input: "synthetic".into(),
        max_len: MAX_LEN,
        held_out_frac: 0.2,
        dtype: DType::F16,
        max_tokens,
        shard_tokens: 200,
        regen: Some((regen, eos.to_vec())),
    }
}

fn run(target: &TargetModel, dir: &std::path::Path, cfg: &DataConfig) {
    let records = samples().into_iter().map(Ok);
    generate(target, records, Prepared::Sample, dir, cfg, &mut |_| {}).unwrap();
}

/// (index, prompt, answer) of every stored conversation, in input order.
fn stored(dir: &std::path::Path) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let d = Dataset::open(dir).unwrap();
    d.convs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (ids, mask) = d.ids_mask(c);
            let cut = mask.iter().position(|&m| m == 1).unwrap();
            assert!(
                mask[cut..].iter().all(|&m| m == 1),
                "the answer is all loss"
            );
            (format!("#{i}"), ids[..cut].to_vec(), ids[cut..].to_vec())
        })
        .collect()
}

/// The target's greedy answer to `prompt`, one session alone, one token per step.
fn greedy_alone(target: &TargetModel, prompt: &[u32], eos: &[u32]) -> Vec<u32> {
    let mut sess = TargetSession::new(target, MAX_LEN + 1).unwrap();
    let (_, logits) = sess.prefill(target, prompt).unwrap();
    let mut out = vec![argmax(&logits)];
    while !eos.contains(out.last().unwrap()) && prompt.len() + out.len() < MAX_LEN {
        let (_, logits) = sess.decode(target, *out.last().unwrap()).unwrap();
        out.push(argmax(&logits));
    }
    out
}

#[test]
fn answers_are_the_targets_greedy_output_in_any_batch_and_across_resumes() {
    let target = tiny_target();
    // An end-of-turn id the target does produce: the third token of one greedy answer.
    let free = greedy_alone(&target, &samples()[0].ids[..5], &[]);
    let eos = [free[2]];
    let greedy = |batch| RegenConfig {
        batch,
        prefill_rows: 30,
        ..RegenConfig::default()
    };

    let dir = scratch("regen-b5");
    run(&target, &dir, &config(greedy(5), &eos, None));
    let answers = stored(&dir);
    assert_eq!(answers.len(), 24);
    let mut ended = 0;
    for (id, prompt, answer) in &answers {
        let want = greedy_alone(&target, prompt, &eos);
        assert_eq!(answer, &want, "{id}: the stored answer is not the target's");
        ended += eos.contains(answer.last().unwrap()) as usize;
    }
    assert!(ended >= 1, "some answers end at the end-of-turn token");
    let man = Dataset::open(&dir).unwrap().manifest;
    assert_eq!(man.answers, "target greedy");

    // One at a time: the same answers.
    let alone = scratch("regen-b1");
    run(&target, &alone, &config(greedy(1), &eos, None));
    assert_eq!(stored(&alone), answers);

    // Stopped by a token budget, then resumed: the same data.
    let split = scratch("regen-split");
    run(&target, &split, &config(greedy(5), &eos, Some(250)));
    let part = Dataset::open(&split).unwrap().manifest;
    assert!(!part.complete && part.tokens >= 250, "{part:?}");
    run(&target, &split, &config(greedy(5), &eos, None));
    assert!(Dataset::open(&split).unwrap().manifest.complete);
    assert_eq!(stored(&split), answers);

    // Sampled answers: seeded per conversation, so batching does not change them; they differ
    // from the greedy ones, and a directory of greedy answers refuses to continue with them.
    let sampled = |batch| RegenConfig {
        temperature: 1.0,
        seed: 7,
        batch,
        ..RegenConfig::default()
    };
    let s4 = scratch("regen-t1-b4");
    run(&target, &s4, &config(sampled(4), &eos, None));
    let s1 = scratch("regen-t1-b1");
    run(&target, &s1, &config(sampled(1), &eos, None));
    assert_eq!(stored(&s4), stored(&s1));
    assert_ne!(stored(&s4), answers);
    let records = samples().into_iter().map(Ok);
    let err = generate(
        &target,
        records,
        Prepared::Sample,
        &dir,
        &config(sampled(4), &eos, None),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("other settings"), "{err}");
}
