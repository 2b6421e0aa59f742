//! A head's files in the published layout, read and written: `config.json` (a valid Hugging
//! Face LLaMA config; `architectures` says the kind) and `model.safetensors` (or a PyTorch
//! `pytorch_model.bin`) under the reference's tensor names: `layers.0.*` for EAGLE-1/2,
//! `midlayer.*`, `norm.weight` and `fc.weight` [H, 3H] for EAGLE-3 (see `eagle3.rs`).
//!
//! Invariant: `EagleHead::load` of what `save` wrote gives the same tensors, bit for bit in the
//! saved dtype.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::eagle3::{HeadKind, ARCHITECTURE};
use super::EagleHead;
use crate::config::{HfConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::loader::safetensors::SafetensorsSource;
use crate::loader::{Quant, WeightSource};

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
    /// Loads a head directory and checks it against the target it will draft for.
    pub fn load(dir: &Path, target: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(dir, target, dtype, Quant::None, device)
    }

    /// [`EagleHead::load`] with matrices quantized as `quant` says. A quantized head drafts
    /// faster and loses nothing: the target decides every token.
    pub fn load_with(
        dir: &Path,
        target: &ModelConfig,
        dtype: DType,
        quant: Quant,
        device: &Device,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                what: "an EAGLE head directory (config.json + model.safetensors)".into(),
            });
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(EngineError::MissingFile {
                path: cfg_path,
                what: "the head's config.json".into(),
            });
        }
        let mut hf = HfConfig::from_file(&cfg_path)?;
        if hf.model_type.is_none() {
            hf.model_type = Some("llama".into());
        }
        let cfg = hf.into_config()?;
        let raw = std::fs::read(&cfg_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .unwrap_or_default();
        let draft_vocab_size = raw
            .get("draft_vocab_size")
            .and_then(|n| n.as_u64())
            .map(|n| n as usize);
        let kind = HeadKind::from_config(&raw, target.num_layers)?;
        if cfg.hidden_size != target.hidden_size || cfg.vocab_size != target.vocab_size {
            return Err(EngineError::Config(format!(
                "head {} has hidden {} and vocab {}, but the target has hidden {} and vocab {}",
                dir.display(),
                cfg.hidden_size,
                cfg.vocab_size,
                target.hidden_size,
                target.vocab_size
            )));
        }
        let st = dir.join("model.safetensors");
        let bin = dir.join("pytorch_model.bin");
        let src: Box<dyn WeightSource> = if st.exists() {
            Box::new(SafetensorsSource::open(&st)?)
        } else if bin.exists() {
            let tensors = candle_core::pickle::read_all(&bin).map_err(|e| {
                EngineError::malformed(&bin, format!("cannot read PyTorch weights: {e}"))
            })?;
            Box::new(MapSource {
                map: tensors.into_iter().collect(),
                desc: bin.display().to_string(),
            })
        } else {
            return Err(EngineError::MissingFile {
                path: dir.to_path_buf(),
                what: "model.safetensors or pytorch_model.bin".into(),
            });
        };
        let head = Self::from_source(src.as_ref(), cfg, kind, dtype, quant, device)?;
        let found = head.draft_vocab.as_ref().map(|d| d.d2t.len());
        if draft_vocab_size.is_some() && draft_vocab_size != found {
            return Err(EngineError::Config(format!(
                "head {}: config.json says draft_vocab_size {:?}, but the weights hold a draft \
                 vocabulary of {found:?} (d2t and lm_head.weight)",
                dir.display(),
                draft_vocab_size
            )));
        }
        Ok(head)
    }

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
