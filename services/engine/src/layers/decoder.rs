//! The pre-norm decoder layer of LLaMA / Qwen2, shared by targets and the EAGLE heads.
//! x = x + attn(norm1(x)); x = x + mlp(norm2(x)). EAGLE-1/2 heads have no `norm1`; an EAGLE-3
//! head's attention reads a wider input than the residual stream (its embedding and feature
//! side by side, each normalised by the head: the `*_reading` paths), x = x + attn(a).
//! Mixtral's layer is the same with routed experts in place of the MLP.

use candle_core::Tensor;

use super::attention::TttKv;
use super::{Attention, KvPart, Mlp, RmsNorm, RopeAt, SparseMoe};
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::kernels::attention::Visibility;
use crate::kv_cache::LayerKv;
use crate::loader::Weights;
use crate::parallel::Shard;

/// The feed-forward half of a layer: a dense SwiGLU MLP, or Mixtral's routed experts.
#[derive(Clone, Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    pub fn forward_cpu(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        match self {
            FeedForward::Dense(f) => f.forward_cpu(x, m),
            FeedForward::Sparse(f) => f.forward_cpu(x, m),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(f) => f.forward(x),
            FeedForward::Sparse(f) => f.forward(x),
        }
    }

    /// The dense MLP (EAGLE heads and the models they serve), if this is one.
    pub fn dense(&self) -> Option<&Mlp> {
        match self {
            FeedForward::Dense(f) => Some(f),
            FeedForward::Sparse(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_norm: Option<RmsNorm>,
    pub attn: Attention,
    pub post_norm: RmsNorm,
    pub mlp: FeedForward,
}

impl DecoderLayer {
    /// Loads one layer under `w` (e.g. `model.layers.3`): this rank's part of it when `shard`
    /// is one of a tensor-parallel group (norms are replicated).
    pub fn load(w: &Weights, cfg: &ModelConfig, input_norm: bool, shard: &Shard) -> Result<Self> {
        Self::load_reading(w, cfg, input_norm, shard, cfg.hidden_size)
    }

    /// [`DecoderLayer::load`] with an attention that reads `attn_in` columns (2H for EAGLE-3).
    pub fn load_reading(
        w: &Weights,
        cfg: &ModelConfig,
        input_norm: bool,
        shard: &Shard,
        attn_in: usize,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let input_norm = if input_norm {
            Some(RmsNorm::load(w, "input_layernorm", h, cfg.rms_norm_eps)?)
        } else {
            None
        };
        Ok(DecoderLayer {
            input_norm,
            attn: Attention::load(&w.pp("self_attn"), cfg, attn_in, shard)?,
            post_norm: RmsNorm::load(w, "post_attention_layernorm", h, cfg.rms_norm_eps)?,
            mlp: if cfg.arch == Arch::Mixtral {
                FeedForward::Sparse(SparseMoe::load(
                    &w.pp("block_sparse_moe"),
                    h,
                    cfg.intermediate_size,
                    cfg.num_experts,
                    cfg.num_experts_per_tok,
                    shard,
                )?)
            } else {
                FeedForward::Dense(Mlp::load_split(
                    &w.pp("mlp"),
                    super::mlp::LLAMA_NAMES,
                    h,
                    cfg.intermediate_size,
                    shard,
                    true,
                )?)
            },
        })
    }

    /// CPU path over the rows of one or more sequences (see [`Attention::forward_cpu`]): every
    /// step but attention runs row by row over the whole batch.
    pub fn forward_cpu(
        &self,
        x: Vec<f32>,
        m: usize,
        rope: &RopeAt,
        parts: &mut [KvPart<'_>],
    ) -> Result<Vec<f32>> {
        let a = match &self.input_norm {
            Some(n) => self.attn.forward_cpu(&n.forward_cpu(&x)?, m, rope, parts)?,
            None => self.attn.forward_cpu(&x, m, rope, parts)?,
        };
        self.finish_cpu(x, &a, m)
    }

    /// [`DecoderLayer::forward_cpu`] with attention reading `attn_in` [m, attention width]
    /// instead of the residual stream `x` (EAGLE-3).
    pub fn forward_cpu_reading(
        &self,
        x: Vec<f32>,
        attn_in: &[f32],
        m: usize,
        rope: &RopeAt,
        parts: &mut [KvPart<'_>],
    ) -> Result<Vec<f32>> {
        let a = self.attn.forward_cpu(attn_in, m, rope, parts)?;
        self.finish_cpu(x, &a, m)
    }

    /// The rest of the layer after attention: both residual additions and the MLP.
    fn finish_cpu(&self, mut x: Vec<f32>, a: &[f32], m: usize) -> Result<Vec<f32>> {
        for (xi, ai) in x.iter_mut().zip(a) {
            *xi += ai;
        }
        let f = self.mlp.forward_cpu(&self.post_norm.forward_cpu(&x)?, m)?;
        for (xi, fi) in x.iter_mut().zip(&f) {
            *xi += fi;
        }
        Ok(x)
    }

    /// Device-generic path over a [`LayerKv`] cache.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        kv: &mut LayerKv,
        start: usize,
        vis: &Visibility,
    ) -> Result<Tensor> {
        self.residual(x, None, |h| self.attn.forward(h, rope, kv, start, vis))
    }

    /// [`DecoderLayer::forward`] with attention reading `attn_in` (EAGLE-3).
    pub fn forward_reading(
        &self,
        x: &Tensor,
        attn_in: &Tensor,
        rope: &RopeAt,
        kv: &mut LayerKv,
        start: usize,
        vis: &Visibility,
    ) -> Result<Tensor> {
        self.residual(x, Some(attn_in), |h| {
            self.attn.forward(h, rope, kv, start, vis)
        })
    }

    /// Device-generic path without a cache, rows attending as the additive `mask` [m, m] says;
    /// differentiable end to end (see [`Attention::forward_masked`]).
    pub fn forward_masked(&self, x: &Tensor, rope: &RopeAt, mask: &Tensor) -> Result<Tensor> {
        self.residual(x, None, |h| self.attn.forward_masked(h, rope, mask))
    }

    /// [`DecoderLayer::forward_masked`] with attention reading `attn_in` (EAGLE-3).
    pub fn forward_masked_reading(
        &self,
        x: &Tensor,
        attn_in: &Tensor,
        rope: &RopeAt,
        mask: &Tensor,
    ) -> Result<Tensor> {
        self.residual(x, Some(attn_in), |h| {
            self.attn.forward_masked(h, rope, mask)
        })
    }

    /// One step of a training-time test (see [`Attention::forward_ttt`]), attention reading
    /// `attn_in` when given (EAGLE-3); differentiable.
    pub fn forward_ttt(
        &self,
        x: &Tensor,
        attn_in: Option<&Tensor>,
        rope: &RopeAt,
        mask: &Tensor,
        past: &mut TttKv,
    ) -> Result<Tensor> {
        self.residual(x, attn_in, |h| self.attn.forward_ttt(h, rope, mask, past))
    }

    /// The layer's residual structure around an attention function, which reads `attn_in`
    /// when given, else the (normalised) residual stream.
    fn residual(
        &self,
        x: &Tensor,
        attn_in: Option<&Tensor>,
        attn: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let a = match (attn_in, &self.input_norm) {
            (Some(a), _) => attn(a)?,
            (None, Some(n)) => attn(&n.forward(x)?)?,
            (None, None) => attn(x)?,
        };
        let x = (x + a)?;
        let f = self.mlp.forward(&self.post_norm.forward(&x)?)?;
        Ok((x + f)?)
    }
}
