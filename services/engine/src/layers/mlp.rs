//! The SwiGLU feed-forward block (Shazeer, 2020): down(silu(gate(x)) * up(x)).

use candle_core::Tensor;

use super::Linear;
use crate::error::Result;
use crate::loader::Weights;

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

impl Mlp {
    pub fn load(w: &Weights, hidden: usize, intermediate: usize) -> Result<Self> {
        let gate = Linear::load(w, "gate_proj", hidden, intermediate, false)?;
        let up = Linear::load(w, "up_proj", hidden, intermediate, false)?;
        let down = Linear::load(w, "down_proj", intermediate, hidden, false)?;
        Ok(Mlp {
            gate_up: Linear::fuse(&[gate, up])?,
            down,
            intermediate,
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
