//! A weight matrix [out, in] as a layer holds it: a dense tensor in the engine dtype (any
//! device), or quantized blocks that stay quantized (the CPU kernels of `kernels::quant`).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::kernels::quant::QMatrix;

#[derive(Clone, Debug)]
pub enum Matrix {
    Dense(Tensor),
    Quant(Arc<QMatrix>),
}

impl Matrix {
    /// (rows, columns) = (out, in).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Matrix::Dense(t) => Ok(t.dims2()?),
            Matrix::Quant(q) => Ok((q.n, q.k)),
        }
    }

    /// The dense tensor; quantized weights are refused (saving a head, training).
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Matrix::Dense(t) => Ok(t),
            Matrix::Quant(q) => Err(EngineError::Config(format!(
                "this needs dense weights, but the matrix is quantized ({}): load with --dtype \
                 f32, bf16 or f16",
                q.describe()
            ))),
        }
    }

    /// Dequantized to an f32 tensor (the device-generic path over quantized weights: tests).
    pub fn to_dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            Matrix::Dense(t) => Ok(t.clone()),
            Matrix::Quant(q) => {
                let mut v = vec![0f32; q.n * q.k];
                for (r, row) in v.chunks_exact_mut(q.k).enumerate() {
                    q.dequantize_row(r, row);
                }
                Ok(Tensor::from_vec(v, (q.n, q.k), device)?)
            }
        }
    }

    /// What the weights are, for logs: `bf16`, `Q4_1`, `Q4_K+Q6_K`, ...
    pub fn describe(&self) -> String {
        match self {
            Matrix::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Matrix::Quant(q) => q.describe(),
        }
    }

    /// Bytes one pass over the matrix reads.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Matrix::Quant(q) => q.bytes(),
        }
    }

    /// Stacks matrices along their outputs (q|k|v, gate|up). Quantized parts stay quantized;
    /// a mix of dense and quantized becomes dense f32.
    pub fn stack(parts: &[&Matrix]) -> Result<Matrix> {
        let quant: Vec<&QMatrix> = parts
            .iter()
            .filter_map(|m| match m {
                Matrix::Quant(q) => Some(q.as_ref()),
                Matrix::Dense(_) => None,
            })
            .collect();
        if quant.len() == parts.len() {
            if let Some(q) = QMatrix::stack(&quant) {
                return Ok(Matrix::Quant(Arc::new(q)));
            }
        }
        let dense = parts
            .iter()
            .map(|m| match m {
                Matrix::Dense(t) if quant.is_empty() => Ok(t.clone()),
                other => Ok(other.to_dense(&Device::Cpu)?.to_dtype(DType::F32)?),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Matrix::Dense(Tensor::cat(&dense, 0)?))
    }
}
