//! The transformer building blocks shared by the target models and the EAGLE head. There is one
//! decoder layer in the code base: the head's layer is a [`DecoderLayer`] without an input norm.
//!
//! Each block has a CPU fast path through the batch-invariant kernels in `crate::kernels` and
//! a device-generic path through candle ops (used on CUDA, or on the CPU when
//! `EAGLE_GENERIC_KERNELS=1`, which the tests use to check the two agree).

pub mod attention;
pub mod decoder;
pub mod linear;
pub mod matrix;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rotary;

pub use attention::{Attention, KvPart, TttKv};
pub use decoder::{DecoderLayer, FeedForward};
pub use linear::Linear;
pub use matrix::Matrix;
pub use mlp::Mlp;
pub use moe::SparseMoe;
pub use norm::RmsNorm;
pub use rotary::{Rope, RopeAt};

use candle_core::Device;

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not decided yet (read `EAGLE_GENERIC_KERNELS`), 1: CPU kernels, 2: generic ops.
static KERNELS: AtomicU8 = AtomicU8::new(0);

/// Whether the CPU kernels serve this device.
pub fn use_cpu_kernels(device: &Device) -> bool {
    let mut k = KERNELS.load(Ordering::Relaxed);
    if k == 0 {
        k = if std::env::var_os("EAGLE_GENERIC_KERNELS").is_some() {
            2
        } else {
            1
        };
        KERNELS.store(k, Ordering::Relaxed);
    }
    device.is_cpu() && k == 1
}

/// Routes CPU work through the generic candle-op path (true) or the CPU kernels (false).
/// Caches must be created after the switch; tests use this to compare the two paths.
pub fn force_generic_kernels(on: bool) {
    KERNELS.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}
