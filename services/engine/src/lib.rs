//! eagle-engine: the model math of eagle-serve. Targets, the EAGLE head, EAGLE-2 draft trees,
//! lossless verification, sampling, the KV cache and loaders. No networking lives here; the
//! services in `services/` drive these pieces over gRPC.
//!
//! Start with [`generate::Engine`]: load a target and a head, then `generate`.

pub mod acceptance;
pub mod chat;
pub mod config;
pub mod device;
pub mod draft;
pub mod error;
pub mod generate;
pub mod head;
pub mod kernels;
pub mod kv_cache;
pub mod layers;
pub mod loader;
pub mod models;
pub mod parallel;
pub mod sampling;
pub mod session;
pub mod spec;
pub mod tokenizer;
pub mod tree;
pub mod verify;

pub use error::{EngineError, Result};
pub use generate::{Engine, FinishReason, GenerateOutput, GenerateRequest, LoadOptions, Mode};
pub use loader::Quant;
pub use sampling::SamplingParams;
pub use spec::{SpecConfig, TreeShape};
