//! A head's initial weights, as the reference initialises before training: normal(0, 0.02)
//! matrices, unit norm weights, zero biases, under the published tensor names of its kind.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::eagle3::HeadKind;
use super::files::layer_prefix;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::sampling::Rng;

/// normal(0, 0.02) matrices, unit norm weights, zero biases, under published tensor names.
pub(super) fn random_tensors(
    c: &ModelConfig,
    kind: &HeadKind,
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let mut rng = Rng::new(seed);
    let mut normal = |rows: usize, cols: usize| -> Result<Tensor> {
        let n = rows * cols;
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller.
            let u1 = rng.uniform().max(1e-300);
            let u2 = rng.uniform();
            let r = (-2.0 * u1.ln()).sqrt();
            v.push((0.02 * r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
            v.push((0.02 * r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
        }
        v.truncate(n);
        Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
    };
    let (h, f, qd, kvd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let ones = || Tensor::ones(h, DType::F32, &Device::Cpu);
    let l = layer_prefix(kind);
    let eagle3 = matches!(kind, HeadKind::Eagle3 { .. });
    // EAGLE-1/2: fc [H, 2H] with a bias over (embedding, feature); EAGLE-3: fc [H, 3H] without
    // one over three target layers, and attention reading 2H.
    let (fc_in, attn_in) = if eagle3 { (3 * h, 2 * h) } else { (2 * h, h) };
    let mut m = HashMap::new();
    m.insert("fc.weight".to_string(), normal(h, fc_in)?);
    if eagle3 {
        m.insert(format!("{l}.input_layernorm.weight"), ones()?);
        m.insert(format!("{l}.hidden_norm.weight"), ones()?);
        m.insert("norm.weight".into(), ones()?);
    } else {
        m.insert(
            "fc.bias".to_string(),
            Tensor::zeros(h, DType::F32, &Device::Cpu)?,
        );
    }
    let p = format!("{l}.self_attn");
    m.insert(format!("{p}.q_proj.weight"), normal(qd, attn_in)?);
    m.insert(format!("{p}.k_proj.weight"), normal(kvd, attn_in)?);
    m.insert(format!("{p}.v_proj.weight"), normal(kvd, attn_in)?);
    m.insert(format!("{p}.o_proj.weight"), normal(h, qd)?);
    if c.attention_bias {
        for (n, d) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
            m.insert(
                format!("{p}.{n}.bias"),
                Tensor::zeros(d, DType::F32, &Device::Cpu)?,
            );
        }
    }
    m.insert(format!("{l}.mlp.gate_proj.weight"), normal(f, h)?);
    m.insert(format!("{l}.mlp.up_proj.weight"), normal(f, h)?);
    m.insert(format!("{l}.mlp.down_proj.weight"), normal(h, f)?);
    m.insert(format!("{l}.post_attention_layernorm.weight"), ones()?);
    Ok(m)
}
