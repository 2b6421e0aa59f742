//! GGUF (llama.cpp) files: config from metadata, tensors dequantized to f32 on load and
//! presented under Hugging Face names.
//!
//! llama.cpp's converter permutes the q/k rows of `llama`-arch models so that rotary pairs are
//! adjacent; we undo that permutation here, so the model code always uses the HF rotate-half
//! layout (the layout the EAGLE heads were trained against). `qwen2` files are not permuted.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::WeightSource;
use crate::config::{Arch, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::quant::{ggml, Rows as QRows};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    file: Mutex<File>,
    arch_name: String,
    n_heads: usize,
    n_kv_heads: usize,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
        let content = Content::read(&mut file)
            .map_err(|e| EngineError::malformed(path, format!("not a readable GGUF file: {e}")))?;
        // A truncated file has a good header but tensors past its end.
        let len = file.metadata().map_err(|e| EngineError::io(path, e))?.len();
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(EngineError::malformed(
                    path,
                    format!("file is truncated: tensor {name} ends past the end of the file ({end} > {len} bytes)"),
                ));
            }
        }
        let md = &content.metadata;
        let arch_name = md_str(md, "general.architecture", path)?;
        let n_heads = md_u32(md, &format!("{arch_name}.attention.head_count"), path)? as usize;
        let n_kv_heads = md
            .get(&format!("{arch_name}.attention.head_count_kv"))
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file: Mutex::new(file),
            arch_name,
            n_heads,
            n_kv_heads,
        })
    }

    /// The model configuration from the GGUF metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let md = &self.content.metadata;
        let a = &self.arch_name;
        let p = &self.path;
        let arch = match a.as_str() {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(EngineError::UnsupportedArch(other.to_string())),
        };
        let hidden = md_u32(md, &format!("{a}.embedding_length"), p)? as usize;
        let vocab = match md.get(&format!("{a}.vocab_size")) {
            Some(v) => v.to_u32()? as usize,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(t) => t.to_vec()?.len(),
                None => self.tensor_dims("token_embd.weight")?[0],
            },
        };
        let head_dim = md
            .get(&format!("{a}.attention.key_length"))
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .unwrap_or(hidden / self.n_heads);
        let cfg = ModelConfig {
            arch,
            hidden_size: hidden,
            intermediate_size: md_u32(md, &format!("{a}.feed_forward_length"), p)? as usize,
            num_layers: md_u32(md, &format!("{a}.block_count"), p)? as usize,
            num_heads: self.n_heads,
            num_kv_heads: self.n_kv_heads,
            head_dim,
            rms_norm_eps: md_f32(md, &format!("{a}.attention.layer_norm_rms_epsilon"), p)?,
            rope_theta: md
                .get(&format!("{a}.rope.freq_base"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(10_000.0),
            rope_scaling: None,
            vocab_size: vocab,
            max_position_embeddings: md
                .get(&format!("{a}.context_length"))
                .and_then(|v| v.to_u32().ok())
                .map(|v| v as usize)
                .unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            num_experts: 0,
            num_experts_per_tok: 0,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| EngineError::MissingTensor {
                    name: name.to_string(),
                    source_desc: self.path.display().to_string(),
                })?;
        Ok(info.shape.dims().to_vec())
    }

    /// The raw bytes of a tensor as the file stores them.
    fn read_raw(&self, gguf_name: &str, bytes: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let info = &self.content.tensor_infos[gguf_name];
        let mut file = self.file.lock().expect("gguf file lock poisoned");
        let mut data = vec![0u8; bytes];
        file.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))
        .and_then(|_| file.read_exact(&mut data))
        .map_err(|e| EngineError::io(&self.path, e))?;
        Ok(data)
    }

    fn read_f32(&self, gguf_name: &str) -> Result<Tensor> {
        let mut file = self.file.lock().expect("gguf file lock poisoned");
        let q = self
            .content
            .tensor(&mut *file, gguf_name, &Device::Cpu)
            .map_err(|e| EngineError::malformed(&self.path, format!("tensor {gguf_name}: {e}")))?;
        q.dequantize(&Device::Cpu)
            .map_err(|e| EngineError::malformed(&self.path, format!("tensor {gguf_name}: {e}")))
    }
}

