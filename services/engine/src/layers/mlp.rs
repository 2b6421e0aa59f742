//! The SwiGLU feed-forward block (Shazeer, 2020): down(silu(gate(x)) * up(x)).

use candle_core::Tensor;

use super::linear::Split;
use super::Linear;
use crate::error::Result;
use crate::loader::Weights;
use crate::parallel::Shard;

#[derive(Clone, Debug)]
pub struct Mlp {
    /// gate and up fused along the output dimension.
    pub gate_up: Linear,
    pub down: Linear,
    pub intermediate: usize,
}

#[inline]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// HF names of the three projections: LLaMA/Qwen2 MLPs, and Mixtral experts (w1, w3, w2).
pub const LLAMA_NAMES: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
pub const MIXTRAL_EXPERT_NAMES: [&str; 3] = ["w1", "w3", "w2"];

impl Mlp {
    pub fn load(w: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        Mlp::load_split(w, LLAMA_NAMES, hidden, intermediate, &Shard::single(), true)
    }

    /// Loads `[gate, up, down]` under `w`. A sharded rank holds its block of the intermediate
    /// width (gate/up rows, down columns); `reduce` says whether the down projection
    /// all-reduces (a Mixtral expert leaves that to its block, once for all experts).
    pub fn load_split(
        w: &Weights,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        intermediate: usize,
        shard: &Shard,
        reduce: bool,
    ) -> Result<Self> {
        let cols = shard.block(intermediate);
        let (col, row) = if shard.is_sharded() {
            (Split::Column(&cols), Split::Row(&cols, shard))
        } else {
            (Split::Full, Split::Full)
        };
        let gate = Linear::load_split(w, gate, hidden, intermediate, false, col)?;
        let up = Linear::load_split(w, up, hidden, intermediate, false, col)?;
        let mut down = Linear::load_split(w, down, intermediate, hidden, false, row)?;
        if !reduce {
            down.reduce = None;
        }
        Ok(Mlp {
            gate_up: Linear::fuse(&[gate, up])?,
            down,
            intermediate: cols.len(),
        })
    }

    pub fn forward_cpu(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let f = self.intermediate;
        let gu = self.gate_up.forward_cpu(x, m)?;
        let mut h = Vec::with_capacity(m * f);
        for row in gu.chunks_exact(2 * f) {
            let (g, u) = row.split_at(f);
            h.extend(g.iter().zip(u).map(|(g, u)| silu(*g) * u));
        }
        self.down.forward_cpu(&h, m)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = self.intermediate;
        let gu = self.gate_up.forward(x)?;
        let g = gu.narrow(1, 0, f)?;
        let u = gu.narrow(1, f, f)?;
        let silu = g.silu()?;
        self.down.forward(&(silu * u)?)
    }
}
