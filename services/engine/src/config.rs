//! Model configuration: a serde mirror of Hugging Face `config.json`, and the engine's own
//! internal config that every loader (HF or GGUF) converts into.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA-2/3, Vicuna, SmolLM2, Mistral (dense).
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v biases.
    Qwen2,
    /// Mixtral: LLaMA attention with a top-k routed mixture of SwiGLU experts.
    Mixtral,
}

/// LLaMA-3.1 style rotary frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Clone, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// The engine's model configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    /// Mixtral only: number of experts and how many each token uses.
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return bad(format!("zero-sized model: {self:?}"));
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary",
                self.head_dim
            ));
        }
        if self.arch == Arch::Mixtral && (self.num_experts == 0 || self.num_experts_per_tok == 0) {
            return bad("a Mixtral config needs num_local_experts and num_experts_per_tok".into());
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// A mirror of the fields of Hugging Face `config.json` that the engine reads.
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub vocab_size: usize,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| EngineError::malformed(path, format!("config.json: {e}")))
    }

    pub fn into_config(self) -> Result<ModelConfig> {
        let model_type = self
            .model_type
            .clone()
            .unwrap_or_else(|| "llama".to_string())
            .to_lowercase();
        let arch = match model_type.as_str() {
            "llama" | "mistral" | "vicuna" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mixtral" => Arch::Mixtral,
            other => return Err(EngineError::UnsupportedArch(other.to_string())),
        };
        let rope_scaling = match &self.rope_scaling {
            Some(v) if !v.is_null() => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|x| x.as_str())
                    .unwrap_or("");
                if kind != "llama3" {
                    return Err(EngineError::Config(format!(
                        "rope_scaling type {kind:?} is not supported (only \"llama3\")"
                    )));
                }
                let f = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d) as f32;
                Some(Llama3RopeScaling {
                    factor: f("factor", 8.0),
                    low_freq_factor: f("low_freq_factor", 1.0),
                    high_freq_factor: f("high_freq_factor", 4.0),
                    original_max_position_embeddings: v
                        .get("original_max_position_embeddings")
                        .and_then(|x| x.as_u64())
                        .unwrap_or(8192)
                        as usize,
                })
            }
            _ => None,
        };
        let cfg = ModelConfig {
            arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps as f32,
            rope_theta: self.rope_theta.unwrap_or(10_000.0) as f32,
            rope_scaling,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            attention_bias: self.attention_bias.unwrap_or(arch == Arch::Qwen2),
            num_experts: self.num_local_experts.unwrap_or(0),
            num_experts_per_tok: self.num_experts_per_tok.unwrap_or(0),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
