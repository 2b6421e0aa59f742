//! The training library's error type: every failure names the file, record or setting a person
//! has to look at.

use std::path::PathBuf;

use eagle_engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A complete input record that is not a conversation (wrong types, unknown roles).
    #[error("record {index} (id {id}): {msg}")]
    Record {
        index: usize,
        id: String,
        msg: String,
    },
    /// Input that is not valid JSON before its end (truncation at the end is not an error).
    #[error("{what}: invalid JSON at byte {offset}: {msg}")]
    Syntax {
        what: String,
        offset: usize,
        msg: String,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data directory, shard or checkpoint that is not what it should be.
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("tensor backend: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn data(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        TrainError::Data {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
