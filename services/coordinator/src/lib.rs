//! eagle-coordinator: the front of a cluster. It serves the public `eagle.v1.Generation` API,
//! validates and queues requests, and drives each one step by step across a draft service
//! (the EAGLE head and tree builder) and a verification worker (the target model).
//!
//! - `request.rs`: public requests to validated jobs.
//! - `queue.rs`: admission control (an actor).
//! - `generation.rs`: the step loop, with fallback to plain decoding when drafting fails.
//! - `text.rs`: streamed text and stop strings.
//! - `backends.rs`: clients of the services, with deadlines.
//! - `service.rs`: the gRPC service.
//!
//! No model math runs here: only the tokenizer, to turn text into token ids and back.

pub mod backends;
pub mod generation;
pub mod queue;
pub mod request;
pub mod service;
pub mod text;

pub use service::Coordinator;
