//! Mixtral's sparse mixture of SwiGLU experts (Jiang et al., 2024, "Mixtral of Experts"; the
//! routing of Shazeer et al., 2017): a replicated router scores the experts, each token keeps
//! its top-k (2 of 8) after a softmax over all experts, the kept weights are renormalised to sum
//! to one, and the token's output is the weighted sum of those experts' outputs, in expert
//! order, as in the Hugging Face reference (`MixtralSparseMoeBlock`).
//!
//! Tensor parallelism splits every expert like a dense MLP (gate/up rows, down columns) and
//! all-reduces the weighted sum once per layer, not once per expert. Each token is routed on its
//! own, so the block keeps the engine's batch invariance.

use candle_core::{DType, Tensor};

use super::mlp::MIXTRAL_EXPERT_NAMES;
use super::{Linear, Mlp};
use crate::error::{EngineError, Result};
use crate::loader::Weights;
use crate::parallel::{Collective, Shard};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct SparseMoe {
    /// The router [experts, hidden], replicated on every rank.
    pub gate: Linear,
    pub experts: Vec<Mlp>,
    pub top_k: usize,
    pub reduce: Option<Arc<dyn Collective>>,
}

impl SparseMoe {
    /// Loads `gate` and `experts.{e}.{w1,w2,w3}` under `w` (HF `block_sparse_moe`).
    pub fn load(
        w: &Weights,
        hidden: usize,
        intermediate: usize,
        experts: usize,
        top_k: usize,
        shard: &Shard,
    ) -> Result<Self> {
        if top_k == 0 || top_k > experts {
            return Err(EngineError::Config(format!(
                "num_experts_per_tok {top_k} must be in 1..={experts}"
            )));
        }
        let gate = Linear::load(w, "gate", hidden, experts, false)?;
        let experts = (0..experts)
            .map(|e| {
                Mlp::load_split(
                    &w.pp(format!("experts.{e}")),
                    MIXTRAL_EXPERT_NAMES,
                    hidden,
                    intermediate,
                    shard,
                    false,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SparseMoe {
            gate,
            experts,
            top_k,
            reduce: shard.comm().cloned(),
        })
    }

    /// Per token, the chosen experts in increasing index order with their weights.
    fn route(&self, logits: &[f32]) -> Vec<Vec<(usize, f32)>> {
        let n = self.experts.len();
        logits
            .chunks_exact(n)
            .map(|row| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
                let z: f32 = e.iter().sum();
                let p: Vec<f32> = e.iter().map(|x| x / z).collect();
                let mut order: Vec<usize> = (0..n).collect();
                // Highest probability first; ties go to the lower index.
                order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
                let mut kept: Vec<(usize, f32)> =
                    order[..self.top_k].iter().map(|&i| (i, p[i])).collect();
                let s: f32 = kept.iter().map(|k| k.1).sum();
                for k in &mut kept {
                    k.1 /= s;
                }
                kept.sort_by_key(|k| k.0);
                kept
            })
            .collect()
    }

    /// Rows routed to each expert, with their weights.
    fn by_expert(&self, routes: &[Vec<(usize, f32)>]) -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut per = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (row, r) in routes.iter().enumerate() {
            for &(e, wgt) in r {
                per[e].0.push(row);
                per[e].1.push(wgt);
            }
        }
        per
    }

    pub fn forward_cpu(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let h = self.gate.in_dim;
        let routes = self.route(&self.gate.forward_cpu(x, m)?);
        let mut out = vec![0f32; m * h];
        for (expert, (rows, wgts)) in self.experts.iter().zip(self.by_expert(&routes)) {
            if rows.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(rows.len() * h);
            for &r in &rows {
                xs.extend_from_slice(&x[r * h..(r + 1) * h]);
            }
            let y = expert.forward_cpu(&xs, rows.len())?;
            for ((&r, wgt), yr) in rows.iter().zip(&wgts).zip(y.chunks_exact(h)) {
                for (o, v) in out[r * h..(r + 1) * h].iter_mut().zip(yr) {
                    *o += wgt * v;
                }
            }
        }
        if let Some(c) = &self.reduce {
            c.all_reduce_sum(&mut out)?;
        }
        Ok(out)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, h) = x.dims2()?;
        let logits = self.gate.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let routes = self.route(&logits);
        let mut out = Tensor::zeros((m, h), DType::F32, x.device())?;
        for (expert, (rows, wgts)) in self.experts.iter().zip(self.by_expert(&routes)) {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let idx = Tensor::from_vec(
                rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                n,
                x.device(),
            )?;
            let wgt = Tensor::from_vec(wgts, (n, 1), x.device())?;
            let y = expert
                .forward(&x.index_select(&idx, 0)?)?
                .broadcast_mul(&wgt)?;
            out = out.index_add(&idx, &y, 0)?;
        }
        match &self.reduce {
            Some(c) => c.all_reduce_tensor(&out),
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_the_top_two_renormalised_in_expert_order() {
        let dev = candle_core::Device::Cpu;
        let gate = Linear::new(Tensor::zeros((4, 2), DType::F32, &dev).unwrap(), None).unwrap();
        let moe = SparseMoe {
            gate,
            experts: vec![dummy_mlp(); 4],
            top_k: 2,
            reduce: None,
        };
        let r = moe.route(&[0.0, 2.0, 1.0, 2.0]);
        let (a, b) = (r[0][0], r[0][1]);
        assert_eq!(
            (a.0, b.0),
            (1, 3),
            "ties keep the lower index, order is by expert"
        );
        assert!((a.1 - 0.5).abs() < 1e-6 && (b.1 - 0.5).abs() < 1e-6);
        let r = moe.route(&[3.0, 0.0, 1.0, -1.0]);
        assert_eq!(r[0].iter().map(|k| k.0).collect::<Vec<_>>(), vec![0, 2]);
        let want = 1.0 / (1.0 + (-2.0f32).exp());
        assert!((r[0][0].1 - want).abs() < 1e-6);
    }

    fn dummy_mlp() -> Mlp {
        let dev = candle_core::Device::Cpu;
        let l = |o, i| Linear::new(Tensor::zeros((o, i), DType::F32, &dev).unwrap(), None).unwrap();
        Mlp {
            gate_up: l(2, 1),
            down: l(1, 1),
            intermediate: 1,
        }
    }
}
