//! The EAGLE training loss (Li et al., 2024, "EAGLE: Speculative Sampling Requires Rethinking
//! Feature Uncertainty", section 4.2): a regression of the next feature plus a classification of
//! the next token,
//!
//!   L = SmoothL1(pred_i, f_{i+1}) + w_cls * CE(softmax(lm(f_{i+1})), log_softmax(lm(pred_i)))
//!
//! with w_cls = 0.1, both averaged over the loss-masked positions (SmoothL1 also over the hidden
//! dimension). The classification target is the target's whole next-token distribution (soft
//! labels), not a sampled token. With a reduced draft vocabulary (EAGLE-3) the target
//! distribution is restricted to the draft tokens and renormalised, and the draft logits are the
//! head's own N rows.
//!
//! Invariant: the gradient w.r.t. the predicted features is exactly that of L. The LM heads are
//! frozen, so the classification term's gradient has the closed form
//! `w_cls * (softmax(z) - p) W / n` (z the draft logits, p the soft target, W the draft LM head);
//! it is applied through the linear surrogate `sum(pred * g)` with g held constant. Autograd thus
//! never builds the [n, vocab] graph nor a gradient for the frozen LM head, which keeps training
//! on a large vocabulary cheap on CPU and GPU alike.

use candle_core::{DType, Tensor, D};
use eagle_engine::layers::Linear;

use crate::error::Result;

/// The LM heads the loss reads, all frozen.
pub struct LossHeads {
    /// The target's LM head [V, H]: gives the soft targets and the reference argmax.
    pub target: Linear,
    /// The draft LM head: the target's, or the head's own [N, H] over a reduced vocabulary.
    pub draft: Linear,
    /// With a reduced vocabulary: draft index -> target id, on the device and on the host.
    pub d2t: Option<(Tensor, Vec<u32>)>,
}

/// One batch's loss.
pub struct LossOut {
    /// A scalar whose gradient is the gradient of the loss (not its value).
    pub objective: Tensor,
    /// SmoothL1, mean over rows and dimensions.
    pub vloss: f64,
    /// Soft cross-entropy, mean over rows.
    pub ploss: f64,
    /// Rows whose draft argmax equals the target's argmax.
    pub correct: usize,
    pub rows: usize,
}

impl LossOut {
    pub fn total(&self, w_cls: f64) -> f64 {
        self.vloss + w_cls * self.ploss
    }
}

/// SmoothL1 (beta 1) of `pred - target`, averaged over every element; differentiable.
pub fn smooth_l1(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let ad = (pred - target)?.abs()?;
    let c = ad.minimum(1.0)?;
    // 0.5 d^2 where |d| < 1, |d| - 0.5 elsewhere.
    Ok(((c.sqr()? * 0.5)? + (ad - c)?)?.mean_all()?)
}

/// The loss of predicted features `pred` [n, H] (in the autograd graph) against the target's
/// next features `next` [n, H] (constants), both f32, over the n loss-masked rows.
pub fn eagle_loss(pred: &Tensor, next: &Tensor, heads: &LossHeads, w_cls: f64) -> Result<LossOut> {
    let vloss_t = smooth_l1(pred, next)?;
    let mut out = classification(pred, next, heads, w_cls)?;
    out.objective = (&vloss_t + out.objective)?;
    out.vloss = vloss_t.to_scalar::<f32>()? as f64;
    Ok(out)
}

/// The classification term alone, weighted by `w_cls`: the soft cross-entropy of the draft LM
/// head on `lm_in` [n, H] (in the graph; for EAGLE-3 the head's normalised output) against
/// the target's distribution at `next`. EAGLE-3 trains on this only, summed over the steps of
/// its training-time test; `vloss` is 0.
pub fn classification(
    lm_in: &Tensor,
    next: &Tensor,
    heads: &LossHeads,
    w_cls: f64,
) -> Result<LossOut> {
    let pred = lm_in;
    let n = pred.dim(0)?;
    let target_logits = heads.target.forward(next)?;
    let target_top = target_logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let restricted = match &heads.d2t {
        Some((idx, _)) => target_logits.index_select(idx, 1)?,
        None => target_logits,
    };
    let p = candle_nn::ops::softmax_last_dim(&restricted)?;
    let z = heads.draft.forward(&pred.detach())?;
    let log_q = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let ploss = (&p * &log_q)?.sum(D::Minus1)?.mean_all()?.neg()?;
    let w = heads.draft.weight.dense()?;
    let g = (log_q.exp()? - &p)?
        .to_dtype(w.dtype())?
        .matmul(w)?
        .to_dtype(DType::F32)?;
    let g = (g * (w_cls / n.max(1) as f64))?.detach();
    let objective = (pred * g)?.sum_all()?;
    let draft_top = z.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let correct = draft_top
        .iter()
        .zip(&target_top)
        .filter(|(d, t)| {
            let d = match &heads.d2t {
                Some((_, host)) => host[**d as usize],
                None => **d,
            };
            d == **t
        })
        .count();
    Ok(LossOut {
        objective,
        vloss: 0.0,
        ploss: ploss.to_scalar::<f32>()? as f64,
        correct,
        rows: n,
    })
}
