//! A head's files in the published layout: `config.json` (a valid Hugging Face LLaMA config)
//! and `model.safetensors` under the reference's tensor names: `layers.0.*` for EAGLE-1/2,
//! `midlayer.*`, `norm.weight` and `fc.weight` [H, 3H] for EAGLE-3 (see `eagle3.rs`).
//!
//! Invariant: `EagleHead::load` of what `save` wrote gives the same tensors, bit for bit in the
//! saved dtype.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::eagle3::{HeadKind, ARCHITECTURE};
use super::EagleHead;
use crate::error::{EngineError, Result};
use crate::loader::WeightSource;

/// Tensors held in memory (a `pytorch_model.bin`, or a freshly initialised head).
pub(super) struct MapSource {
    pub map: HashMap<String, Tensor>,
    pub desc: String,
}

impl WeightSource for MapSource {
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.map.get(name).cloned())
    }
    fn describe(&self) -> String {
        self.desc.clone()
    }
}

/// The name Hugging Face's `config.json` uses for a dtype (`torch.float16`'s `float16`; our
/// own short names make transformers fail: `module 'torch' has no attribute 'f16'`).
pub fn hf_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

impl EagleHead {
    /// Where the decoder layer's tensors live: `layers.0` (EAGLE-1/2) or `midlayer` (EAGLE-3).
    pub fn layer_prefix(&self) -> &'static str {
        layer_prefix(&self.kind)
    }

    /// Writes `config.json` and `model.safetensors` in the published format, float tensors in
    /// `dtype` (`d2t` stays i64; `t2d` is written as bool).
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let c = &self.cfg;
        let architecture = match self.kind {
            HeadKind::Eagle => "LlamaForCausalLM",
            HeadKind::Eagle3 { .. } => ARCHITECTURE,
        };
        let mut config = serde_json::json!({
            "architectures": [architecture],
            "model_type": if c.arch == crate::config::Arch::Qwen2 { "qwen2" } else { "llama" },
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "attention_bias": c.attention_bias,
            "hidden_act": "silu",
            "torch_dtype": hf_dtype_name(dtype),
        });
        if let Some(dv) = &self.draft_vocab {
            config["draft_vocab_size"] = dv.d2t.len().into();
        }
        if let HeadKind::Eagle3 { layers } = &self.kind {
            config["eagle_config"] = serde_json::json!({
                "eagle_aux_hidden_state_layer_ids": layers,
            });
        }
        let cfg_path = dir.join("config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap())
            .map_err(|e| EngineError::io(&cfg_path, e))?;
        let mut entries: Vec<(String, SaveEntry)> = Vec::new();
        for (k, t) in self.tensors()? {
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            entries.push((
                k,
                SaveEntry::Tensor(t.to_device(&Device::Cpu)?.contiguous()?),
            ));
        }
        if let Some(dv) = &self.draft_vocab {
            let mut t2d = vec![0u8; c.vocab_size];
            for &t in &dv.d2t {
                t2d[t as usize] = 1;
            }
            let n = t2d.len();
            entries.push(("t2d".into(), SaveEntry::Bool(t2d, [n])));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(entries, None, &path)
            .map_err(|e| EngineError::malformed(&path, format!("cannot write: {e}")))?;
        Ok(())
    }

    /// Every tensor of the head under its published name, as held (fused q/k/v and gate/up
    /// split back apart). A reduced draft vocabulary adds `lm_head.weight` and `d2t` (i64
    /// offsets `target id - draft index`); an EAGLE-3 head its three norms.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let c = &self.cfg;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        map.insert("fc.weight".into(), self.fc.weight.dense()?.clone());
        if let Some(b) = &self.fc.bias {
            map.insert("fc.bias".into(), b.clone());
        }
        let l = self.layer_prefix();
        let a = &self.layer.attn;
        let p = format!("{l}.self_attn");
        map.insert(
            format!("{p}.q_proj.weight"),
            a.qkv.weight.dense()?.narrow(0, 0, qd)?,
        );
        map.insert(
            format!("{p}.k_proj.weight"),
            a.qkv.weight.dense()?.narrow(0, qd, kvd)?,
        );
        map.insert(
            format!("{p}.v_proj.weight"),
            a.qkv.weight.dense()?.narrow(0, qd + kvd, kvd)?,
        );
        if let Some(b) = &a.qkv.bias {
            map.insert(format!("{p}.q_proj.bias"), b.narrow(0, 0, qd)?);
            map.insert(format!("{p}.k_proj.bias"), b.narrow(0, qd, kvd)?);
            map.insert(format!("{p}.v_proj.bias"), b.narrow(0, qd + kvd, kvd)?);
        }
        map.insert(format!("{p}.o_proj.weight"), a.o.weight.dense()?.clone());
        let f = c.intermediate_size;
        let m = self
            .layer
            .mlp
            .dense()
            .expect("an EAGLE head's layer is dense");
        map.insert(
            format!("{l}.mlp.gate_proj.weight"),
            m.gate_up.weight.dense()?.narrow(0, 0, f)?,
        );
        map.insert(
            format!("{l}.mlp.up_proj.weight"),
            m.gate_up.weight.dense()?.narrow(0, f, f)?,
        );
        map.insert(
            format!("{l}.mlp.down_proj.weight"),
            m.down.weight.dense()?.clone(),
        );
        map.insert(
            format!("{l}.post_attention_layernorm.weight"),
            self.layer.post_norm.weight.clone(),
        );
        if let Some(n) = &self.eagle3 {
            map.insert(
                format!("{l}.input_layernorm.weight"),
                n.embed.weight.clone(),
            );
            map.insert(format!("{l}.hidden_norm.weight"), n.hidden.weight.clone());
            map.insert("norm.weight".into(), n.output.weight.clone());
        }
        if let Some(dv) = &self.draft_vocab {
            dv.insert_tensors(&mut map, &self.device)?;
        }
        Ok(map)
    }
}

/// The decoder layer's published tensor prefix for a head of `kind`.
pub(super) fn layer_prefix(kind: &HeadKind) -> &'static str {
    match kind {
        HeadKind::Eagle => "layers.0",
        HeadKind::Eagle3 { .. } => "midlayer",
    }
}

/// A tensor to save: a candle tensor, or a bool mask (which candle has no dtype for).
enum SaveEntry {
    Tensor(Tensor),
    /// One byte per element, with its shape.
    Bool(Vec<u8>, [usize; 1]),
}

impl safetensors::View for SaveEntry {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            SaveEntry::Tensor(t) => safetensors::View::dtype(t),
            SaveEntry::Bool(..) => safetensors::Dtype::BOOL,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            SaveEntry::Tensor(t) => t.dims(),
            SaveEntry::Bool(_, shape) => shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            SaveEntry::Tensor(t) => safetensors::View::data(t),
            SaveEntry::Bool(b, _) => std::borrow::Cow::Borrowed(b),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            SaveEntry::Tensor(t) => safetensors::View::data_len(t),
            SaveEntry::Bool(b, _) => b.len(),
        }
    }
}
