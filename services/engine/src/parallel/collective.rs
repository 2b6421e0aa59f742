//! The collectives a tensor-parallel group needs, behind one trait: an all-reduce (sum) after
//! each row-parallel layer and an all-gather for vocab-parallel logits. Backends: NCCL on CUDA
//! (`nccl` feature) and a TCP backend between processes (crate `eagle-parallel`) for the CPU.
//!
//! Invariant: every rank gets the same bits from a collective (backends sum in a fixed rank
//! order), so ranks never diverge.

use candle_core::{DType, Tensor};

use crate::error::{EngineError, Result};

pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;

    /// Sums `x` elementwise over the ranks, in place.
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()>;

    /// Every rank's `x` (all of one length), concatenated in rank order.
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>>;

    /// [`Collective::all_reduce_sum`] over an f32 tensor. The default goes through host memory.
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let mut v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.all_reduce_sum(&mut v)?;
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }

    /// [`Collective::all_gather`] over an f32 tensor: the result is `[world, ..t.shape()]`.
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let all = self.all_gather(&v)?;
        let mut dims = vec![self.world()];
        dims.extend_from_slice(t.dims());
        Ok(Tensor::from_vec(all, dims, t.device())?)
    }
}

/// The group of one: every collective is the identity.
#[derive(Debug, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _x: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.unsqueeze(0)?)
    }
}

/// The error a backend reports when a peer is gone or misbehaves.
pub fn group_error(msg: impl Into<String>) -> EngineError {
    EngineError::Collective(msg.into())
}
