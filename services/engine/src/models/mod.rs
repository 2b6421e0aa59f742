//! Target models. LLaMA-family and Qwen2 share one implementation ([`target::TargetModel`]);
//! they differ in config (q/k/v biases, rotary base, tied LM head), not in code.

pub mod target;

pub use target::TargetModel;
