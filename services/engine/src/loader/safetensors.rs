//! Hugging Face layout: `config.json` with `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; memory-mapped, so only the tensors asked for are read.

use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, Device, Tensor};

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

    fn describe(&self) -> String {
        self.desc.clone()
    }
}
