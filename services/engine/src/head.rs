//! The EAGLE draft head (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature
//! Uncertainty", ICML 2024) in the published checkpoint format.
//!
//! The head predicts the target's next feature from (token, feature) pairs: its input at
//! position i is `fc(concat(embed(token[i+1]), feature[i]))`, run through one decoder layer (the
//! target's own [`DecoderLayer`], without an input norm). The target's embedding and LM head are
//! borrowed, so `lm_head(head_output)` is the draft's next-token distribution.
//!
//! Files: `config.json` (LLaMA-style) and `model.safetensors` or `pytorch_model.bin`, with
//! tensors `fc.weight` [H, 2H], `fc.bias` [H] (optional), `layers.0.self_attn.*`,
//! `layers.0.mlp.*`, `layers.0.post_attention_layernorm.weight`.
//!
//! Optionally a reduced draft vocabulary, as EAGLE-3 heads have (Li et al., 2025): the head's own
//! `lm_head.weight` [N, H] over N target tokens, `d2t` [N] (i64 offsets: draft index i is target
//! id `i + d2t[i]`) and `t2d` [vocab] (bool: which target ids are in the draft vocabulary), with
//! `draft_vocab_size` = N in config.json. The drafter then scores N rows instead of the whole
//! vocabulary; tokens outside them get draft probability zero.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{HfConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::kernels::attention::Visibility;
use crate::kv_cache::KvCache;
use crate::layers::{use_cpu_kernels, DecoderLayer, KvPart, Linear, Rope};
use crate::loader::safetensors::SafetensorsSource;
use crate::loader::{Quant, WeightSource, Weights};
use crate::parallel::Shard;
use crate::sampling::Rng;

pub struct EagleHead {
    pub cfg: ModelConfig,
    pub fc: Linear,
    pub layer: DecoderLayer,
    pub rope: Rope,
    pub device: Device,
    /// A reduced draft vocabulary; `None` drafts over the target's whole vocabulary with the
    /// target's LM head.
    pub draft_vocab: Option<DraftVocab>,
}

/// A reduced draft vocabulary (EAGLE-3): the head's own LM head over N target tokens.
#[derive(Clone, Debug)]
pub struct DraftVocab {
    /// [N, hidden]: row i scores target token `d2t[i]`.
    pub lm_head: Linear,
    /// Draft index -> target id, distinct ids.
    pub d2t: Vec<u32>,
}

impl DraftVocab {
    /// Checks the map against the target vocabulary and the LM head's rows.
    pub fn new(lm_head: Linear, d2t: Vec<u32>, vocab: usize) -> Result<Self> {
        if lm_head.out_dim != d2t.len() || d2t.is_empty() {
            return Err(EngineError::Config(format!(
                "draft vocabulary: lm_head has {} rows but d2t maps {} tokens",
                lm_head.out_dim,
                d2t.len()
            )));
        }
        let mut seen = vec![false; vocab];
        for &t in &d2t {
            let slot = seen.get_mut(t as usize).ok_or_else(|| {
                EngineError::Config(format!(
                    "draft vocabulary maps to token {t}, outside the target vocabulary of {vocab}"
                ))
            })?;
            if *slot {
                return Err(EngineError::Config(format!(
                    "draft vocabulary maps to token {t} twice"
                )));
            }
            *slot = true;
        }
        Ok(DraftVocab { lm_head, d2t })
    }

    /// Adds `lm_head.weight` and `d2t` (EAGLE-3 offsets: draft index i is target id
    /// `i + d2t[i]`) to a published-name tensor map.
    pub fn insert_tensors(&self, map: &mut HashMap<String, Tensor>, device: &Device) -> Result<()> {
        map.insert(
            "lm_head.weight".into(),
            self.lm_head.weight.dense()?.clone(),
        );
        let offsets: Vec<i64> = self
            .d2t
            .iter()
            .enumerate()
            .map(|(i, &t)| t as i64 - i as i64)
            .collect();
        map.insert("d2t".into(), Tensor::new(offsets.as_slice(), device)?);
        Ok(())
    }
}

/// Tensors held in memory (a `pytorch_model.bin`, or a freshly initialised head).
struct MapSource {
    map: HashMap<String, Tensor>,
    desc: String,
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
        let draft_vocab_size = std::fs::read(&cfg_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("draft_vocab_size").and_then(|n| n.as_u64()))
            .map(|n| n as usize);
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
        let head = Self::from_source(src.as_ref(), cfg, dtype, quant, device)?;
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

    /// A head from tensors under their published names (see the module docs), converted to
    /// `dtype` on `device`. Conversions are candle ops, so a head built from trainable
    /// variables is differentiable through [`EagleHead::forward_masked`].
    pub fn from_tensors(
        map: HashMap<String, Tensor>,
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let src = MapSource {
            map,
            desc: "tensors in memory".into(),
        };
        Self::from_source(&src, cfg, dtype, Quant::None, device)
    }

