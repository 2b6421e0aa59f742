//! eagle-parallel: how the ranks of a tensor-parallel group talk on the CPU. [`TcpGroup`] is a
//! star over TCP (rank 0 in the middle) that implements the engine's
//! [`eagle_engine::parallel::Collective`] and carries rank 0's commands to the other ranks.
//! NCCL, the GPU backend, lives in the engine behind its `nccl` feature; this crate is the one
//! that runs anywhere, for development and tests between separate processes. Its connections
//! may run over mutual TLS (`link.rs`).

mod link;
pub mod tcp;

pub use tcp::TcpGroup;
