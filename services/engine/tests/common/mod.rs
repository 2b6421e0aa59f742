//! Shared helpers for the engine's integration tests: finding the real model, loading it once.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device};
use eagle_engine::head::EagleHead;
use eagle_engine::{Engine, LoadOptions};

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2-135M GGUF: `$EAGLE_TEST_GGUF`, else the fetched copy under `$EAGLE_HOME`.
/// Panics with the command to run when it is missing: these tests must never pass vacuously.
pub fn smollm2_path() -> PathBuf {
    match std::env::var_os("EAGLE_TEST_GGUF") {
        Some(p) => PathBuf::from(p),
        None => fetched("smollm2-135m", SMOLLM2_FILE),
    }
}

/// Loads the target of an opened model on the CPU with `cfg` (the opened config, or a variant).
pub fn load_target(
    opened: &eagle_engine::loader::OpenedModel,
    cfg: eagle_engine::config::ModelConfig,
    dtype: DType,
) -> eagle_engine::models::TargetModel {
    eagle_engine::models::TargetModel::load(
        opened.source.as_ref(),
        cfg,
        dtype,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap()
}

/// The same with matrices kept quantized as `quant` says (bf16 for the rest).
pub fn load_target_quant(
    opened: &eagle_engine::loader::OpenedModel,
    cfg: eagle_engine::config::ModelConfig,
    quant: eagle_engine::Quant,
) -> eagle_engine::models::TargetModel {
    eagle_engine::models::TargetModel::load_with(
        opened.source.as_ref(),
        cfg,
        DType::BF16,
        quant,
        &Device::Cpu,
        eagle_engine::parallel::Shard::single(),
        &mut |_, _| {},
    )
    .unwrap()
}

/// Qwen2.5-Coder-0.5B-Instruct (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 matrices).
pub fn qwen_path() -> PathBuf {
    fetched("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.gguf")
}

/// The target's logits at the last of `tokens`, run from an empty cache.
pub fn last_logits(model: &eagle_engine::models::TargetModel, tokens: &[u32]) -> Vec<f32> {
    use eagle_engine::kernels::attention::Visibility;
    let mut cache = model.new_cache(tokens.len()).unwrap();
    let pos: Vec<usize> = (0..tokens.len()).collect();
    let f = model
        .forward(
            &mut cache,
            tokens,
            &pos,
            &Visibility::causal(0, tokens.len()),
        )
        .unwrap();
    model
        .logits(&f.narrow(0, tokens.len() - 1, 1).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The HF names of a LLaMA-style model's tensors (the tied LM head excluded).
pub fn hf_names(layers: usize) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for i in 0..layers {
        for n in [
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        ] {
            names.push(format!("model.layers.{i}.{n}"));
        }
    }
    names
}

/// A fetched registry model's file under `$EAGLE_HOME/models/<name>/<file>`; panics with the
/// fetch command when missing.
pub fn fetched(name: &str, file: &str) -> PathBuf {
    let home = std::env::var_os("EAGLE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("eagle")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/eagle")
        });
    let p = home.join("models").join(name).join(file);
    assert!(
        p.exists(),
        "{} is missing: run `cargo run --release -p eagle-cli -- fetch {name}` first",
        p.display()
    );
    p
}

/// SmolLM2-135M with a random head, loaded once per test binary (f32 weights).
pub fn smollm2_engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let opts = LoadOptions {
                model: smollm2_path(),
                head: None,
                dtype: DType::F32,
                quant: eagle_engine::Quant::None,
                device: Device::Cpu,
            };
            let mut e = Engine::load(&opts, &mut |_, _| {}).expect("load SmolLM2");
            let head = EagleHead::init_random(&e.target.cfg, 7, DType::F32, &Device::Cpu).unwrap();
            e.drafter = Some(eagle_engine::draft::Drafter::new(Arc::new(head), &e.target));
            Arc::new(e)
        })
        .clone()
}
