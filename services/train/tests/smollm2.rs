//! On the real SmolLM2-135M: greedy EAGLE with a reduced-vocabulary head gives exactly the
//! vanilla output (losslessness), and chat formatting masks exactly the assistant replies.
//! Needs the model: `cargo run --release -p eagle-cli -- fetch smollm2-135m`.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use eagle_engine::chat::Message;
use eagle_engine::draft::Drafter;
use eagle_engine::head::{DraftVocab, EagleHead};
use eagle_engine::layers::Linear;
use eagle_engine::spec::SpecConfig;
use eagle_engine::{Engine, GenerateRequest, LoadOptions, Mode};
use eagle_train::format::tokenize_conversation;

fn model() -> std::path::PathBuf {
    common::smollm2_path().expect(
        "SmolLM2-135M is missing: run `cargo run --release -p eagle-cli -- fetch smollm2-135m`",
    )
}

#[test]
fn reduced_vocabulary_head_is_lossless() {
    let opts = LoadOptions {
        model: model(),
        head: None,
        dtype: DType::F32,
        quant: eagle_engine::Quant::None,
        device: Device::Cpu,
    };
    let mut engine = Engine::load(&opts, &mut |_, _| {}).unwrap();
    let target = &engine.target;
    // The 4096 lowest ids (BPE merge order: the commonest pieces) plus the chat markers.
    let ids: Vec<u32> = (0..4096u32).collect();
    let idx = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let rows = target
        .lm_head
        .weight
        .dense()
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    let mut head = EagleHead::init_random(&target.cfg, 5, DType::F32, &Device::Cpu).unwrap();
    head.draft_vocab = Some(
        DraftVocab::new(Linear::new(rows, None).unwrap(), ids, target.cfg.vocab_size).unwrap(),
    );
    // Through the file format, as a trained head would arrive.
    let dir = common::scratch("smol-reduced");
    head.save(&dir, DType::F16).unwrap();
    let head = EagleHead::load(&dir, &target.cfg, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(head.draft_vocab.as_ref().unwrap().d2t.len(), 4096);
    engine.drafter = Some(Drafter::new(Arc::new(head), &engine.target));
    for prompt in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
    ] {
        let ids = engine.chat_prompt(&[Message::new("user", prompt)]).unwrap();
        let mut req = GenerateRequest::new(ids, 32);
        req.spec = SpecConfig {
            total_token: 32,
            ..SpecConfig::default()
        };
        let eagle = engine.generate(&req).unwrap();
        req.mode = Mode::Vanilla;
        let vanilla = engine.generate(&req).unwrap();
        assert_eq!(eagle.tokens, vanilla.tokens, "prompt {prompt:?}");
        assert!(eagle.tree_sizes.len() > 1);
    }
}

#[test]
fn chat_formatting_masks_the_assistant_replies() {
    let opened = eagle_engine::loader::open_model(&model()).unwrap();
    let tok = &opened.tokenizer;
    let msgs = vec![
        Message::new("user", "Name a colour."),
        Message::new("assistant", "Blue is a colour."),
        Message::new("user", "Another one?"),
        Message::new("assistant", "Green."),
    ];
    let t = tokenize_conversation(tok, &msgs, 4096).unwrap().unwrap();
    // Exactly what the engine would encode for the whole conversation.
    let full_text = tok
        .chat_template()
        .render(&msgs, "", "<|im_end|>", false)
        .unwrap();
    assert_eq!(t.ids, tok.encode(&full_text, tok.add_bos()).unwrap());
    // The masked runs are the two replies with their end-of-turn tokens.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (i, (&id, &m)) in t.ids.iter().zip(&t.mask).enumerate() {
        if m == 1 {
            if i == 0 || t.mask[i - 1] == 0 {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
    }
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(tok.decode(&runs[0]).unwrap().trim(), "Blue is a colour.");
    assert_eq!(tok.decode(&runs[1]).unwrap().trim(), "Green.");
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert!(runs.iter().all(|r| r.contains(&im_end)));
    // The prompt before a reply ends with the generation prompt, unmasked.
    let first = t.mask.iter().position(|&m| m == 1).unwrap();
    let prompt = tok.encode_chat(&msgs[..1]).unwrap();
    assert_eq!(&t.ids[..first], &prompt[..]);
    // Truncation keeps a prefix; nothing without an assistant reply is kept.
    let cut = tokenize_conversation(tok, &msgs, first + 2)
        .unwrap()
        .unwrap();
    assert_eq!(cut.ids, t.ids[..first + 2]);
    assert!(tokenize_conversation(tok, &msgs, first).unwrap().is_none());
    assert!(tokenize_conversation(tok, &msgs[..1], 4096)
        .unwrap()
        .is_none());
}

/// `eagle data` in the served mode (`--dtype auto`: the GGUF's own blocks on the integer
/// kernels) stores, for every token, exactly the features the worker hands the draft service
/// for that token: a prompt prefilled, then tokens decoded one at a time, as a served session
/// runs. Both the last features (EAGLE-1/2) and the three layers' outputs (EAGLE-3).
#[test]
fn served_mode_data_features_equal_what_the_worker_sends() {
    use eagle_engine::head::HeadKind;
    use eagle_engine::models::TargetModel;
    use eagle_engine::parallel::Shard;
    use eagle_engine::session::TargetSession;

    let opened = eagle_engine::loader::open_model(&model()).unwrap();
    let precision = eagle_engine::device::parse_precision("auto").unwrap();
    let mut target = TargetModel::load_with(
        opened.source.as_ref(),
        opened.config.clone(),
        precision.dtype,
        precision.quant,
        &Device::Cpu,
        Shard::single(),
        &mut |_, _| {},
    )
    .unwrap();
    let msgs = vec![
        Message::new("user", "Name two rivers in Europe."),
        Message::new("assistant", "The Danube and the Rhine."),
    ];
    let ids = tokenize_conversation(&opened.tokenizer, &msgs, 4096)
        .unwrap()
        .unwrap()
        .ids;
    let prompt = ids.len() - 8;
    let eagle3 = HeadKind::parse_features("eagle3", target.cfg.num_layers).unwrap();
    for layers in [Vec::new(), eagle3.target_layers().to_vec()] {
        target.set_draft_layers(&layers).unwrap();
        let stored = eagle_train::data::states(&target, &ids).unwrap();
        let stored = if layers.is_empty() {
            stored.last
        } else {
            stored.draft
        };
        let mut sess = TargetSession::new(&target, ids.len() + 1).unwrap();
        let (mut sent, _) = sess.prefill(&target, &ids[..prompt]).unwrap();
        for &t in &ids[prompt..] {
            let (f, _) = sess.decode(&target, t).unwrap();
            sent = Tensor::cat(&[&sent, &f], 0).unwrap();
        }
        assert_eq!(stored.dims(), sent.dims(), "draft layers {layers:?}");
        let (a, b) = (
            stored.to_vec2::<f32>().unwrap(),
            sent.to_vec2::<f32>().unwrap(),
        );
        for (row, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "draft layers {layers:?}: token {row} differs"
            );
        }
    }
}
