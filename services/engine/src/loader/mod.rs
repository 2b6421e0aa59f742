//! Weight loading. Every format is presented to the model code through [`WeightSource`] under
//! Hugging Face tensor names (`model.layers.3.self_attn.q_proj.weight`), so the model files read
//! like their HF counterparts whatever the file on disk.

pub mod gguf;
pub mod safetensors;

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::kernels::quant::{ggml, QMatrix, Rows};
use crate::layers::Matrix;

/// Whether weight matrices stay quantized (CPU only; other devices always load dense).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quant {
    /// Every matrix dense in the engine dtype.
    #[default]
    None,
    /// Matrices the file holds in a supported block format stay in it; the rest are dense.
    Native,
    /// Every matrix as Q8_0: the file's own Q8_0 blocks, everything else quantized at load.
    Q8_0,
}

/// A store of named tensors. `get` returns the tensor in HF layout, on the CPU, in whatever
/// dtype the file holds (quantized GGUF tensors are dequantized to f32).
pub trait WeightSource: Send + Sync {
    fn get(&self, name: &str) -> Result<Option<Tensor>>;
    /// A tensor's shape, if the source holds it. Sources that know it without reading the data
    /// (safetensors headers) override this.
    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.get(name)?.map(|t| t.dims().to_vec()))
    }
    /// Rows (`dim` 0) or columns (`dim` 1) `range` of a tensor, for tensor-parallel ranks.
    /// Sources that can slice before reading (memory-mapped safetensors) override this, so a
    /// rank never materialises the whole matrix.
    fn get_part(
        &self,
        name: &str,
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Option<Tensor>> {
        match self.get(name)? {
            Some(t) => Ok(Some(t.narrow(dim, range.start, range.len())?.contiguous()?)),
            None => Ok(None),
        }
    }
    /// A matrix's quantized blocks as the file holds them (rows in HF order), if it holds
    /// `name` in one of `ggml::SUPPORTED`'s formats.
    fn get_quant(&self, _name: &str) -> Result<Option<Rows>> {
        Ok(None)
    }
    /// Where these weights come from, for error messages.
    fn describe(&self) -> String;
}

/// A view of a [`WeightSource`] that checks shapes and converts to the engine's dtype and
/// device, in the spirit of candle's `VarBuilder`.
#[derive(Clone)]
pub struct Weights<'a> {
    src: &'a dyn WeightSource,
    prefix: String,
    pub dtype: DType,
    pub device: Device,
    pub quant: Quant,
}

impl<'a> Weights<'a> {
    pub fn new(src: &'a dyn WeightSource, dtype: DType, device: Device) -> Self {
        Weights {
            src,
            prefix: String::new(),
            dtype,
            device,
            quant: Quant::None,
        }
    }

    /// The same view with matrices loaded as `quant` says (on the CPU).
    pub fn with_quant(self, quant: Quant) -> Self {
        Weights { quant, ..self }
    }

