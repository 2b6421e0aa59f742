//! Devices and dtypes by name, as every command line and service spells them.

use candle_core::{DType, Device};

use crate::error::{EngineError, Result};

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
