//! Greedy losslessness on the real SmolLM2-135M in the default mode (`--dtype auto`: the GGUF's
//! own Q4_1/Q8_0 blocks through the integer kernels): for 20 varied chat prompts and 128 new
//! tokens each, EAGLE output equals vanilla greedy output token for token, for several tree
//! settings (a chain, a wide tree, total_token = -1, an EAGLE-1 static tree), through the
//! public `Engine::generate` with a randomly initialised head.
//!
//! A random head is rejected almost everywhere, so a second test drives verification with an
//! oracle draft that knows the vanilla continuation (sometimes corrupted, with junk siblings):
//! long and partial acceptances, KV compaction and bonus tokens are exercised on every step.
//! The same oracle test runs on Qwen2.5-Coder-0.5B in its own Q4_K_M blocks (Q4_K, Q5_0, Q6_K,
//! Q8_0).

mod common;
#[path = "common/prompts.rs"]
mod prompts;

use std::sync::Arc;

use candle_core::{DType, Device};
use eagle_engine::draft::Drafter;
use eagle_engine::head::EagleHead;
use eagle_engine::sampling::{Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::{SpecConfig, TreeShape};
use eagle_engine::tree::{DraftTree, StaticShape};
use eagle_engine::{Engine, GenerateRequest, LoadOptions, Mode};

const NEW_TOKENS: usize = 128;

fn engine() -> Engine {
    engine_for(common::smollm2_path())
}

/// A model in the default mode (quantized blocks, bf16 for the rest) with a random head.
fn engine_for(model: std::path::PathBuf) -> Engine {
    let opts = LoadOptions {
        model,
        head: None,
        dtype: DType::BF16,
        quant: eagle_engine::Quant::Native,
        device: Device::Cpu,
    };
    let mut e = Engine::load(&opts, &mut |_, _| {}).unwrap();
    let head = EagleHead::init_random(&e.target.cfg, 11, DType::BF16, &Device::Cpu).unwrap();
    e.drafter = Some(Drafter::new(Arc::new(head), &e.target));
    e
}

fn request(e: &Engine, prompt: &str, mode: Mode, spec: SpecConfig) -> GenerateRequest {
    let ids = e
        .chat_prompt(&[eagle_engine::chat::Message::new("user", prompt)])
        .unwrap();
    GenerateRequest {
        prompt: ids,
        max_new_tokens: NEW_TOKENS,
        sampling: SamplingParams::greedy(),
        mode,
        spec,
    }
}

fn vanilla(e: &Engine) -> Vec<Vec<u32>> {
    prompts::PROMPTS
        .iter()
        .map(|p| {
            e.generate(&request(e, p, Mode::Vanilla, SpecConfig::default()))
                .unwrap()
                .tokens
        })
        .collect()
}

#[test]
fn eagle_equals_vanilla_greedy_for_every_tree_setting() {
    let e = engine();
    let reference = vanilla(&e);
    let settings = [
        (
            "chain",
            SpecConfig {
                total_token: 7,
                depth: 6,
                top_k: 1,
                ..Default::default()
            },
        ),
        (
            "wide",
            SpecConfig {
                total_token: 16,
                depth: 2,
                top_k: 8,
                ..Default::default()
            },
        ),
        (
            "auto",
            SpecConfig {
                total_token: -1,
                ..Default::default()
            },
        ),
        (
            "static",
            SpecConfig {
                total_token: 11,
                depth: 4,
                top_k: 3,
                shape: TreeShape::Static(StaticShape::default_with(10, 4, 3)),
                ..Default::default()
            },
        ),
    ];
    for (name, spec) in settings {
        let mut steps = 0;
        for (prompt, want) in prompts::PROMPTS.iter().zip(&reference) {
            let out = e
                .generate(&request(&e, prompt, Mode::Eagle, spec.clone()))
                .unwrap();
            assert_eq!(
                &out.tokens, want,
                "{name} tree differs from vanilla on {prompt:?}"
            );
            assert_eq!(out.fallback_steps, 0);
            steps += out.steps;
        }
        eprintln!(
            "{name}: identical on {} prompts, {steps} target passes",
            prompts::PROMPTS.len()
        );
    }
    // Outputs are real text. (The Q4_1 model with int8 activations answers the capital
    // question with French word salad, as llama.cpp does on the same file; code is solid.)
    let text = e.tokenizer.decode(&reference[3]).unwrap();
    assert!(
        text.contains("def is_prime"),
        "SmolLM2 should write the prime check: {text:?}"
    );
}

/// Builds a tree around the true continuation: the path follows `truth` but is corrupted with
/// probability 1/4 per depth, every path node gets a junk sibling, and the root a junk chain.
fn oracle_tree(root: u32, truth: &[u32], rng: &mut Rng, vocab: u32) -> DraftTree {
    let mut t = DraftTree::root(root);
    let junk = |rng: &mut Rng| (rng.uniform() * vocab as f64) as u32;
    let j = t.push(0, junk(rng));
    t.push(j, junk(rng));
    let mut cur = 0;
    for &tok in truth {
        let sib = t.push(cur, junk(rng));
        let _ = sib;
        let tok = if rng.uniform() < 0.25 { junk(rng) } else { tok };
        cur = t.push(cur, tok);
    }
    t
}

#[test]
fn verification_with_an_oracle_draft_accepts_and_stays_exact() {
    let e = engine();
    oracle_check(&e, &prompts::PROMPTS, NEW_TOKENS);
}

/// Qwen2's K-quants and Q5_0 blocks, through the same oracle-driven verification.
#[test]
fn qwen_q4_k_m_verification_stays_exact() {
    let e = engine_for(common::qwen_path());
    let described = e.target.layers[0]
        .mlp
        .dense()
        .unwrap()
        .down
        .weight
        .describe();
    assert!(
        ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]
            .iter()
            .any(|f| described.contains(f)),
        "Qwen's matrices should stay quantized, got {described}"
    );
    oracle_check(&e, &prompts::PROMPTS[..6], 48);
}

