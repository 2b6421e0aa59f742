//! RMSNorm (Zhang & Sennrich, 2019), weights in f32.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::kernels::{self, with_cpu_slice};
use crate::loader::Weights;

#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
    pub dim: usize,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.pp(name).get_f32("weight", &[dim])?,
            eps,
            dim,
        })
    }

    pub fn forward_cpu(&self, x: &[f32]) -> Result<Vec<f32>> {
        with_cpu_slice::<f32, _>(&self.weight, |w| {
            kernels::norm::rms_norm(x, self.dim, w, self.eps)
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let ms = x.sqr()?.mean_keepdim(1)?;
        let y = x.broadcast_div(&(ms + self.eps as f64)?.sqrt()?)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}
