//! Devices and dtypes by name, as every command line and service spells them.

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};
use crate::loader::Quant;

/// What `--dtype` asks for: the dense dtype (activations are f32 whatever it is) and whether
/// matrices stay quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub dtype: DType,
    pub quant: Quant,
}

/// `auto` (the fastest lossless choice: a quantized GGUF's matrices in their own blocks, the
/// rest bf16, which streams half of f32's bytes), `q8_0` (every matrix as Q8_0), `f32`, `bf16`
/// or `f16`. On a GPU `auto` means bf16; `q8_0` runs on the CPU only.
pub fn parse_precision(s: &str) -> Result<Precision> {
    let (dtype, quant) = match s {
        "auto" => (DType::BF16, Quant::Native),
        "q8_0" => (DType::BF16, Quant::Q8_0),
        other => (
            parse_dtype(other).map_err(|_| {
                EngineError::Config(format!(
                    "unknown dtype {other:?}: use auto, q8_0, f32, bf16 or f16"
                ))
            })?,
            Quant::None,
        ),
    };
    Ok(Precision { dtype, quant })
}

/// Checks that `device` can run `p`.
pub fn check_precision(p: &Precision, device: &Device) -> Result<()> {
    if p.quant == Quant::Q8_0 && !device.is_cpu() {
        return Err(EngineError::Config(
            "--dtype q8_0 runs on the CPU only: use bf16 or f32 on a GPU".into(),
        ));
    }
    Ok(())
}

/// `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        o => {
            return Err(EngineError::Config(format!(
                "unknown dtype {o:?}: use f32, bf16 or f16"
            )))
        }
    })
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            let ordinal: usize = d
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| EngineError::Config(format!("bad device {d:?}: use cuda:N")))?;
            if !cfg!(feature = "cuda") {
                return Err(EngineError::Config(
                    "this build has no CUDA: rebuild with scripts/build-cuda.sh".into(),
                ));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        o => Err(EngineError::Config(format!(
            "unknown device {o:?}: use cpu, cuda or cuda:N"
        ))),
    }
}
