//! Hugging Face layout: `config.json` with `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; memory-mapped, so only the tensors asked for are read, and a
//! tensor-parallel rank copies only its rows or columns of each.

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor as st;

use super::WeightSource;
use crate::error::{EngineError, Result};

pub struct SafetensorsSource {
    st: MmapedSafetensors,
    desc: String,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`, in
    /// `dir`; or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            shard_files(path)?
        } else {
            vec![path.to_path_buf()]
        };
        for f in &files {
            if !f.exists() {
                return Err(EngineError::MissingFile {
                    path: f.clone(),
                    what: "a safetensors shard".to_string(),
                });
            }
        }
        // SAFETY: the files are memory-mapped read-only; modifying them while mapped is the
        // caller's problem, as with every mmap-based loader.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| EngineError::malformed(path, format!("cannot read safetensors: {e}")))?;
        Ok(SafetensorsSource {
            st,
            desc: path.display().to_string(),
        })
    }
}

/// The shard files of an HF checkpoint directory.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::malformed(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::malformed(&index, "no weight_map object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| {
                EngineError::malformed(&index, "weight_map values must be strings")
            })?;
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(EngineError::MissingFile {
        path: dir.to_path_buf(),
        what: "model.safetensors or model.safetensors.index.json".to_string(),
    })
}

impl WeightSource for SafetensorsSource {
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        if self.st.get(name).is_err() {
            return Ok(None);
        }
        let t = self
            .st
            .load(name, &Device::Cpu)
            .map_err(|e| EngineError::malformed(&self.desc, format!("tensor {name}: {e}")))?;
        Ok(Some(t))
    }

    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.st.get(name).ok().map(|v| v.shape().to_vec()))
    }

    fn get_part(&self, name: &str, dim: usize, range: Range<usize>) -> Result<Option<Tensor>> {
        let Ok(view) = self.st.get(name) else {
            return Ok(None);
        };
        let dtype = match view.dtype() {
            st::Dtype::F32 => DType::F32,
            st::Dtype::BF16 => DType::BF16,
            st::Dtype::F16 => DType::F16,
            // Other dtypes are rare in checkpoints: read whole, then narrow.
            _ => {
                return Ok(self
                    .get(name)?
                    .map(|t| t.narrow(dim, range.start, range.len())?.contiguous())
                    .transpose()?)
            }
        };
        let shape = view.shape().to_vec();
        let data = view.data();
        let bad = |m: String| EngineError::malformed(&self.desc, format!("tensor {name}: {m}"));
        if dim >= shape.len() || range.end > shape[dim] {
            return Err(bad(format!(
                "cannot take {range:?} of dim {dim} of {shape:?}"
            )));
        }
        let elem = dtype.size_in_bytes();
        if data.len() != shape.iter().product::<usize>() * elem {
            return Err(bad(format!("{} bytes for shape {shape:?}", data.len())));
        }
        // Row-major: `outer` blocks of `shape[dim] * inner` elements; keep `range` of each.
        let outer: usize = shape[..dim].iter().product();
        let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
        let mut bytes = Vec::with_capacity(outer * range.len() * inner);
        for o in 0..outer {
            let base = o * shape[dim] * inner;
            bytes.extend_from_slice(&data[base + range.start * inner..base + range.end * inner]);
        }
        let mut part = shape;
        part[dim] = range.len();
        Ok(Some(Tensor::from_raw_buffer(
            &bytes,
            dtype,
            &part,
            &Device::Cpu,
        )?))
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }
}
