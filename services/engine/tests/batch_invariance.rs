//! "Same numbers for the same token", tested directly on SmolLM2-135M: a token's features and
//! logits are bit-identical whether it is decoded alone or verified as a node of a draft tree
//! among unrelated siblings, for f32 and bf16 weights. And the device-generic path (candle ops,
//! what CUDA runs) agrees with the CPU kernels within 1e-3 on the logits.

mod common;

use candle_core::DType;
use eagle_engine::layers::force_generic_kernels;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{argmax, Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::tree::DraftTree;

fn load(dtype: DType) -> TargetModel {
    let m = open_model(&common::smollm2_path()).unwrap();
    common::load_target(&m, m.config.clone(), dtype)
}

/// The kernel switch is process-wide: these tests take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

const PROMPT: [u32; 12] = [1, 4093, 198, 23232, 1639, 253, 6373, 44, 2, 198, 1, 520];

/// Logits of 5 sequentially decoded greedy tokens (after the prompt), and those tokens.
fn sequential(model: &TargetModel) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut s = TargetSession::new(model, 64).unwrap();
    let (_, mut logits) = s.prefill(model, &PROMPT).unwrap();
    let mut toks = Vec::new();
    let mut all = Vec::new();
    for _ in 0..5 {
        let t = argmax(&logits);
        toks.push(t);
        logits = s.decode(model, t).unwrap().1;
        all.push(logits.clone());
    }
    (toks, all)
}

#[test]
fn tree_nodes_equal_sequential_decoding_bitwise() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for dtype in [DType::F32, DType::BF16] {
        let model = load(dtype);
        let (toks, seq) = sequential(&model);
        // Tree: root = toks[0]; junk siblings at every level, and the true path
        // toks[1..5] interleaved with them so that ancestors are not contiguous.
        let mut tree = DraftTree::root(toks[0]);
        let mut cur = 0;
        let mut path = vec![0];
        for (i, &t) in toks[1..].iter().enumerate() {
            tree.push(cur, 1000 + i as u32);
            let junk = tree.push(cur, 2000 + i as u32);
            tree.push(junk, 3000 + i as u32);
            cur = tree.push(cur, t);
            path.push(cur);
        }
        let mut s = TargetSession::new(&model, 64).unwrap();
        s.prefill(&model, &PROMPT).unwrap();
        let start = s.cache.len();
        let vis = eagle_engine::kernels::attention::Visibility::tree(start, &tree.parents);
        let feats = model
            .forward(&mut s.cache, &tree.tokens, &tree.positions(start), &vis)
            .unwrap();
        for (step, &node) in path.iter().enumerate() {
            let l: Vec<f32> = model
                .logits(&feats.narrow(0, node, 1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let same = l
                .iter()
                .zip(&seq[step])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{dtype:?}: node {node} (step {step}) differs from sequential decoding"
            );
        }
        // And after verification + compaction, decoding continues exactly.
        let mut s2 = TargetSession::new(&model, 64).unwrap();
        s2.prefill(&model, &PROMPT).unwrap();
        let v = s2
            .verify(&model, &tree, &SamplingParams::greedy(), &mut Rng::new(0))
            .unwrap();
        assert_eq!(v.verdict.tokens[..4], toks[1..5]);
        assert_eq!(v.verdict.tokens[4], argmax(&seq[4]));
    }
}

#[test]
fn generic_path_agrees_with_cpu_kernels() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let model = load(DType::F32);
    force_generic_kernels(false);
    let (toks_cpu, cpu) = sequential(&model);
    force_generic_kernels(true);
    let (toks_gen, gen) = sequential(&model);
    force_generic_kernels(false);
    assert_eq!(toks_cpu, toks_gen);
    for (a, b) in cpu.iter().zip(&gen) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-3, "generic path differs by {d}");
    }
}
