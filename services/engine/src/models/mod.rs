//! Target models. LLaMA-family, Qwen2 and Mixtral share one implementation
//! ([`target::TargetModel`]); they differ in config (q/k/v biases, rotary base, tied LM head,
//! routed experts), not in code. [`random`] makes random-weight models of any of these shapes.

pub mod random;
pub mod target;

pub use target::{Rows, States, TargetModel};
