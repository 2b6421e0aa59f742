//! The library's streaming form: the chunks handed to the callback concatenate to exactly the
//! tokens `generate` returns; returning false cancels at once with `FinishReason::Cancelled`;
//! a seeded sampling run reproduces itself; and bad requests are refused with clear errors.

mod common;

use eagle_engine::chat::Message;
use eagle_engine::{EngineError, FinishReason, GenerateRequest, Mode, SamplingParams, SpecConfig};

fn request(e: &eagle_engine::Engine, text: &str) -> GenerateRequest {
    let mut r = GenerateRequest::new(e.chat_prompt(&[Message::new("user", text)]).unwrap(), 48);
    r.spec = SpecConfig {
        total_token: 6,
        depth: 3,
        top_k: 3,
        ..Default::default()
    };
    r
}

#[test]
fn stream_chunks_concatenate_to_the_full_output() {
    let e = common::smollm2_engine();
    for mode in [Mode::Vanilla, Mode::Eagle] {
        let mut req = request(&e, "Describe a rainy day in a city.");
        req.mode = mode;
        let full = e.generate(&req).unwrap();
        let mut chunks: Vec<Vec<u32>> = Vec::new();
        let streamed = e
            .generate_stream(&req, &mut |t| {
                chunks.push(t.to_vec());
                true
            })
            .unwrap();
        assert_eq!(chunks.concat(), full.tokens, "{mode:?}");
        assert_eq!(streamed.tokens, full.tokens);
        assert!(chunks.iter().all(|c| !c.is_empty()));
        assert_eq!(full.accepted.len(), full.steps);
    }
}

#[test]
fn returning_false_cancels() {
    let e = common::smollm2_engine();
    let req = request(&e, "Count from one to one hundred.");
    let mut seen = 0;
    let out = e
        .generate_stream(&req, &mut |t| {
            seen += t.len();
            seen < 5
        })
        .unwrap();
    assert_eq!(out.finish, Some(FinishReason::Cancelled));
    assert_eq!(out.tokens.len(), seen);
    assert!((5..48).contains(&seen));
}

#[test]
fn seeded_sampling_reproduces_itself() {
    let e = common::smollm2_engine();
    let mut req = request(&e, "Write a limerick about a cat.");
    req.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: 42,
    };
    let a = e.generate(&req).unwrap();
    let b = e.generate(&req).unwrap();
    assert_eq!(a.tokens, b.tokens);
    req.sampling.seed = 43;
    let c = e.generate(&req).unwrap();
    assert_ne!(
        a.tokens, c.tokens,
        "different seeds should (almost surely) differ"
    );
}

#[test]
fn bad_requests_are_refused() {
    let e = common::smollm2_engine();
    let mut empty = request(&e, "hi");
    empty.prompt.clear();
    assert!(e
        .generate(&empty)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    let mut long = request(&e, "hi");
    long.max_new_tokens = 100_000;
    assert!(matches!(
        e.generate(&long).unwrap_err(),
        EngineError::ContextOverflow { .. }
    ));
    let mut bad_token = request(&e, "hi");
    bad_token.prompt.push(10_000_000);
    assert!(e
        .generate(&bad_token)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    let mut bad_t = request(&e, "hi");
    bad_t.sampling.temperature = f32::NAN;
    assert!(e
        .generate(&bad_t)
        .unwrap_err()
        .to_string()
        .contains("temperature"));
    let no_head = eagle_engine::Engine::from_parts(
        common::load_target(
            &eagle_engine::loader::open_model(&common::smollm2_path()).unwrap(),
            e.target.cfg.clone(),
            candle_core::DType::F32,
        ),
        None,
        e.tokenizer.clone(),
    );
    assert!(no_head
        .generate(&request(&e, "hi"))
        .unwrap_err()
        .to_string()
        .contains("needs a head"));
    let mut bad_spec = request(&e, "hi");
    bad_spec.spec.depth = 0;
    assert!(e
        .generate(&bad_spec)
        .unwrap_err()
        .to_string()
        .contains("depth"));
}
