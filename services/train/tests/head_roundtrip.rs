//! A saved head reloads bit-identically (every tensor) and drafts the same trees, with and
//! without a reduced draft vocabulary; a reduced-vocabulary head drafts only its own tokens and
//! its sampling distributions are zero outside them.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use eagle_engine::draft::Drafter;
use eagle_engine::head::{DraftVocab, EagleHead};
use eagle_engine::layers::Linear;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::{SpecConfig, TreeBudget};
use eagle_engine::tree::DraftTree;

use common::{scratch, tiny_target};

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

fn same_tensors(a: &EagleHead, b: &EagleHead, dtype: DType) {
    let (ta, tb) = (a.tensors().unwrap(), b.tensors().unwrap());
    let mut ka: Vec<&String> = ta.keys().collect();
    let mut kb: Vec<&String> = tb.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for k in ka {
        let (x, y) = (&ta[k], &tb[k]);
        assert_eq!(x.dims(), y.dims(), "{k}");
        if k == "d2t" {
            assert_eq!(
                x.to_vec1::<i64>().unwrap(),
                y.to_vec1::<i64>().unwrap(),
                "{k}"
            );
        } else {
            // What was saved is the original rounded to the saved dtype.
            let x = x.to_dtype(dtype).unwrap();
            assert_eq!(bits(&x), bits(y), "tensor {k} changed in the round trip");
        }
    }
}

fn reduced(target: &TargetModel, n: usize) -> EagleHead {
    let mut head = EagleHead::init_random(&target.cfg, 11, DType::F32, &Device::Cpu).unwrap();
    // Every third token, then a few high ones.
    let mut ids: Vec<u32> = (0..target.cfg.vocab_size as u32)
        .step_by(3)
        .take(n)
        .collect();
    ids.sort_unstable();
    let idx = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let rows = target
        .lm_head
        .weight
        .dense()
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    head.draft_vocab = Some(
        DraftVocab::new(Linear::new(rows, None).unwrap(), ids, target.cfg.vocab_size).unwrap(),
    );
    head
}

fn draft(target: &TargetModel, head: EagleHead, sampling: &SamplingParams) -> DraftTree {
    let drafter = Drafter::new(Arc::new(head), target);
    let prompt = [5u32, 17, 99, 3, 250, 8];
    let mut sess = TargetSession::new(target, 64).unwrap();
    let (feats, logits) = sess.prefill(target, &prompt).unwrap();
    let root = eagle_engine::sampling::argmax(&logits);
    let mut ds = drafter.open(128).unwrap();
    let mut shifted = prompt[1..].to_vec();
    shifted.push(root);
    ds.push(&shifted, &feats).unwrap();
    let spec = SpecConfig {
        total_token: 20,
        depth: 4,
        top_k: 4,
        ..SpecConfig::default()
    };
    let budget = TreeBudget::for_spec(&spec, None);
    let (tree, _) = drafter
        .draft(&mut ds, root, &spec, sampling, &mut Rng::new(4), &budget)
        .unwrap();
    tree
}

fn round_trip(head: EagleHead, tag: &str) {
    let target = tiny_target();
    let cfg = target.cfg.clone();
    for dtype in [DType::F32, DType::F16] {
        let dir = scratch(tag);
        head.save(&dir, dtype).unwrap();
        let back = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
        same_tensors(&head, &back, dtype);
        // Saving what was loaded writes the same bytes.
        let again = scratch(tag);
        back.save(&again, dtype).unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            std::fs::read(again.join("model.safetensors")).unwrap()
        );
        if dtype == DType::F32 {
            let t0 = draft(&target, head_clone(&head), &SamplingParams::greedy());
            let t1 = draft(&target, back, &SamplingParams::greedy());
            assert_eq!(t0.tokens, t1.tokens);
            assert_eq!(t0.parents, t1.parents);
            assert!(t0.len() > 5);
        }
    }
}

fn head_clone(h: &EagleHead) -> EagleHead {
    let map: HashMap<String, Tensor> = h.tensors().unwrap();
    EagleHead::from_tensors(map, h.cfg.clone(), h.kind.clone(), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn full_vocabulary_head_round_trips() {
    let target = tiny_target();
    let head = EagleHead::init_random(&target.cfg, 3, DType::F32, &Device::Cpu).unwrap();
    round_trip(head, "full");
}

#[test]
fn reduced_vocabulary_head_round_trips_and_stores_eagle3_maps() {
    let target = tiny_target();
    let head = reduced(&target, 40);
    round_trip(head_clone(&head), "reduced");

    let dir = scratch("maps");
    head.save(&dir, DType::F16).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["draft_vocab_size"], 40);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let d2t = st.tensor("d2t").unwrap();
    assert_eq!(d2t.dtype(), safetensors::Dtype::I64);
    let offsets: Vec<i64> = d2t
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let ids: Vec<i64> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| i as i64 + o)
        .collect();
    assert_eq!(ids, (0..40).map(|i| 3 * i).collect::<Vec<i64>>());
    let t2d = st.tensor("t2d").unwrap();
    assert_eq!(t2d.dtype(), safetensors::Dtype::BOOL);
    assert_eq!(t2d.shape(), [256]);
    for (t, &b) in t2d.data().iter().enumerate() {
        assert_eq!(b == 1, t % 3 == 0 && t < 120, "t2d[{t}]");
    }
    assert_eq!(st.tensor("lm_head.weight").unwrap().shape(), [40, 64]);

    // A config that disagrees with the weights is refused.
    let mut bad = cfg.clone();
    bad["draft_vocab_size"] = 41.into();
    std::fs::write(dir.join("config.json"), bad.to_string()).unwrap();
    let err = EagleHead::load(&dir, &target.cfg, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("draft_vocab_size"), "{err}");
}

#[test]
fn reduced_vocabulary_drafts_stay_inside_it() {
    let target = tiny_target();
    let allowed: Vec<bool> = (0..256).map(|t| t % 3 == 0 && t < 120).collect();
    let root = {
        let mut sess = TargetSession::new(&target, 64).unwrap();
        let (_, l) = sess.prefill(&target, &[5, 17, 99, 3, 250, 8]).unwrap();
        eagle_engine::sampling::argmax(&l)
    };
    let greedy = draft(&target, reduced(&target, 40), &SamplingParams::greedy());
    assert_eq!(greedy.tokens[0], root);
    for &t in &greedy.tokens[1..] {
        assert!(
            allowed[t as usize],
            "greedy draft token {t} outside the draft vocabulary"
        );
    }
    let sampling = SamplingParams {
        temperature: 1.0,
        seed: 1,
        ..SamplingParams::default()
    };
    let tree = draft(&target, reduced(&target, 40), &sampling);
    assert!(tree.len() > 3);
    for &t in &tree.tokens[1..] {
        assert!(
            allowed[t as usize],
            "sampled draft token {t} outside the draft vocabulary"
        );
    }
    let mut checked = 0;
    for q in tree.draft_probs.iter().flatten() {
        let inside: f64 = q
            .iter()
            .enumerate()
            .filter(|(t, _)| allowed[*t])
            .map(|(_, p)| *p as f64)
            .sum();
        assert!(
            (inside - 1.0).abs() < 1e-5,
            "mass inside the vocabulary {inside}"
        );
        assert!(q.iter().enumerate().all(|(t, p)| allowed[t] || *p == 0.0));
        checked += 1;
    }
    assert!(checked > 0);
}