/// Maps an HF tensor name to its GGUF name, and says whether (and with how many heads) the
/// rows must be un-permuted.
fn gguf_name(hf: &str) -> Option<(String, Option<Rows>)> {
    #[derive(Clone, Copy)]
    enum Kind {
        Plain(&'static str),
        Q(&'static str),
        K(&'static str),
    }
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    for (h, g) in fixed {
        if hf == h {
            return Some((g.to_string(), None));
        }
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, tail) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    let map = [
        ("input_layernorm.weight", Kind::Plain("attn_norm.weight")),
        (
            "post_attention_layernorm.weight",
            Kind::Plain("ffn_norm.weight"),
        ),
        ("self_attn.q_proj.weight", Kind::Q("attn_q.weight")),
        ("self_attn.q_proj.bias", Kind::Q("attn_q.bias")),
        ("self_attn.k_proj.weight", Kind::K("attn_k.weight")),
        ("self_attn.k_proj.bias", Kind::K("attn_k.bias")),
        ("self_attn.v_proj.weight", Kind::Plain("attn_v.weight")),
        ("self_attn.v_proj.bias", Kind::Plain("attn_v.bias")),
        ("self_attn.o_proj.weight", Kind::Plain("attn_output.weight")),
        ("mlp.gate_proj.weight", Kind::Plain("ffn_gate.weight")),
        ("mlp.up_proj.weight", Kind::Plain("ffn_up.weight")),
        ("mlp.down_proj.weight", Kind::Plain("ffn_down.weight")),
    ];
    for (h, k) in map {
        if tail == h {
            return Some(match k {
                Kind::Plain(g) => (format!("blk.{idx}.{g}"), None),
                Kind::Q(g) => (format!("blk.{idx}.{g}"), Some(Rows::Q)),
                Kind::K(g) => (format!("blk.{idx}.{g}"), Some(Rows::K)),
            });
        }
    }
    None
}

#[derive(Clone, Copy)]
enum Rows {
    Q,
    K,
}

/// Undoes llama.cpp's `permute`: GGUF row `h*d + 2r + s` holds HF row `h*d + s*(d/2) + r`.
fn unpermute(t: &Tensor, n_heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let head_dim = rows / n_heads;
    let rest: usize = dims[1..].iter().product();
    let t = t
        .reshape((n_heads, head_dim / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(t)
}

impl WeightSource for GgufFile {
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        let Some((g, rows)) = gguf_name(name) else {
            return Ok(None);
        };
        if !self.content.tensor_infos.contains_key(&g) {
            return Ok(None);
        }
        let t = self.read_f32(&g)?;
        let permuted = self.arch_name == "llama" || self.arch_name == "mistral";
        let t = match (rows, permuted) {
            (Some(Rows::Q), true) => unpermute(&t, self.n_heads)?,
            (Some(Rows::K), true) => unpermute(&t, self.n_kv_heads)?,
            _ => t,
        };
        Ok(Some(t))
    }

    fn get_quant(&self, name: &str) -> Result<Option<QRows>> {
        let Some((g, rows)) = gguf_name(name) else {
            return Ok(None);
        };
        let Some(info) = self.content.tensor_infos.get(&g) else {
            return Ok(None);
        };
        let Some(ty) = ggml_name(info.ggml_dtype) else {
            return Ok(None);
        };
        let dims = info.shape.dims();
        let (Some((per, bytes)), [n, k]) = (ggml::block_shape(ty), dims) else {
            return Ok(None);
        };
        let data = self.read_raw(&g, n * k / per * bytes)?;
        let decoded = ggml::decode(ty, &data, *n, *k).ok_or_else(|| {
            EngineError::malformed(&self.path, format!("tensor {g}: unreadable {ty} blocks"))
        })?;
        let permuted = self.arch_name == "llama" || self.arch_name == "mistral";
        Ok(Some(match (rows, permuted) {
            (Some(Rows::Q), true) => decoded.permute(&unpermute_order(*n, self.n_heads)),
            (Some(Rows::K), true) => decoded.permute(&unpermute_order(*n, self.n_kv_heads)),
            _ => decoded,
        }))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// The ggml name of a type this engine keeps quantized.
fn ggml_name(t: GgmlDType) -> Option<&'static str> {
    Some(match t {
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q6K => "Q6_K",
        _ => return None,
    })
}

/// [`unpermute`] as a row order: HF row i is GGUF row `order[i]`.
fn unpermute_order(rows: usize, n_heads: usize) -> Vec<usize> {
    let d = rows / n_heads;
    (0..rows)
        .map(|i| {
            let (h, rem) = (i / d, i % d);
            let (s, r) = (rem / (d / 2), rem % (d / 2));
            h * d + 2 * r + s
        })
        .collect()
}

fn md_get<'a>(md: &'a HashMap<String, Value>, key: &str, path: &Path) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| EngineError::malformed(path, format!("metadata key {key} is missing")))
}

pub(crate) fn md_u32(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<u32> {
    md_get(md, key, path)?
        .to_u32()
        .map_err(|e| EngineError::malformed(path, format!("metadata {key}: {e}")))
}

fn md_f32(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<f32> {
    md_get(md, key, path)?
        .to_f32()
        .map_err(|e| EngineError::malformed(path, format!("metadata {key}: {e}")))
}

fn md_str(md: &HashMap<String, Value>, key: &str, path: &Path) -> Result<String> {
    Ok(md_get(md, key, path)?
        .to_string()
        .map_err(|e| EngineError::malformed(path, format!("metadata {key}: {e}")))?
        .clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // HF rows for 2 heads of dim 4: values = row index.
        let hf = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        // llama.cpp permute: reshape(h, 2, d/2, ..).swapaxes(1, 2)
        let gg = hf
            .reshape((2, 2, 2, 1))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let back = unpermute(&gg, 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            hf.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn unpermute_order_matches_unpermute() {
        let t = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((16, 1))
            .unwrap();
        let back = unpermute(&t, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let order: Vec<f32> = unpermute_order(16, 2).iter().map(|&i| i as f32).collect();
        assert_eq!(back, order);
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").unwrap().0,
            "blk.12.ffn_down.weight"
        );
        assert!(gguf_name("model.layers.x.mlp").is_none());
        assert_eq!(gguf_name("lm_head.weight").unwrap().0, "output.weight");
    }
}
