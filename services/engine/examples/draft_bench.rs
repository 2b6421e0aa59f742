//! Times the draft side of an EAGLE step on real weights: the catch-up over the accepted
//! pairs (with the root's LM-head row) and the levels of a dynamic tree of fixed size, as a
//! real step runs them, with the features a real prefill gives.
//! `cargo run --release -p eagle-engine --example draft_bench -- MODEL HEAD [NODES] [ITERS]`
//! (`NODES` -1: automatic trees sized by this machine's measured costs, as served; `ROUNDS=R`
//! repeats the timed drafts R times over the same target features).

use std::time::Instant;

use candle_core::Device;
use eagle_engine::device::parse_precision;
use eagle_engine::generate::{Engine, LoadOptions};
use eagle_engine::sampling::{Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::{SpecConfig, TreeBudget};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: draft_bench MODEL HEAD_DIR [NODES] [ITERS]";
    let model = std::path::PathBuf::from(args.get(1).expect(usage));
    let head = std::path::PathBuf::from(args.get(2).expect(usage));
    let nodes: i32 = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let iters: usize = args.get(4).map_or(Ok(300), |s| s.parse())?;
    let p = parse_precision("auto")?;
    let engine = Engine::load(
        &LoadOptions {
            model,
            head: Some(head),
            dtype: p.dtype,
            quant: p.quant,
            device: Device::Cpu,
        },
        &mut |_, _| {},
    )?;
    let drafter = engine.drafter.as_ref().expect("a head");
    let target = &engine.target;
    let prompt = engine.tokenizer.encode(
        "Write a short story about a lighthouse keeper who finds a message in a bottle. \
         Describe the sea, the weather and the keeper's thoughts in detail.",
        true,
    )?;
    let mut tsess = TargetSession::new(target, prompt.len() + iters + 64)?;
    let (features, _) = tsess.prefill(target, &prompt)?;
    let cfg = SpecConfig {
        total_token: nodes,
        ..SpecConfig::default()
    };
    let profile = if nodes < 0 {
        Some(engine.cost_profile()?)
    } else {
        None
    };
    let budget = TreeBudget::for_spec(&cfg, profile);
    let sampling = SamplingParams::greedy();
    let mut rng = Rng::new(0);
    // Each round's first draft absorbs the prompt; the steady state after it is timed.
    let mut root = *prompt.last().expect("a prompt");
    // The target's next tokens and their features first, so that the timed loop (and a
    // profile of it) holds only drafting.
    let mut steps = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (feat, logits) = tsess.decode(target, root)?;
        root = argmax(&logits);
        steps.push((root, feat));
    }
    let rounds: usize = std::env::var("ROUNDS").map_or(Ok(1), |s| s.parse())?;
    let (mut total, mut passes, mut drafts) = (0f64, 0usize, 0usize);
    for _ in 0..rounds {
        let mut dsess = drafter.open(prompt.len() + iters + 128)?;
        dsess.push(&prompt, &features)?;
        let root = *prompt.last().expect("a prompt");
        drafter.draft(&mut dsess, root, &cfg, &sampling, &mut rng, &budget)?;
        for (next, feat) in &steps {
            // One accepted token per step: its pair is the next catch-up.
            dsess.push(&[*next], feat)?;
            let t = Instant::now();
            let (_, stats) =
                drafter.draft(&mut dsess, *next, &cfg, &sampling, &mut rng, &budget)?;
            total += t.elapsed().as_secs_f64();
            passes += stats.head_passes;
            drafts += 1;
        }
    }
    let iters = drafts;
    println!(
        "tree of {nodes}: {:.3} ms a draft, {:.2} head passes a draft, {:.3} ms a pass",
        total / iters as f64 * 1e3,
        passes as f64 / iters as f64,
        total / passes as f64 * 1e3
    );
    Ok(())
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}
