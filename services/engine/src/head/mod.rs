//! The EAGLE draft head (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature
//! Uncertainty", ICML 2024; EAGLE-3, 2025) in the published checkpoint format.
//!
//! An EAGLE-1/2 head predicts the target's next feature from (token, feature) pairs: its input
//! at position i is `fc(concat(embed(token[i+1]), feature[i]))`, run through one decoder layer
//! (the target's own [`DecoderLayer`], without an input norm). The target's embedding and LM
//! head are borrowed, so `lm_head(head_output)` is the draft's next-token distribution.
//! An EAGLE-3 head fuses three target layers with `fc` first ([`EagleHead::fuse`]), feeds the
//! same layer `[embedding, feature]` side by side and has its own output norm and LM head
//! (`eagle3.rs`). Both feed their own output back as the feature of the next draft step.
//!
//! Invariant: a head pass over the rows of several sessions gives each session the bits it
//! gets alone (on the CPU kernels every row is computed independently; attention stays within
//! a session's cache), and the CPU and device-generic paths compute the same function.
//!
//! Files (`files.rs`): `config.json` (LLaMA-style; `architectures` says the kind) and
//! `model.safetensors` or `pytorch_model.bin`, with tensors `fc.weight` [H, 2H], `fc.bias` [H]
//! (optional), `layers.0.self_attn.*`, `layers.0.mlp.*`,
//! `layers.0.post_attention_layernorm.weight`; EAGLE-3: `fc.weight` [H, 3H], `midlayer.*`
//! (q/k/v over 2H, plus `input_layernorm` and `hidden_norm`) and `norm.weight`.
//!
//! Optionally a reduced draft vocabulary, as EAGLE-3 heads have (Li et al., 2025): the head's own
//! `lm_head.weight` [N, H] over N target tokens, `d2t` [N] (i64 offsets: draft index i is target
//! id `i + d2t[i]`) and `t2d` [vocab] (bool: which target ids are in the draft vocabulary), with
//! `draft_vocab_size` = N in config.json. The drafter then scores N rows instead of the whole
//! vocabulary; tokens outside them get draft probability zero.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kernels::attention::Visibility;
use crate::kv_cache::KvCache;
use crate::layers::{use_cpu_kernels, DecoderLayer, KvPart, Linear, RmsNorm, Rope, TttKv};
use crate::loader::{Quant, WeightSource, Weights};
use crate::parallel::Shard;

mod eagle3;
mod files;
mod init;
mod vocab;

pub use eagle3::{draft_features, Eagle3Norms, HeadKind};
pub use files::hf_dtype_name;
use files::{layer_prefix, MapSource};
pub use vocab::DraftVocab;

pub struct EagleHead {
    pub cfg: ModelConfig,
    pub fc: Linear,
    pub layer: DecoderLayer,
    pub rope: Rope,
    pub device: Device,
    /// A reduced draft vocabulary; `None` drafts over the target's whole vocabulary with the
    /// target's LM head.
    pub draft_vocab: Option<DraftVocab>,
    /// EAGLE-1/2 or EAGLE-3 (and which target layers it reads).
    pub kind: HeadKind,
    /// An EAGLE-3 head's norms (`None` for EAGLE-1/2).
    pub eagle3: Option<Eagle3Norms>,
}

impl EagleHead {
    /// A head of `kind` from tensors under their published names (see the module docs),
    /// converted to `dtype` on `device`. Conversions are candle ops, so a head built from
    /// trainable variables is differentiable through [`EagleHead::forward_masked`].
    pub fn from_tensors(
        map: HashMap<String, Tensor>,
        cfg: ModelConfig,
        kind: HeadKind,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let src = MapSource {
            map,
            desc: "tensors in memory".into(),
        };
        Self::from_source(&src, cfg, kind, dtype, Quant::None, device)
    }