    fn from_source(
        src: &dyn WeightSource,
        cfg: ModelConfig,
        dtype: DType,
        quant: Quant,
        device: &Device,
    ) -> Result<Self> {
        let w = Weights::new(src, dtype, device.clone()).with_quant(quant);
        let h = cfg.hidden_size;
        let fc_w = w.get_matrix("fc.weight", &[h, 2 * h])?;
        let fc_b = w.get_f32_opt("fc.bias", &[h])?;
        // The head's one layer is dense whatever the target (EAGLE's Mixtral heads are too).
        let mut layer_cfg = cfg.clone();
        layer_cfg.arch = crate::config::Arch::Llama;
        let layer = DecoderLayer::load(&w.pp("layers.0"), &layer_cfg, false, &Shard::single())?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let draft_vocab = match src.get("d2t")? {
            None => None,
            Some(d2t) => {
                let offsets = d2t.to_dtype(DType::I64)?.to_vec1::<i64>()?;
                let n = offsets.len();
                let ids = offsets
                    .iter()
                    .enumerate()
                    .map(|(i, &o)| u32::try_from(i as i64 + o))
                    .collect::<std::result::Result<Vec<u32>, _>>()
                    .map_err(|_| {
                        EngineError::Config(format!(
                            "{}: d2t maps a draft index to a negative target id",
                            src.describe()
                        ))
                    })?;
                let lm = w.get_matrix("lm_head.weight", &[n, h])?;
                Some(DraftVocab::new(
                    Linear::from_matrix(lm, None)?,
                    ids,
                    cfg.vocab_size,
                )?)
            }
        };
        Ok(EagleHead {
            fc: Linear::from_matrix(fc_w, fc_b)?,
            layer,
            rope,
            device: device.clone(),
            cfg,
            draft_vocab,
        })
    }

    /// A randomly initialised head for `target` (normal(0, 0.02) weights, unit norms, zero
    /// biases), as the reference implementation initialises before training.
    pub fn init_random(
        target: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let map = random_tensors(target, seed)?;
        let src = MapSource {
            map,
            desc: "a random initialisation".into(),
        };
        let mut cfg = target.clone();
        cfg.num_layers = 1;
        Self::from_source(&src, cfg, dtype, Quant::None, device)
    }

