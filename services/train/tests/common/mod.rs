//! Shared helpers for the training tests: a tiny random LLaMA target with a word-level
//! tokenizer, and the real SmolLM2 when it is fetched.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use eagle_engine::config::{Arch, ModelConfig};
use eagle_engine::loader::WeightSource;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::Rng;
use eagle_engine::tokenizer::Tokenizer;

pub const TINY_VOCAB: usize = 256;

struct Map(HashMap<String, Tensor>);
impl WeightSource for Map {
    fn get(&self, name: &str) -> eagle_engine::Result<Option<Tensor>> {
        Ok(self.0.get(name).cloned())
    }
    fn describe(&self) -> String {
        "a synthetic tiny target".into()
    }
}

pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        vocab_size: TINY_VOCAB,
        max_position_embeddings: 1024,
        tie_word_embeddings: false,
        attention_bias: false,
        num_experts: 0,
        num_experts_per_tok: 0,
    }
}

/// A random target (same weights every call) whose next-token distributions are peaked and
/// depend mostly on the current token, a little on the context (small attention and MLP
/// outputs on the residual stream): structure a head can learn from a few thousand pairs.
pub fn tiny_target() -> TargetModel {
    tiny_target_layers(2)
}

/// [`tiny_target`] with `layers` layers (the first two are `tiny_target`'s).
pub fn tiny_target_layers(layers: usize) -> TargetModel {
    let mut c = tiny_config();
    c.num_layers = layers;
    let mut rng = Rng::new(1234);
    let mut t = |r: usize, k: usize, scale: f64| {
        let v: Vec<f32> = (0..r * k)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * scale) as f32)
            .collect();
        Tensor::from_vec(v, (r, k), &Device::Cpu).unwrap()
    };
    let (h, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let ones = || Tensor::ones(h, DType::F32, &Device::Cpu).unwrap();
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".to_string(), t(v, h, 1.0));
    m.insert("lm_head.weight".to_string(), t(v, h, 2.0));
    m.insert("model.norm.weight".to_string(), ones());
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        m.insert(format!("{p}.input_layernorm.weight"), ones());
        m.insert(format!("{p}.post_attention_layernorm.weight"), ones());
        m.insert(format!("{p}.self_attn.q_proj.weight"), t(c.q_dim(), h, 0.4));
        m.insert(
            format!("{p}.self_attn.k_proj.weight"),
            t(c.kv_dim(), h, 0.4),
        );
        m.insert(
            format!("{p}.self_attn.v_proj.weight"),
            t(c.kv_dim(), h, 0.4),
        );
        m.insert(
            format!("{p}.self_attn.o_proj.weight"),
            t(h, c.q_dim(), 0.06),
        );
        m.insert(format!("{p}.mlp.gate_proj.weight"), t(f, h, 0.3));
        m.insert(format!("{p}.mlp.up_proj.weight"), t(f, h, 0.3));
        m.insert(format!("{p}.mlp.down_proj.weight"), t(h, f, 0.06));
    }
    TargetModel::load(&Map(m), c, DType::F32, &Device::Cpu, &mut |_, _| {}).unwrap()
}

/// A word-level tokenizer over `t0 .. t255` (EOS `t0`), written as a Hugging Face directory.
pub fn tiny_tokenizer(dir: &Path) -> Tokenizer {
    std::fs::create_dir_all(dir).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = (0..TINY_VOCAB)
        .map(|i| (format!("t{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "t0"}).to_string(),
    )
    .unwrap();
    Tokenizer::from_hf_dir(dir).unwrap()
}

/// A fresh scratch directory.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "eagle-train-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The SmolLM2-135M GGUF if it is fetched: `$EAGLE_TEST_GGUF`, else under the eagle home.
pub fn smollm2_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EAGLE_TEST_GGUF") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("EAGLE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("eagle")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/eagle"));
    let p = home
        .join("models/smollm2-135m")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

/// The eagle home's pip directory.
pub fn pip_dir() -> PathBuf {
    let home = std::env::var_os("EAGLE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("eagle")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/eagle"));
    home.join("pip")
}

/// `n` sequences from `target`: a random prompt of `prompt_len` tokens, then the target's own
/// continuation sampled at T = 0.7 up to `seq_len` tokens, with the loss mask on the
/// continuation.
pub fn sampled_sequences(
    target: &TargetModel,
    n: usize,
    seed: u64,
    prompt_len: usize,
    seq_len: usize,
) -> Vec<eagle_train::data::Sample> {
    use eagle_engine::sampling::{sample, warp, SamplingParams};
    let mut rng = Rng::new(seed);
    let params = SamplingParams {
        temperature: 0.7,
        ..SamplingParams::greedy()
    };
    (0..n)
        .map(|k| {
            let mut ids = random_prompt(&mut rng, prompt_len);
            let mut sess = eagle_engine::session::TargetSession::new(target, seq_len + 1).unwrap();
            let (_, mut logits) = sess.prefill(target, &ids).unwrap();
            while ids.len() < seq_len {
                let t = sample(&warp(&logits, &params), &mut rng);
                ids.push(t);
                logits = sess.decode(target, t).unwrap().1;
            }
            let mut mask = vec![0u8; prompt_len];
            mask.resize(seq_len, 1);
            eagle_train::data::Sample {
                id: format!("seq-{seed}-{k}"),
                ids,
                mask,
            }
        })
        .collect()
}

/// `len` random token ids of the tiny vocabulary, none of them the EOS `t0`.
fn random_prompt(rng: &mut Rng, len: usize) -> Vec<u32> {
    (0..len)
        .map(|_| 1 + (rng.uniform() * (TINY_VOCAB - 1) as f64) as u32)
        .collect()
}

/// Mean tokens per target pass of greedy EAGLE on `engine` over `prompts` random prompts of
/// `prompt_len` tokens, `new_tokens` each (trees of 24 nodes, depth 5, top-k 6), checking every
/// output against vanilla decoding.
pub fn tokens_per_pass(
    engine: &eagle_engine::Engine,
    prompts: usize,
    prompt_len: usize,
    new_tokens: usize,
) -> f64 {
    use eagle_engine::{GenerateRequest, Mode};
    let mut rng = Rng::new(99);
    let (mut tokens, mut steps) = (0usize, 0usize);
    for _ in 0..prompts {
        let mut req = GenerateRequest::new(random_prompt(&mut rng, prompt_len), new_tokens);
        req.spec = eagle_engine::spec::SpecConfig {
            total_token: 24,
            depth: 5,
            top_k: 6,
            ..Default::default()
        };
        let eagle = engine.generate(&req).unwrap();
        req.mode = Mode::Vanilla;
        let vanilla = engine.generate(&req).unwrap();
        assert_eq!(
            eagle.tokens, vanilla.tokens,
            "EAGLE output differs from vanilla"
        );
        tokens += eagle.tokens.len();
        steps += eagle.steps;
    }
    tokens as f64 / steps as f64
}
