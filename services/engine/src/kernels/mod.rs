//! CPU kernels that keep the "same numbers for the same token" invariant.
//!
//! Invariant: the value computed for one row (one token) never depends on which other rows
//! ride in the same call. Every reduction runs in a fixed order that depends only on the
//! reduced length, never on the batch size, and every multiply-add is a fused `mul_add`
//! (exactly rounded whether or not the CPU has FMA). So a token verified inside a draft tree
//! gets bit-identical features and logits to the same token decoded alone, and greedy EAGLE
//! output cannot drift from vanilla greedy output on near-ties.
//!
//! Idea: batch-invariant kernels as argued by He et al., "Defeating Nondeterminism in LLM
//! Inference" (Thinking Machines, 2025); here made exact by construction rather than by
//! tuning tile sizes.

pub mod attention;
pub mod dot;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod quant;
pub mod softmax;

use candle_core::{Storage, Tensor, WithDType};

use crate::error::{EngineError, Result};

/// Runs `f` on the contiguous CPU data of `t`. Errors for non-CPU or non-contiguous tensors.
pub(crate) fn with_cpu_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data: &[T] = cpu.as_slice::<T>()?;
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                EngineError::Config("kernel input must be contiguous".to_string())
            })?;
            Ok(f(&data[start..end]))
        }
        _ => Err(EngineError::Config(
            "CPU kernel called on a non-CPU tensor".to_string(),
        )),
    }
}