    /// A view under `prefix.` (like `VarBuilder::pp`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Weights {
            prefix,
            ..self.clone()
        }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    fn fetch(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let full = self.full(name);
        let Some(t) = self.src.get(&full)? else {
            return Ok(None);
        };
        if t.dims() != shape {
            return Err(EngineError::Shape {
                name: full,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(Some(t))
    }

    fn missing(&self, name: &str) -> EngineError {
        EngineError::MissingTensor {
            name: self.full(name),
            source_desc: self.src.describe(),
        }
    }

    /// Rows (`dim` 0) or columns (`dim` 1) `range` of a tensor of `full` shape, in the engine
    /// dtype (`f32` keeps it in f32, for biases).
    pub fn get_part(
        &self,
        name: &str,
        full: &[usize],
        dim: usize,
        range: std::ops::Range<usize>,
        f32: bool,
    ) -> Result<Tensor> {
        let full_name = self.full(name);
        let mut want = full.to_vec();
        want[dim] = range.len();
        if range.end > full[dim] {
            return Err(EngineError::Shape {
                name: full_name,
                expected: full.to_vec(),
                found: want,
            });
        }
        // The whole tensor must have the shape the config says, as for an unsharded load.
        match self.src.shape(&full_name)? {
            None => return Err(self.missing(name)),
            Some(found) if found != full => {
                return Err(EngineError::Shape {
                    name: full_name,
                    expected: full.to_vec(),
                    found,
                })
            }
            Some(_) => {}
        }
        let t = self
            .src
            .get_part(&full_name, dim, range)?
            .ok_or_else(|| self.missing(name))?;
        if t.dims() != want {
            return Err(EngineError::Shape {
                name: full_name,
                expected: want,
                found: t.dims().to_vec(),
            });
        }
        let dtype = if f32 { DType::F32 } else { self.dtype };
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }

    /// Whether the source holds `name`, without reading it.
    pub fn has(&self, name: &str) -> Result<bool> {
        Ok(self.src.shape(&self.full(name))?.is_some())
    }

    /// A matrix in the engine dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_opt(name, shape)?.ok_or_else(|| self.missing(name))
    }

    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        self.fetch(name, shape)?
            .map(|t| Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?))
            .transpose()
    }

    /// A weight matrix [out, in]: quantized when `self.quant` asks for it and the format allows
    /// (on the CPU), else dense in the engine dtype.
    pub fn get_matrix(&self, name: &str, shape: &[usize]) -> Result<Matrix> {
        self.get_matrix_opt(name, shape)?
            .ok_or_else(|| self.missing(name))
    }

    pub fn get_matrix_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Matrix>> {
        if self.quant == Quant::None || !self.device.is_cpu() || shape.len() != 2 {
            return Ok(self.get_opt(name, shape)?.map(Matrix::Dense));
        }
        let full = self.full(name);
        let quant = |rows: Rows| Matrix::Quant(std::sync::Arc::new(QMatrix::new(rows.pack())));
        if let Some(rows) = self.src.get_quant(&full)? {
            if [rows.n, rows.k] != shape {
                return Err(EngineError::Shape {
                    name: full,
                    expected: shape.to_vec(),
                    found: vec![rows.n, rows.k],
                });
            }
            if self.quant == Quant::Native || rows.source == "Q8_0" {
                return Ok(Some(quant(rows)));
            }
        }
        if self.quant == Quant::Q8_0 {
            if let Some(t) = self.fetch(name, shape)? {
                let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                if let Some(rows) = ggml::quantize_q8_0(&v, shape[0], shape[1]) {
                    return Ok(Some(quant(rows)));
                }
                return Ok(Some(Matrix::Dense(t.to_dtype(self.dtype)?)));
            }
            return Ok(None);
        }
        Ok(self.get_opt(name, shape)?.map(Matrix::Dense))
    }

    /// A vector (norm weight, bias) kept in f32.
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_f32_opt(name, shape)?
            .ok_or_else(|| self.missing(name))
    }

    pub fn get_f32_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        self.fetch(name, shape)?
            .map(|t| Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?))
            .transpose()
    }

    pub fn describe(&self) -> String {
        self.src.describe()
    }
}

/// An opened model: its weights, config and tokenizer.
pub struct OpenedModel {
    pub source: Box<dyn WeightSource>,
    pub config: crate::config::ModelConfig,
    pub tokenizer: crate::tokenizer::Tokenizer,
}

/// Opens a model from a `.gguf` file, a directory holding one `.gguf` file, or a Hugging Face
/// directory (`config.json`, safetensors, `tokenizer.json`).
pub fn open_model(path: &std::path::Path) -> Result<OpenedModel> {
    use crate::config::HfConfig;
    if !path.exists() {
        return Err(EngineError::MissingFile {
            path: path.to_path_buf(),
            what: "a model (.gguf file or Hugging Face directory)".into(),
        });
    }
    let gguf_path = if path.is_file() {
        Some(path.to_path_buf())
    } else if path.join("config.json").exists() {
        None
    } else {
        let mut found: Vec<std::path::PathBuf> = std::fs::read_dir(path)
            .map_err(|e| EngineError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        found.sort();
        match found.len() {
            1 => Some(found.remove(0)),
            0 => {
                return Err(EngineError::MissingFile {
                    path: path.to_path_buf(),
                    what: "config.json or a .gguf file".into(),
                })
            }
            _ => {
                return Err(EngineError::Config(format!(
                    "{} holds several .gguf files; name one",
                    path.display()
                )))
            }
        }
    };
    match gguf_path {
        Some(p) => {
            let g = gguf::GgufFile::open(&p)?;
            let config = g.config()?;
            let tokenizer = crate::tokenizer::Tokenizer::from_gguf(&g.content, &p)?;
            Ok(OpenedModel {
                source: Box::new(g),
                config,
                tokenizer,
            })
        }
        None => {
            let config = HfConfig::from_file(&path.join("config.json"))?.into_config()?;
            let source = safetensors::SafetensorsSource::open(path)?;
            let tokenizer = crate::tokenizer::Tokenizer::from_hf_dir(path)?;
            Ok(OpenedModel {
                source: Box::new(source),
                config,
                tokenizer,
            })
        }
    }
}
