//! Random-weight models of any supported shape, under Hugging Face tensor names: for tests of
//! architectures whose real checkpoints cannot run here (70B, Mixtral-8x7B), made small, and for
//! timing a real shape on a GPU without downloading it. Deterministic in the seed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Arch, ModelConfig};
use crate::error::{EngineError, Result};

/// Every tensor a target of shape `cfg` needs, f32 on the CPU. Matrices are N(0, std²) with
/// `std = 1 / sqrt(fan_in)`, norms 1 ± 0.1, biases N(0, 0.02²).
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    };
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    let (h, v, f) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
    let mut mat = |m: &mut HashMap<String, Tensor>, name: String, rows: usize, cols: usize| {
        let t = Tensor::from_vec(
            normal(rows * cols, 1.0 / (cols as f32).sqrt()),
            (rows, cols),
            &dev,
        );
        t.map(|t| m.insert(name, t))
    };
    mat(&mut m, "model.embed_tokens.weight".into(), v, h)?;
    if !cfg.tie_word_embeddings {
        mat(&mut m, "lm_head.weight".into(), v, h)?;
    }
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        mat(&mut m, format!("{p}.self_attn.q_proj.weight"), qd, h)?;
        mat(&mut m, format!("{p}.self_attn.k_proj.weight"), kvd, h)?;
        mat(&mut m, format!("{p}.self_attn.v_proj.weight"), kvd, h)?;
        mat(&mut m, format!("{p}.self_attn.o_proj.weight"), h, qd)?;
        if cfg.arch == Arch::Mixtral {
            let q = format!("{p}.block_sparse_moe");
            mat(&mut m, format!("{q}.gate.weight"), cfg.num_experts, h)?;
            for e in 0..cfg.num_experts {
                mat(&mut m, format!("{q}.experts.{e}.w1.weight"), f, h)?;
                mat(&mut m, format!("{q}.experts.{e}.w3.weight"), f, h)?;
                mat(&mut m, format!("{q}.experts.{e}.w2.weight"), h, f)?;
            }
        } else {
            mat(&mut m, format!("{p}.mlp.gate_proj.weight"), f, h)?;
            mat(&mut m, format!("{p}.mlp.up_proj.weight"), f, h)?;
            mat(&mut m, format!("{p}.mlp.down_proj.weight"), h, f)?;
        }
    }
    let mut vecs: Vec<(String, usize, f32, f32)> = vec![("model.norm.weight".into(), h, 1.0, 0.1)];
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        vecs.push((format!("{p}.input_layernorm.weight"), h, 1.0, 0.1));
        vecs.push((format!("{p}.post_attention_layernorm.weight"), h, 1.0, 0.1));
        if cfg.attention_bias {
            for (n, d) in [("q", qd), ("k", kvd), ("v", kvd)] {
                vecs.push((format!("{p}.self_attn.{n}_proj.bias"), d, 0.0, 0.02));
            }
        }
    }
    for (name, n, mean, std) in vecs {
        let x: Vec<f32> = normal(n, std).into_iter().map(|x| x + mean).collect();
        m.insert(name, Tensor::from_vec(x, n, &dev)?);
    }
    Ok(m)
}

/// Writes `config.json` (the given HF config) and `model.safetensors` of random weights into
/// `dir`: a loadable model directory without a tokenizer.
pub fn write_random_model(
    dir: &Path,
    hf_config: &serde_json::Value,
    seed: u64,
) -> Result<ModelConfig> {
    let cfg: crate::config::HfConfig = serde_json::from_value(hf_config.clone())
        .map_err(|e| EngineError::Config(format!("random model config: {e}")))?;
    let cfg = cfg.into_config()?;
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(hf_config).unwrap())
        .map_err(|e| EngineError::io(&cfg_path, e))?;
    let weights = random_weights(&cfg, seed)?;
    candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
    Ok(cfg)
}