    /// Writes `config.json` and `model.safetensors` in the published format, float tensors in
    /// `dtype` (`d2t` stays i64; `t2d` is written as bool).
    pub fn save(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
        let c = &self.cfg;
        let mut config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
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
    /// offsets `target id - draft index`).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let c = &self.cfg;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        map.insert("fc.weight".into(), self.fc.weight.dense()?.clone());
        if let Some(b) = &self.fc.bias {
            map.insert("fc.bias".into(), b.clone());
        }
        let a = &self.layer.attn;
        let p = "layers.0.self_attn";
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
            "layers.0.mlp.gate_proj.weight".into(),
            m.gate_up.weight.dense()?.narrow(0, 0, f)?,
        );
        map.insert(
            "layers.0.mlp.up_proj.weight".into(),
            m.gate_up.weight.dense()?.narrow(0, f, f)?,
        );
        map.insert(
            "layers.0.mlp.down_proj.weight".into(),
            m.down.weight.dense()?.clone(),
        );
        map.insert(
            "layers.0.post_attention_layernorm.weight".into(),
            self.layer.post_norm.weight.clone(),
        );
        if let Some(dv) = &self.draft_vocab {
            dv.insert_tensors(&mut map, &self.device)?;
        }
        Ok(map)
    }

    fn cpu(&self) -> bool {
        use_cpu_kernels(&self.device)
    }

    /// A preallocated single-layer cache.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        KvCache::new(1, self.cfg.kv_dim(), capacity, &self.device, self.cpu())
    }

    /// Runs the head on `m` pairs: `embeds` [m, H] (the target's embedding of each pair's
    /// token) and `features` [m, H]. Writes the head cache at `cache.len()..` and advances it.
    /// Returns the predicted features [m, H].
    pub fn forward(
        &self,
        cache: &mut KvCache,
        embeds: &Tensor,
        features: &Tensor,
        positions: &[usize],
        vis: &Visibility,
    ) -> Result<Tensor> {
        let mut rows = [HeadRows {
            cache,
            embeds,
            features,
            positions,
            vis,
        }];
        Ok(self.forward_batch(&mut rows)?.remove(0))
    }

    /// One head pass over the pairs of several sessions (the draft service's batch): on the
    /// CPU kernels `fc` and every matmul of the layer run once over all rows, attention per
    /// session over its own cache, so each session gets the bits it gets alone (see
    /// `crate::kernels`). The device path runs the sessions one after another. All row sets are
    /// checked before any runs. Returns each session's predicted features [m_i, H].
    pub fn forward_batch(&self, batch: &mut [HeadRows<'_>]) -> Result<Vec<Tensor>> {
        let h = self.cfg.hidden_size;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        for r in batch.iter() {
            let m = r.embeds.dim(0)?;
            if m == 0 || r.features.dims() != [m, h] || r.positions.len() != m || r.vis.len() != m {
                return Err(EngineError::InvalidRequest(format!(
                    "head: {m} embeddings, features {:?}, {} positions, {} visibility rows",
                    r.features.dims(),
                    r.positions.len(),
                    r.vis.len()
                )));
            }
            r.cache.reserve(m)?;
        }
        if !self.cpu() {
            return batch
                .iter_mut()
                .map(|r| {
                    let start = r.cache.len();
                    let rope = self.rope.at(r.positions);
                    let x = self.fc.forward(&Tensor::cat(&[r.embeds, r.features], 1)?)?;
                    let y = self
                        .layer
                        .forward(&x, &rope, &mut r.cache.layers[0], start, r.vis)?;
                    r.cache.advance(r.positions.len());
                    Ok(y)
                })
                .collect();
        }
        let positions: Vec<usize> = batch
            .iter()
            .flat_map(|r| r.positions.iter().copied())
            .collect();
        let m = positions.len();
        let mut x = Vec::with_capacity(m * 2 * h);
        for r in batch.iter() {
            x.extend(
                Tensor::cat(&[r.embeds, r.features], 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        let x = self.fc.forward_cpu(&x, m)?;
        let rope = self.rope.at(&positions);
        let mut parts: Vec<KvPart<'_>> = batch
            .iter_mut()
            .map(|r| KvPart {
                start: r.cache.len(),
                kv: &mut r.cache.layers[0],
                vis: r.vis,
            })
            .collect();
        let y = self.layer.forward_cpu(x, m, &rope, &mut parts)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut row = 0;
        for r in batch.iter_mut() {
            let n = r.positions.len();
            out.push(Tensor::from_slice(
                &y[row * h..(row + n) * h],
                (n, h),
                &self.device,
            )?);
            r.cache.advance(n);
            row += n;
        }
        Ok(out)
    }

    /// Runs `m` pairs that attend to each other as the additive `mask` [m, m] says (0 visible,
    /// -inf hidden), without a cache, through the device-generic candle ops only, whatever the
    /// device: the whole computation is differentiable, for training. `positions` are the
    /// rotary positions. Returns the predicted features [m, H].
    pub fn forward_masked(
        &self,
        embeds: &Tensor,
        features: &Tensor,
        positions: &[usize],
        mask: &Tensor,
    ) -> Result<Tensor> {
        let rope = self.rope.at(positions);
        let x = Tensor::cat(&[embeds, features], 1)?;
        let x = self.fc.forward(&x)?;
        self.layer.forward_masked(&x, &rope, mask)
    }
}

/// One session's pairs in a head pass: see [`EagleHead::forward`].
pub struct HeadRows<'a> {
    pub cache: &'a mut KvCache,
    /// [m, H]: the target's embedding of each pair's token.
    pub embeds: &'a Tensor,
    /// [m, H]: the feature each pair extends.
    pub features: &'a Tensor,
    pub positions: &'a [usize],
    pub vis: &'a Visibility,
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

/// normal(0, 0.02) matrices, unit norm weights, zero biases, under published tensor names.
fn random_tensors(c: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
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
    let mut m = HashMap::new();
    m.insert("fc.weight".to_string(), normal(h, 2 * h)?);
    m.insert(
        "fc.bias".to_string(),
        Tensor::zeros(h, DType::F32, &Device::Cpu)?,
    );
    let p = "layers.0.self_attn";
    m.insert(format!("{p}.q_proj.weight"), normal(qd, h)?);
    m.insert(format!("{p}.k_proj.weight"), normal(kvd, h)?);
    m.insert(format!("{p}.v_proj.weight"), normal(kvd, h)?);
    m.insert(format!("{p}.o_proj.weight"), normal(h, qd)?);
    if c.attention_bias {
        for (n, d) in [("q_proj", qd), ("k_proj", kvd), ("v_proj", kvd)] {
            m.insert(
                format!("{p}.{n}.bias"),
                Tensor::zeros(d, DType::F32, &Device::Cpu)?,
            );
        }
    }
    m.insert("layers.0.mlp.gate_proj.weight".into(), normal(f, h)?);
    m.insert("layers.0.mlp.up_proj.weight".into(), normal(f, h)?);
    m.insert("layers.0.mlp.down_proj.weight".into(), normal(h, f)?);
    m.insert(
        "layers.0.post_attention_layernorm.weight".into(),
        Tensor::ones(h, DType::F32, &Device::Cpu)?,
    );
    Ok(m)
}
