//! eagle-coordinator: the front of a cluster. It serves the public `eagle.v1.Generation` API,
//! validates and queues requests, and drives each one step by step across a draft service
//! (the EAGLE head and tree builder) and a verification worker (the target model).
//!
//! - `auth.rs`: API keys on the public API, with a per-key limit.
//! - `request.rs`: public requests to validated jobs.
//! - `queue.rs`: admission control (an actor).
//! - `generation.rs`: the step loop, with fallback to plain decoding when drafting fails.
//! - `load.rs`: whether speculation pays at the current load (the worker batches sessions).
//! - `text.rs`: streamed text and stop strings.
//! - `backends.rs`: clients of the services, with deadlines; the worker pool.
//! - `membership.rs`: routing by etcd membership (complete healthy groups, by load).
//! - `prefix_routing.rs`: cache-aware routing (where a prompt's prefix is likely cached).
//! - `sessions.rs`: multi-turn sessions' KV placement.
//! - `service.rs`: the gRPC service.
//! - `metrics.rs`: the coordinator's Prometheus metrics.
//! - `http/`: the OpenAI-compatible HTTP API and the web chat page, over the same queue and
//!   step loop.
//!
//! No model math runs here: only the tokenizer, to turn text into token ids and back.

pub mod auth;
pub mod backends;
pub mod generation;
pub mod http;
pub mod load;
pub mod membership;
pub mod metrics;
pub mod prefix_routing;
pub mod queue;
pub mod request;
pub mod service;
pub mod sessions;
pub mod text;

pub use service::Coordinator;
