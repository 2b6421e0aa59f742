//! eagle-train: training EAGLE draft heads for eagle-serve.
//!
//! The pipeline (see the crate README):
//! 1. [`sharegpt`] reads conversations (the truncated ShareGPT V3 JSON, or JSONL).
//! 2. [`format`] renders each with the target's chat template and marks the assistant tokens.
//! 3. [`regen`] optionally replaces the first assistant turn with the target's own answer.
//! 4. [`data`] runs the target over each conversation and stores ids, features and loss masks
//!    in safetensors shards ([`shards`]), split into train and held-out sets by [`split`].
//! 5. [`trainer`] trains the head with the EAGLE loss ([`loss`]) on packed batches
//!    ([`batch`]) with AdamW ([`optim`], its state checkpointed) under a warm-up + cosine
//!    schedule ([`schedule`]), optionally over a reduced draft vocabulary ([`vocab`]), and
//!    writes it in the published format the engine loads.
//!
//! Features are the target's last hidden state after the final norm: what the engine's head
//! consumes and what published EAGLE heads were trained on (HF `LlamaModel`'s output).
//!
//! Training is model math but not serving: it lives here, outside the engine's dependencies,
//! and reuses the engine's decoder layer through its differentiable, cache-free forward.

pub mod batch;
pub mod data;
pub mod error;
pub mod format;
pub mod loss;
pub mod optim;
pub mod regen;
pub mod schedule;
pub mod shards;
pub mod sharegpt;
pub mod split;
pub mod trainer;
pub mod vocab;

pub use error::{Result, TrainError};
