//! A linear layer `y = x W^T + b` with W in the engine dtype and b in f32, whole or split for
//! tensor parallelism (see `crate::parallel`): column-parallel layers hold a block of output
//! rows; row-parallel layers hold a block of input columns and all-reduce their output (the
//! bias, if any, is added by rank 0 alone, so the sum counts it once). The weight is dense or
//! quantized ([`Matrix`]); a quantized one runs the integer kernels of `kernels::quant`.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use half::{bf16, f16};

use super::Matrix;
use crate::error::{EngineError, Result};
use crate::kernels::{self, with_cpu_slice};
use crate::loader::Weights;
use crate::parallel::{Collective, Shard};

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Tensor>,
    pub in_dim: usize,
    pub out_dim: usize,
    /// Row-parallel layers: the group their partial outputs are summed over.
    pub reduce: Option<Arc<dyn Collective>>,
}

/// How a rank holds a layer.
#[derive(Clone, Copy, Debug)]
pub enum Split<'a> {
    Full,
    /// Output rows `range` of the whole layer.
    Column(&'a Range<usize>),
    /// Input columns `range`; the output is all-reduced over the shard's group.
    Row(&'a Range<usize>, &'a Shard),
}

/// The device of the first dense part (biases are made beside it), or the CPU.
fn b_device(parts: &[Linear]) -> &candle_core::Device {
    parts
        .iter()
        .find_map(|l| match &l.weight {
            Matrix::Dense(t) => Some(t.device()),
            Matrix::Quant(_) => None,
        })
        .unwrap_or(&candle_core::Device::Cpu)
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Linear::from_matrix(Matrix::Dense(weight), bias)
    }

    pub fn from_matrix(weight: Matrix, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims()?;
        if let Some(b) = &bias {
            if b.dims() != [out_dim] {
                return Err(EngineError::Config(format!(
                    "bias of shape {:?} for a [{out_dim}, {in_dim}] weight",
                    b.dims()
                )));
            }
        }
        Ok(Linear {
            weight,
            bias,
            in_dim,
            out_dim,
            reduce: None,
        })
    }

    /// Loads this rank's part of `{name}.weight` [out, in] (and `{name}.bias` [out]).
    pub fn load_split(
        w: &Weights,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        split: Split,
    ) -> Result<Self> {
        match split {
            Split::Full => Linear::load(w, name, in_dim, out_dim, bias),
            Split::Column(rows) => {
                let w = w.pp(name);
                let weight = w.get_part("weight", &[out_dim, in_dim], 0, rows.clone(), false)?;
                let bias = if bias {
                    Some(w.get_part("bias", &[out_dim], 0, rows.clone(), true)?)
                } else {
                    None
                };
                Linear::new(weight, bias)
            }
            Split::Row(cols, shard) => {
                let w = w.pp(name);
                let weight = w.get_part("weight", &[out_dim, in_dim], 1, cols.clone(), false)?;
                let bias = if bias && shard.rank == 0 {
                    Some(w.get_f32("bias", &[out_dim])?)
                } else {
                    None
                };
                let mut l = Linear::new(weight, bias)?;
                l.reduce = shard.comm().cloned();
                Ok(l)
            }
        }
    }

    /// Loads `{name}.weight` [out, in] and, when `bias`, `{name}.bias` [out].
    pub fn load(
        w: &Weights,
        name: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = w.pp(name);
        let weight = w.get_matrix("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get_f32("bias", &[out_dim])?)
        } else {
            None
        };
        Linear::from_matrix(weight, bias)
    }

    /// Concatenates layers along their outputs (q|k|v, gate|up), for one kernel call.
    pub fn fuse(parts: &[Linear]) -> Result<Self> {
        let ws: Vec<&Matrix> = parts.iter().map(|l| &l.weight).collect();
        let weight = Matrix::stack(&ws)?;
        let bias = if parts.iter().any(|l| l.bias.is_some()) {
            let bs = parts
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Ok(Tensor::zeros(l.out_dim, DType::F32, b_device(parts))?),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        };
        Linear::from_matrix(weight, bias)
    }

    /// CPU path: `x` is [m, in_dim] row-major.
    pub fn forward_cpu(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (k, n) = (self.in_dim, self.out_dim);
        let weight = match &self.weight {
            Matrix::Dense(t) => t,
            Matrix::Quant(q) => {
                let mut y = q.matmul(x, m);
                if let Some(b) = &self.bias {
                    with_cpu_slice::<f32, _>(b, |b| {
                        for row in y.chunks_exact_mut(n) {
                            for (v, bj) in row.iter_mut().zip(b) {
                                *v += bj;
                            }
                        }
                    })?;
                }
                if let Some(c) = &self.reduce {
                    c.all_reduce_sum(&mut y)?;
                }
                return Ok(y);
            }
        };
        let run = |bias: Option<&[f32]>| -> Result<Vec<f32>> {
            match weight.dtype() {
                DType::F32 => with_cpu_slice::<f32, _>(weight, |w| {
                    kernels::linear::linear(x, m, k, w, n, bias)
                }),
                DType::BF16 => with_cpu_slice::<bf16, _>(weight, |w| {
                    kernels::linear::linear(x, m, k, w, n, bias)
                }),
                DType::F16 => with_cpu_slice::<f16, _>(weight, |w| {
                    kernels::linear::linear(x, m, k, w, n, bias)
                }),
                other => Err(EngineError::Config(format!(
                    "unsupported weight dtype {other:?}"
                ))),
            }
        };
        let mut y = match &self.bias {
            Some(b) => with_cpu_slice::<f32, _>(b, |b| run(Some(b)))??,
            None => run(None)?,
        };
        if let Some(c) = &self.reduce {
            c.all_reduce_sum(&mut y)?;
        }
        Ok(y)
    }

    /// Device-generic path: `x` is [m, in_dim] f32; the product runs in the weight dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dequantized;
        let weight = match &self.weight {
            Matrix::Dense(t) => t,
            Matrix::Quant(_) => {
                dequantized = self.weight.to_dense(x.device())?;
                &dequantized
            }
        };
        let y = x
            .to_dtype(weight.dtype())?
            .matmul(&weight.t()?)?
            .to_dtype(DType::F32)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.reduce {
            Some(c) => c.all_reduce_tensor(&y),
            None => Ok(y),
        }
    }
}
