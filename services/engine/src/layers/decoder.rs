//! The pre-norm decoder layer of LLaMA / Qwen2, shared by targets and the EAGLE head.
//! x = x + attn(norm1(x)); x = x + mlp(norm2(x)). EAGLE heads have no `norm1`.

use candle_core::Tensor;

use super::{Attention, Mlp, RmsNorm, RopeAt};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::attention::Visibility;
use crate::kv_cache::LayerKv;
use crate::loader::Weights;

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_norm: Option<RmsNorm>,
    pub attn: Attention,
    pub post_norm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// Loads one layer under `w` (e.g. `model.layers.3`).
    pub fn load(w: &Weights, cfg: &ModelConfig, input_norm: bool) -> Result<Self> {
        let h = cfg.hidden_size;
        let input_norm = if input_norm {
            Some(RmsNorm::load(w, "input_layernorm", h, cfg.rms_norm_eps)?)
        } else {
            None
        };
        Ok(DecoderLayer {
            input_norm,
            attn: Attention::load(&w.pp("self_attn"), cfg, h)?,
            post_norm: RmsNorm::load(w, "post_attention_layernorm", h, cfg.rms_norm_eps)?,
            mlp: Mlp::load(&w.pp("mlp"), h, cfg.intermediate_size)?,
        })
    }

    pub fn forward_cpu(
        &self,
        mut x: Vec<f32>,
        m: usize,
        rope: &RopeAt,
        kv: &mut LayerKv,
        start: usize,
        vis: &Visibility,
    ) -> Result<Vec<f32>> {
        let a = match &self.input_norm {
            Some(n) => self
                .attn
                .forward_cpu(&n.forward_cpu(&x)?, m, rope, kv, start, vis)?,
            None => self.attn.forward_cpu(&x, m, rope, kv, start, vis)?,
        };
        for (xi, ai) in x.iter_mut().zip(&a) {
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
        self.residual(x, |h| self.attn.forward(h, rope, kv, start, vis))
    }

    /// Device-generic path without a cache, rows attending as the additive `mask` [m, m] says;
    /// differentiable end to end (see [`Attention::forward_masked`]).
    pub fn forward_masked(&self, x: &Tensor, rope: &RopeAt, mask: &Tensor) -> Result<Tensor> {
        self.residual(x, |h| self.attn.forward_masked(h, rope, mask))
    }

    /// The layer's residual structure around an attention function.
    fn residual(&self, x: &Tensor, attn: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let a = match &self.input_norm {
            Some(n) => attn(&n.forward(x)?)?,
            None => attn(x)?,
        };
        let x = (x + a)?;
        let f = self.mlp.forward(&self.post_norm.forward(&x)?)?;
        Ok((x + f)?)
    }
}