fn oracle_check(e: &Engine, prompts: &[&str], new_tokens: usize) {
    let target = &e.target;
    let reference: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut r = request(e, p, Mode::Vanilla, SpecConfig::default());
            r.max_new_tokens = new_tokens;
            e.generate(&r).unwrap().tokens
        })
        .collect();
    let mut rng = Rng::new(5);
    let vocab = target.cfg.vocab_size as u32;
    let mut total_steps = 0;
    let mut total_tokens = 0;
    let mut longest = 0;
    for (prompt, want) in prompts.iter().zip(&reference) {
        let req = request(e, prompt, Mode::Eagle, SpecConfig::default());
        let mut sess = TargetSession::new(target, req.prompt.len() + new_tokens + 32).unwrap();
        let (_, logits) = sess.prefill(target, &req.prompt).unwrap();
        let mut out = vec![eagle_engine::sampling::argmax(&logits)];
        while out.len() < want.len() {
            let depth = 1 + (rng.uniform() * 7.0) as usize;
            let truth: Vec<u32> = want[out.len()..].iter().take(depth).copied().collect();
            let tree = oracle_tree(*out.last().unwrap(), &truth, &mut rng, vocab);
            tree.check().unwrap();
            let v = sess
                .verify(target, &tree, &SamplingParams::greedy(), &mut rng)
                .unwrap();
            assert_eq!(v.features.dim(0).unwrap(), v.verdict.accepted.len() + 1);
            longest = longest.max(v.verdict.tokens.len());
            out.extend_from_slice(&v.verdict.tokens);
            total_steps += 1;
            total_tokens += v.verdict.tokens.len();
        }
        // Vanilla stops at EOS (excluded from its tokens) or the limit; compare that prefix.
        assert_eq!(
            &out[..want.len()],
            &want[..],
            "oracle-driven verification drifted on {prompt:?}"
        );
    }
    let mean = total_tokens as f64 / total_steps as f64;
    eprintln!("oracle: {total_tokens} tokens in {total_steps} verifications (mean {mean:.2}, longest {longest})");
    assert!(
        mean > 2.0 && longest >= 6,
        "the oracle test should accept long paths"
    );
}

/// Near the end of the model's context a tree would reach past the last position: those steps
/// decode plainly, and the output still equals vanilla up to the very last position.
#[test]
fn eagle_runs_to_the_end_of_the_context() {
    let opened = eagle_engine::loader::open_model(&common::smollm2_path()).unwrap();
    let mut cfg = opened.config.clone();
    let prompt = opened
        .tokenizer
        .encode_chat(&[eagle_engine::chat::Message::new(
            "user",
            "Tell me a long story.",
        )])
        .unwrap();
    cfg.max_position_embeddings = prompt.len() + 40;
    let target = common::load_target(&opened, cfg, DType::BF16);
    let head = EagleHead::init_random(&target.cfg, 1, DType::BF16, &Device::Cpu).unwrap();
    let e = Engine::from_parts(target, Some(head), opened.tokenizer);
    let spec = SpecConfig {
        total_token: 8,
        depth: 6,
        top_k: 4,
        ..Default::default()
    };
    let mut req = request(&e, "Tell me a long story.", Mode::Vanilla, spec.clone());
    req.max_new_tokens = 40;
    let vanilla = e.generate(&req).unwrap();
    req.mode = Mode::Eagle;
    let eagle = e.generate(&req).unwrap();
    assert_eq!(vanilla.tokens, eagle.tokens);
    req.max_new_tokens = 41;
    let err = e.generate(&req).unwrap_err();
    assert!(
        matches!(err, eagle_engine::EngineError::ContextOverflow { .. }),
        "{err}"
    );
}
