//! The head shipped in `heads/smollm2-135m` (trained by this project, 4k draft vocabulary):
//! EAGLE with it equals vanilla greedy decoding token for token on the real SmolLM2-135M, and
//! it is a trained head (it has draft tokens accepted, which a random head almost never does).

mod common;
#[path = "common/prompts.rs"]
mod prompts;

use std::path::PathBuf;

use candle_core::{DType, Device};
use eagle_engine::chat::Message;
use eagle_engine::{Engine, GenerateRequest, LoadOptions, Mode};

#[test]
fn the_shipped_head_is_lossless_and_accepts_tokens() {
    let head = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../heads/smollm2-135m");
    assert!(
        head.join("config.json").exists(),
        "{} is missing",
        head.display()
    );
    let e = Engine::load(
        &LoadOptions {
            model: common::smollm2_path(),
            head: Some(head),
            dtype: DType::BF16,
            quant: eagle_engine::Quant::None,
            device: Device::Cpu,
        },
        &mut |_, _| {},
    )
    .unwrap();
    let (mut tokens, mut steps) = (0usize, 0usize);
    let mut positions = eagle_engine::acceptance::PositionAcceptance::default();
    for p in prompts::PROMPTS {
        let ids = e
            .chat_prompt(&[Message::new("user", p.to_string())])
            .unwrap();
        let mut req = GenerateRequest::new(ids, 64);
        req.mode = Mode::Vanilla;
        let want = e.generate(&req).unwrap().tokens;
        req.mode = Mode::Eagle;
        let got = e.generate(&req).unwrap();
        assert_eq!(got.tokens, want, "prompt {p:?}");
        tokens += got.tokens.len();
        steps += got.steps;
        positions.merge(&got.position_acceptance());
    }
    let mean = tokens as f64 / steps as f64;
    eprintln!("shipped head: {mean:.2} tokens per target pass");
    assert!(
        mean > 1.2,
        "mean accepted {mean:.2}: the shipped head looks untrained"
    );
    let rates = positions.rates();
    eprintln!(
        "shipped head: acceptance by position {:?}",
        rates.conditional
    );
    let first = rates.conditional[0].expect("speculative steps drafted a token");
    assert!(
        first > 0.3,
        "the first draft token is accepted in {first:.2} of the passes: the head regressed"
    );
}
