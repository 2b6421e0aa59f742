//! Tensor parallelism in the style of Megatron-LM (Shoeybi et al., 2019): a group of `world`
//! ranks each holds a slice of every weight matrix and they meet in collectives.
//!
//! - Attention is split by heads: q/k/v are column-parallel (each rank projects onto its own
//!   heads, biases split with their rows), `o_proj` is row-parallel and followed by one
//!   all-reduce. When the degree exceeds the KV-head count, each KV head is replicated on the
//!   ranks whose query heads read it; when it divides the count, KV heads are split like the
//!   query heads.
//! - The SwiGLU MLP has column-parallel gate/up and a row-parallel down, then one all-reduce.
//!   Mixtral experts are split the same way inside each expert (the router is replicated), and
//!   the weighted sum of the experts is all-reduced once per layer.
//! - The embedding and the LM head are vocab-parallel: each rank holds a contiguous block of
//!   `ceil(vocab / world)` rows (zero-padded at the end). A token's embedding row lives on one
//!   rank and the others contribute zeros to an all-reduce, so it is exact; each rank computes
//!   the logits of its block and an all-gather assembles the row. At Qwen2-72B's 152k x 8192
//!   vocabulary this saves 2.2 GiB per rank at TP 8 over replicating both matrices.
//!
//! Invariant: every rank ends each collective with the same bits, so all ranks of a group make
//! the same decisions (greedy or sampled acceptance, compaction) from the same logits.

pub mod collective;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod shard;

pub use collective::{Collective, Single};
pub use shard::Shard;
