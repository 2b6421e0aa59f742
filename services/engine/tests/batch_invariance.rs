//! "Same numbers for the same token", tested directly on SmolLM2-135M: a token's features and
//! logits are bit-identical whether it is decoded alone or verified as a node of a draft tree
//! among unrelated siblings, for f32 and bf16 weights, and for quantized weights (the GGUF's own
//! Q4_1/Q8_0 blocks, and everything as Q8_0) with trees of 1 to 64 tokens on every integer
//! kernel path this CPU has, each giving the portable path's bits. And the device-generic path
//! (candle ops, what CUDA runs) agrees with the CPU kernels within 1e-3 on the logits.

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

/// The features of `tree`'s nodes, verified in one pass after the prompt.
fn tree_features(model: &TargetModel, tree: &DraftTree) -> candle_core::Tensor {
    let mut s = TargetSession::new(model, PROMPT.len() + tree.tokens.len()).unwrap();
    s.prefill(model, &PROMPT).unwrap();
    let start = s.cache.len();
    let vis = eagle_engine::kernels::attention::Visibility::tree(start, &tree.parents);
    model
        .forward(&mut s.cache, &tree.tokens, &tree.positions(start), &vis)
        .unwrap()
}

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
        let feats = tree_features(&model, &tree);
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

/// A tree of `n` nodes holding the greedy path `toks[1..]` (as deep as `n` allows) among junk
/// nodes hung at pseudo-random places; returns it and the path's node indices.
fn tree_with_path(toks: &[u32], n: usize) -> (DraftTree, Vec<usize>) {
    let mut tree = DraftTree::root(toks[0]);
    let mut path = vec![0];
    let depth = toks.len().min(n.div_ceil(2));
    let mut cur = 0;
    let mut step = 1;
    let mut salt = 17u32;
    while tree.tokens.len() < n {
        salt = salt.wrapping_mul(1103515245).wrapping_add(12345);
        if step < depth && (tree.tokens.len() % 2 == 1 || tree.tokens.len() + 1 == n) {
            cur = tree.push(cur, toks[step]);
            path.push(cur);
            step += 1;
        } else {
            let parent = (salt >> 8) as usize % tree.tokens.len();
            tree.push(parent, 500 + (salt >> 16) % 40000);
        }
    }
    (tree, path)
}