    fn from_source(
        src: &dyn WeightSource,
        cfg: ModelConfig,
        kind: HeadKind,
        dtype: DType,
        quant: Quant,
        device: &Device,
    ) -> Result<Self> {
        let w = Weights::new(src, dtype, device.clone()).with_quant(quant);
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let l = layer_prefix(&kind);
        let (fc_in, attn_in, eagle3) = match kind {
            HeadKind::Eagle => (2 * h, h, None),
            HeadKind::Eagle3 { .. } => (
                3 * h,
                2 * h,
                Some(Eagle3Norms {
                    embed: RmsNorm::load(&w.pp(l), "input_layernorm", h, eps)?,
                    hidden: RmsNorm::load(&w.pp(l), "hidden_norm", h, eps)?,
                    output: RmsNorm::load(&w, "norm", h, eps)?,
                }),
            ),
        };
        let fc_w = w.get_matrix("fc.weight", &[h, fc_in])?;
        let fc_b = w.get_f32_opt("fc.bias", &[h])?;
        // The head's one layer is dense whatever the target (EAGLE's Mixtral heads are too).
        let mut layer_cfg = cfg.clone();
        layer_cfg.arch = crate::config::Arch::Llama;
        let layer =
            DecoderLayer::load_reading(&w.pp(l), &layer_cfg, false, &Shard::single(), attn_in)?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let draft_vocab = match src.get("d2t")? {
            None if eagle3.is_some() && src.get("lm_head.weight")?.is_some() => {
                return Err(EngineError::Config(format!(
                    "{}: an EAGLE-3 head with lm_head.weight but no d2t (the map from its \
                     LM head's rows to target ids)",
                    src.describe()
                )))
            }
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
            kind,
            eagle3,
        })
    }

    /// A randomly initialised EAGLE-1/2 head for `target`: see [`EagleHead::init_random_kind`].
    pub fn init_random(
        target: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::init_random_kind(target, HeadKind::Eagle, seed, dtype, device)
    }

    /// A randomly initialised head of `kind` for `target` (normal(0, 0.02) weights, unit
    /// norms, zero biases), as the reference implementation initialises before training.
    pub fn init_random_kind(
        target: &ModelConfig,
        kind: HeadKind,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        kind.check(target.num_layers)?;
        let map = init::random_tensors(target, &kind, seed)?;
        let src = MapSource {
            map,
            desc: "a random initialisation".into(),
        };
        let mut cfg = target.clone();
        cfg.num_layers = 1;
        Self::from_source(&src, cfg, kind, dtype, Quant::None, device)
    }

    /// Values per token of the target features this head reads: H, or 3H for EAGLE-3.
    pub fn feature_width(&self) -> usize {
        self.kind.feature_width(self.cfg.hidden_size)
    }

    /// The head's feature [m, H] of each target feature row [m, feature width]: EAGLE-3 fuses
    /// its three layers with `fc` (on the CPU kernels, row by row); EAGLE-1/2 features are used
    /// as they are.
    pub fn fuse(&self, target_features: &Tensor) -> Result<Tensor> {
        let (_, w) = target_features.dims2()?;
        if w != self.feature_width() {
            return Err(EngineError::InvalidRequest(format!(
                "the head reads target features of width {}, got {w}",
                self.feature_width()
            )));
        }
        if self.eagle3.is_none() {
            return Ok(target_features.clone());
        }
        // The same CPU-kernel-or-candle application of a linear map the LM heads use.
        crate::models::target::lm_head(&self.fc, target_features, self.cpu())
    }

    /// [`EagleHead::fuse`] through differentiable candle ops only (training).
    pub fn fuse_masked(&self, target_features: &Tensor) -> Result<Tensor> {
        match self.eagle3 {
            None => Ok(target_features.clone()),
            Some(_) => self.fc.forward(target_features),
        }
    }

    /// What the LM head reads of head outputs [m, H]: EAGLE-3's output norm applied (on the
    /// CPU kernels, row by row), or the outputs themselves.
    pub fn lm_input(&self, hidden: &Tensor) -> Result<Tensor> {
        let Some(n) = &self.eagle3 else {
            return Ok(hidden.clone());
        };
        if !self.cpu() {
            return n.output.forward(hidden);
        }
        let x = hidden.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let y = n.output.forward_cpu(&x)?;
        Ok(Tensor::from_vec(y, hidden.dims(), &self.device)?)
    }

    /// [`EagleHead::lm_input`] through differentiable candle ops only (training).
    pub fn lm_input_masked(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.eagle3 {
            None => Ok(hidden.clone()),
            Some(n) => n.output.forward(hidden),
        }
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
                    let kv = &mut r.cache.layers[0];
                    let y = match self.layer_inputs(r.embeds, r.features)? {
                        (x, None) => self.layer.forward(&x, &rope, kv, start, r.vis)?,
                        (x, Some(a)) => self
                            .layer
                            .forward_reading(&x, &a, &rope, kv, start, r.vis)?,
                    };
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
        let (mut e, mut f) = (Vec::with_capacity(m * h), Vec::with_capacity(m * h));
        for r in batch.iter() {
            e.extend(r.embeds.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
            f.extend(r.features.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
        }
        let (x, attn_in) = self.layer_inputs_cpu(&e, f, m)?;
        let rope = self.rope.at(&positions);
        let mut parts: Vec<KvPart<'_>> = batch
            .iter_mut()
            .map(|r| KvPart {
                start: r.cache.len(),
                kv: &mut r.cache.layers[0],
                vis: r.vis,
            })
            .collect();
        let y = match attn_in {
            None => self.layer.forward_cpu(x, m, &rope, &mut parts)?,
            Some(a) => self
                .layer
                .forward_cpu_reading(x, &a, m, &rope, &mut parts)?,
        };
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
        match self.layer_inputs(embeds, features)? {
            (x, None) => self.layer.forward_masked(&x, &rope, mask),
            (x, Some(a)) => self.layer.forward_masked_reading(&x, &a, &rope, mask),
        }
    }

    /// One step of a training-time test over `m` rows (EAGLE-3's training; see
    /// [`crate::layers::Attention::forward_ttt`]): the first call attends as `mask` says, each
    /// later one also to its own row of the steps since; `positions` move on by one a step.
    /// Returns the head outputs [m, H]; differentiable.
    pub fn forward_ttt(
        &self,
        embeds: &Tensor,
        features: &Tensor,
        positions: &[usize],
        mask: &Tensor,
        past: &mut TttKv,
    ) -> Result<Tensor> {
        let rope = self.rope.at(positions);
        let (x, a) = self.layer_inputs(embeds, features)?;
        self.layer.forward_ttt(&x, a.as_ref(), &rope, mask, past)
    }

    /// The decoder layer's residual stream and, for EAGLE-3, what its attention reads, from
    /// embeddings and features [m, H]: EAGLE-1/2 `fc(concat(e, f))` alone; EAGLE-3 `f` with
    /// `concat(embed_norm(e), hidden_norm(f))`. Candle ops (device path and training).
    fn layer_inputs(&self, embeds: &Tensor, features: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match &self.eagle3 {
            None => Ok((
                self.fc.forward(&Tensor::cat(&[embeds, features], 1)?)?,
                None,
            )),
            Some(n) => {
                let a = Tensor::cat(&[n.embed.forward(embeds)?, n.hidden.forward(features)?], 1)?;
                Ok((features.clone(), Some(a)))
            }
        }
    }

    /// [`EagleHead::layer_inputs`] on the CPU kernels, over `m` rows of embeddings `e` and
    /// features `f`, row-major.
    fn layer_inputs_cpu(
        &self,
        e: &[f32],
        f: Vec<f32>,
        m: usize,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let h = self.cfg.hidden_size;
        let side_by_side = |a: &[f32], b: &[f32]| -> Vec<f32> {
            let mut x = Vec::with_capacity(m * 2 * h);
            for (ra, rb) in a.chunks_exact(h).zip(b.chunks_exact(h)) {
                x.extend_from_slice(ra);
                x.extend_from_slice(rb);
            }
            x
        };
        match &self.eagle3 {
            None => Ok((self.fc.forward_cpu(&side_by_side(e, &f), m)?, None)),
            Some(n) => {
                let a = side_by_side(&n.embed.forward_cpu(e)?, &n.hidden.forward_cpu(&f)?);
                Ok((f, Some(a)))
            }
        }
    }
}

/// One session's pairs in a head pass: see [`EagleHead::forward`].
pub struct HeadRows<'a> {
    pub cache: &'a mut KvCache,
    /// [m, H]: the target's embedding of each pair's token.
    pub embeds: &'a Tensor,
    /// [m, H]: the feature each pair extends (fused already for EAGLE-3: see
    /// [`EagleHead::fuse`]).
    pub features: &'a Tensor,
    pub positions: &'a [usize],
    pub vis: &'a Visibility,
}
