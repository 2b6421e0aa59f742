//! NCCL collectives for CUDA ranks, through the cudarc that candle is built on
//! (`candle_core::cuda_backend::cudarc::nccl`). Rank 0 makes the group's unique id and hands its
//! 128 bytes to the other ranks (over the group's command channel, or etcd); each rank then
//! joins with its own CUDA device. Tensors stay on the GPU: the collectives are candle custom
//! ops that call NCCL on the device buffers, on the device's stream.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::collective::group_error;
use super::Collective;
use crate::error::Result;

pub struct Nccl {
    comm: Mutex<Comm>,
    rank: usize,
    world: usize,
    device: Device,
}

// SAFETY: the communicator is only used under the mutex, one collective at a time, which is
// what NCCL asks of a communicator shared between threads.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl(rank {} of {})", self.rank, self.world)
    }
}

/// A fresh group id, made by rank 0.
pub fn unique_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| group_error(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

impl Nccl {
    /// Joins rank `rank` of `world` on the CUDA `device` with rank 0's id.
    pub fn new(device: &Device, rank: usize, world: usize, id: &[u8]) -> Result<Nccl> {
        let Device::Cuda(d) = device else {
            return Err(group_error("NCCL needs a CUDA device"));
        };
        if id.len() != 128 {
            return Err(group_error(format!(
                "an NCCL id has 128 bytes, got {}",
                id.len()
            )));
        }
        let mut raw = [0 as std::ffi::c_char; 128];
        for (r, b) in raw.iter_mut().zip(id) {
            *r = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(d.cuda_stream(), rank, world, Id::uninit(raw)).map_err(|e| {
            group_error(format!("ncclCommInitRank (rank {rank} of {world}): {e:?}"))
        })?;
        Ok(Nccl {
            comm: Mutex::new(comm),
            rank,
            world,
            device: device.clone(),
        })
    }
}

struct AllReduce<'a>(&'a Nccl);
struct AllGather<'a>(&'a Nccl);

fn on_gpu_only(name: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name}: NCCL runs on CUDA tensors only"))
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: {e:?}"))
}

impl CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(on_gpu_only(self.name()))
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-reduce of a strided tensor".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        // SAFETY: every element is written by the all-reduce before anyone reads it.
        let mut dst = unsafe { dev.alloc::<f32>(end - start) }?;
        self.0
            .comm
            .lock()
            .unwrap()
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl CustomOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(on_gpu_only(self.name()))
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("all-gather of a strided tensor".into()))?;
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device().clone();
        // SAFETY: the all-gather writes every element.
        let mut dst = unsafe { dev.alloc::<f32>((end - start) * self.0.world) }?;
        self.0
            .comm
            .lock()
            .unwrap()
            .all_gather(&src, &mut dst)
            .map_err(|e| nccl_err("ncclAllGather", e))?;
        let mut dims = vec![self.0.world];
        dims.extend_from_slice(l.dims());
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), Shape::from(dims)))
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        let t = Tensor::from_slice(x, x.len(), &self.device)?;
        let y = self.all_reduce_tensor(&t)?.to_vec1::<f32>()?;
        x.copy_from_slice(&y);
        Ok(())
    }
    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(x, x.len(), &self.device)?;
        Ok(self
            .all_gather_tensor(&t)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        t.apply_op1_no_bwd(&AllReduce(self))
            .map_err(|e| group_error(format!("NCCL: {e}")))
    }
    fn all_gather_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
        t.apply_op1_no_bwd(&AllGather(self))
            .map_err(|e| group_error(format!("NCCL: {e}")))
    }
}
