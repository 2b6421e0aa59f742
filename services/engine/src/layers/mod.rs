//! The transformer building blocks shared by the target models and the EAGLE head. There is one
//! decoder layer in the code base: the head's layer is a [`DecoderLayer`] without an input norm.
//!
//! Each block has a CPU fast path through the batch-invariant kernels in `crate::kernels` and
//! a device-generic path through candle ops (used on CUDA, or on the CPU when
//! `EAGLE_GENERIC_KERNELS=1`, which the tests use to check the two agree).

pub mod attention;
pub mod decoder;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod rotary;

pub use attention::Attention;
pub use decoder::DecoderLayer;
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::RmsNorm;
pub use rotary::{Rope, RopeAt};

use candle_core::Device;

/// Whether the CPU kernels serve this device.
pub fn use_cpu_kernels(device: &Device) -> bool {
    use std::sync::OnceLock;
    static GENERIC: OnceLock<bool> = OnceLock::new();
    let generic = *GENERIC.get_or_init(|| std::env::var_os("EAGLE_GENERIC_KERNELS").is_some());
    device.is_cpu() && !generic
}