#[test]
fn quantized_tree_nodes_equal_sequential_decoding_on_every_path() {
    use eagle_engine::kernels::quant::{force_isa, Isa};
    use eagle_engine::Quant;
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let opened = open_model(&common::smollm2_path()).unwrap();
    for quant in [Quant::Native, Quant::Q8_0] {
        let model = common::load_target_quant(&opened, opened.config.clone(), quant);
        let mut reference: Option<Vec<Vec<f32>>> = None;
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512Vnni, Isa::Amx] {
            if !isa.available() {
                eprintln!(
                    "{quant:?}: skipping the {} path: this CPU lacks it",
                    isa.name()
                );
                continue;
            }
            force_isa(Some(isa));
            let (toks, seq) = sequential(&model);
            // Every path gives the portable path's bits.
            match &reference {
                None => reference = Some(seq.clone()),
                Some(r) => {
                    for (a, b) in r.iter().zip(&seq) {
                        assert!(
                            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{quant:?}: the {} path differs from the portable path",
                            isa.name()
                        );
                    }
                }
            }
            for n in [1, 2, 4, 8, 16, 32, 64] {
                let (tree, path) = tree_with_path(&toks, n);
                assert_eq!(tree.tokens.len(), n);
                let feats = tree_features(&model, &tree);
                let logits = model.logits(&feats).unwrap().to_vec2::<f32>().unwrap();
                for (step, &node) in path.iter().enumerate() {
                    assert!(
                        logits[node]
                            .iter()
                            .zip(&seq[step])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{quant:?} on {}: node {node} (step {step}) of a {n}-node tree differs \
                         from sequential decoding",
                        isa.name()
                    );
                }
            }
            eprintln!(
                "{quant:?} on {}: trees of 1..64 nodes bit-identical",
                isa.name()
            );
        }
        force_isa(None);
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

/// One session's steps, as a script the alone and batched runs both follow.
enum Step {
    Extend(Vec<u32>),
    Verify(DraftTree),
}

/// What a step gave: feature bits, logits bits (if any), accepted tokens (for a tree).
type Outcome = (Vec<u32>, Vec<u32>, Vec<u32>);

fn outcome(done: eagle_engine::session::Done) -> Outcome {
    use eagle_engine::session::Done;
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    match done {
        Done::Extended { features, logits } => (
            bits(&features),
            logits
                .unwrap_or_default()
                .iter()
                .map(|v| v.to_bits())
                .collect(),
            Vec::new(),
        ),
        Done::Verified(v) => (bits(&v.features), Vec::new(), v.verdict.tokens),
    }
}

fn run_step(
    model: &TargetModel,
    jobs: Vec<(&mut TargetSession, &Step)>,
    rule: &eagle_engine::verify::Recursive,
) -> Vec<Outcome> {
    use eagle_engine::session::{run_batch, Work};
    let greedy = SamplingParams::greedy();
    let mut rngs: Vec<Rng> = jobs.iter().map(|_| Rng::new(0)).collect();
    let work: Vec<_> = jobs
        .into_iter()
        .zip(rngs.iter_mut())
        .map(|((s, step), rng)| {
            let w = match step {
                Step::Extend(t) => Work::Extend {
                    tokens: t,
                    logits: true,
                },
                Step::Verify(tree) => Work::Verify {
                    tree,
                    sampling: &greedy,
                    rng,
                    rule,
                },
            };
            (s, w)
        })
        .collect();
    run_batch(model, work)
        .unwrap()
        .into_iter()
        .map(|r| outcome(r.unwrap()))
        .collect()
}

/// Continuous batching's invariant: sessions that share target passes (prompts, prompt chunks,
/// decodes and trees of different sessions in one pass, each at its own length) get exactly
/// the bits each gets alone, on the quantized serving path and in f32.
#[test]
fn sessions_in_one_pass_equal_sessions_alone_bitwise() {
    use eagle_engine::Quant;
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rule = eagle_engine::verify::Recursive;
    let opened = open_model(&common::smollm2_path()).unwrap();
    let models = [
        common::load_target_quant(&opened, opened.config.clone(), Quant::Native),
        load(DType::F32),
    ];
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            (0..7 + 9 * i)
                .map(|j| 200 + ((j * 37 + i * 101) % 3000) as u32)
                .collect()
        })
        .collect();
    for model in &models {
        // Alone: each session's script (a prompt in two chunks, two decodes, a tree holding
        // its greedy continuation, a decode), and what every step gives.
        let mut scripts: Vec<Vec<Step>> = Vec::new();
        let mut alone: Vec<Vec<Outcome>> = Vec::new();
        for p in &prompts {
            let mut s = TargetSession::new(model, 128).unwrap();
            let half = p.len() / 2;
            let mut script = vec![
                Step::Extend(p[..half].to_vec()),
                Step::Extend(p[half..].to_vec()),
            ];
            let mut outs = Vec::new();
            let next = |s: &mut TargetSession, step: &Step, outs: &mut Vec<Outcome>| {
                let o = run_step(model, vec![(s, step)], &rule).remove(0);
                let logits: Vec<f32> = o.1.iter().map(|&b| f32::from_bits(b)).collect();
                outs.push(o);
                argmax(&logits)
            };
            next(&mut s, &script[0], &mut outs);
            let mut t = next(&mut s, &script[1], &mut outs);
            // The greedy continuation, from a scratch copy, to build a tree that holds it.
            let mut cont = vec![t];
            let mut probe = TargetSession::new(model, 128).unwrap();
            probe.prefill(model, p).unwrap();
            for _ in 0..6 {
                let (_, l) = probe.decode(model, *cont.last().unwrap()).unwrap();
                cont.push(argmax(&l));
            }
            for _ in 0..2 {
                script.push(Step::Extend(vec![t]));
                t = next(&mut s, script.last().unwrap(), &mut outs);
            }
            let (tree, _) = tree_with_path(&cont[2..], 9);
            script.push(Step::Verify(tree));
            run_step(model, vec![(&mut s, script.last().unwrap())], &rule)
                .into_iter()
                .for_each(|o| outs.push(o));
            let bonus = *outs.last().unwrap().2.last().unwrap();
            script.push(Step::Extend(vec![bonus]));
            next(&mut s, script.last().unwrap(), &mut outs);
            scripts.push(script);
            alone.push(outs);
        }
        // Batched: session i starts at pass i, so passes mix prompt chunks, decodes and
        // trees of different sessions at different lengths.
        let mut sessions: Vec<TargetSession> = prompts
            .iter()
            .map(|_| TargetSession::new(model, 128).unwrap())
            .collect();
        let steps = scripts[0].len();
        let mut batched: Vec<Vec<Outcome>> = prompts.iter().map(|_| Vec::new()).collect();
        let mut widest = 0;
        for pass in 0..steps + prompts.len() {
            let mut jobs = Vec::new();
            let mut who = Vec::new();
            for (i, s) in sessions.iter_mut().enumerate() {
                if let Some(k) = pass.checked_sub(i).filter(|&k| k < steps) {
                    jobs.push((s, &scripts[i][k]));
                    who.push(i);
                }
            }
            widest = widest.max(jobs.len());
            for (i, o) in who.into_iter().zip(run_step(model, jobs, &rule)) {
                batched[i].push(o);
            }
        }
        assert_eq!(widest, prompts.len(), "some pass must hold every session");
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(x == y, "session {i}, step {k}: batched differs from alone");
            }
        }
    }
}
