//! Batched drafting's invariant, on SmolLM2-135M and the shipped head: sessions whose trees
//! are drafted together (one head pass per tree level over all of them) get exactly the trees
//! each gets alone, greedy and seeded sampling, step after step of a real generation, while
//! the sessions sit at different lengths and grow trees of different depths. And a session
//! that fails in a batch (a wrong root) fails alone.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use eagle_engine::draft::{DraftJob, DraftSession, Drafter};
use eagle_engine::head::EagleHead;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{argmax, sample, warp, Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::{BatchLoad, SpecConfig, TreeBudget};
use eagle_engine::tree::DraftTree;

const STEPS: usize = 4;

/// One generation: its target session, draft session, settings and both random streams.
struct Gen {
    target: TargetSession,
    ds: DraftSession,
    last: u32,
    spec: SpecConfig,
    sampling: SamplingParams,
    budget: TreeBudget,
    draft_rng: Rng,
    verify_rng: Rng,
}

fn prompt(i: usize) -> Vec<u32> {
    (0..6 + 11 * i)
        .map(|j| 300 + ((j * 53 + i * 211) % 4000) as u32)
        .collect()
}

fn start(target: &TargetModel, drafter: &Drafter, i: usize) -> Gen {
    let p = prompt(i);
    let sampling = if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.8,
            seed: 17 + i as u64,
            ..SamplingParams::greedy()
        }
    };
    // Trees of different sizes and depths per session.
    let spec = SpecConfig {
        total_token: 8 + 8 * (i as i32 % 3),
        depth: 3 + i % 4,
        ..SpecConfig::default()
    };
    let mut verify_rng = Rng::new(sampling.seed);
    let mut ts = TargetSession::new(target, 256).unwrap();
    let (feats, logits) = ts.prefill(target, &p).unwrap();
    let last = if sampling.is_greedy() {
        argmax(&logits)
    } else {
        sample(&warp(&logits, &sampling), &mut verify_rng)
    };
    let mut ds = drafter.open(256).unwrap();
    let mut shifted = p[1..].to_vec();
    shifted.push(last);
    ds.push(&shifted, &feats).unwrap();
    Gen {
        target: ts,
        ds,
        last,
        budget: TreeBudget::Fixed(spec.node_budget()),
        spec,
        draft_rng: Rng::new(sampling.seed ^ 1),
        sampling,
        verify_rng,
    }
}

/// Verifies `tree` on the target and commits what was accepted to the draft session.
fn advance(target: &TargetModel, g: &mut Gen, tree: &DraftTree) {
    let v = g
        .target
        .verify(target, tree, &g.sampling, &mut g.verify_rng)
        .unwrap();
    g.last = *v.verdict.tokens.last().unwrap();
    g.ds.push(&v.verdict.tokens, &v.features).unwrap();
}

fn job(g: &mut Gen) -> DraftJob<'_> {
    DraftJob {
        sess: &mut g.ds,
        root: g.last,
        cfg: &g.spec,
        sampling: &g.sampling,
        rng: &mut g.draft_rng,
        budget: &g.budget,
        load: BatchLoad::default(),
    }
}

/// Bits, so that draft distributions compare exactly.
fn bits(t: &DraftTree) -> (Vec<u32>, Vec<i32>, Vec<Option<Vec<u32>>>) {
    let probs = t
        .draft_probs
        .iter()
        .map(|p| p.as_ref().map(|q| q.iter().map(|x| x.to_bits()).collect()))
        .collect();
    (t.tokens.clone(), t.parents.clone(), probs)
}

#[test]
fn sessions_drafted_together_get_the_trees_they_get_alone() {
    let opened = eagle_engine::loader::open_model(&common::smollm2_path()).unwrap();
    let target =
        common::load_target_quant(&opened, opened.config.clone(), eagle_engine::Quant::Native);
    let head_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../heads/smollm2-135m");
    let head = EagleHead::load(&head_dir, &target.cfg, DType::BF16, &Device::Cpu).unwrap();
    let drafter = Drafter::new(Arc::new(head), &target);
    let n = 6;

    // Alone: every session's trees, step by step.
    let mut alone: Vec<Vec<DraftTree>> = Vec::new();
    for i in 0..n {
        let mut g = start(&target, &drafter, i);
        let mut trees = Vec::new();
        for _ in 0..STEPS {
            let (tree, _) = drafter
                .draft_batch(vec![job(&mut g)])
                .pop()
                .unwrap()
                .unwrap();
            advance(&target, &mut g, &tree);
            trees.push(tree);
        }
        alone.push(trees);
    }
    assert!(
        alone.iter().flatten().any(|t| t.len() > 4),
        "the head must draft real trees for this test to mean anything"
    );

    // Together: session i joins at step i / 2, so batches mix sessions at different steps.
    let mut gens: Vec<Gen> = (0..n).map(|i| start(&target, &drafter, i)).collect();
    let mut together: Vec<Vec<DraftTree>> = vec![Vec::new(); n];
    let mut widest = 0;
    for step in 0..STEPS + n / 2 {
        let who: Vec<usize> = (0..n)
            .filter(|&i| step >= i / 2 && together[i].len() < STEPS)
            .collect();
        let jobs: Vec<DraftJob<'_>> = gens
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| who.contains(i))
            .map(|(_, g)| job(g))
            .collect();
        widest = widest.max(jobs.len());
        let trees: Vec<DraftTree> = drafter
            .draft_batch(jobs)
            .into_iter()
            .map(|r| r.unwrap().0)
            .collect();
        for (&i, tree) in who.iter().zip(trees) {
            advance(&target, &mut gens[i], &tree);
            together[i].push(tree);
        }
    }
    assert!(widest >= 4, "some batch must hold most sessions");
    for i in 0..n {
        for (k, (a, b)) in alone[i].iter().zip(&together[i]).enumerate() {
            assert!(
                bits(a) == bits(b),
                "session {i}, step {k}: the batched tree differs"
            );
        }
    }

    // A wrong root fails its own job only.
    let mut gens: Vec<Gen> = (0..3).map(|i| start(&target, &drafter, i)).collect();
    gens[1].last += 1;
    let results = drafter.draft_batch(gens.iter_mut().map(job).collect());
    assert!(results[0].is_ok() && results[2].is_ok());
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("root"), "{err}");
}
