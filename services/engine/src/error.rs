//! The engine's error type. Every failure carries enough context for a person to act on it;
//! the services map these to gRPC status codes in one place.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed model file {path}: {msg}")]
    Malformed { path: PathBuf, msg: String },
    #[error("missing file {path}: {what}")]
    MissingFile { path: PathBuf, what: String },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} is missing from {source_desc}")]
    MissingTensor { name: String, source_desc: String },
    #[error("unsupported architecture {0:?} (supported: llama, mistral, qwen2, mixtral)")]
    UnsupportedArch(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("context overflow: {needed} tokens needed, the model holds {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    /// A tensor-parallel peer is gone or misbehaved; the group cannot go on.
    #[error("tensor-parallel group: {0}")]
    Collective(String),
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn malformed(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        EngineError::Malformed {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
