//! eagle-worker: the target side of a cluster, as a gRPC service.
//!
//! A session is one sequence's KV cache plus its sampling state. The coordinator prefills a
//! prompt, then alternates verifying draft trees (or decoding one token when no draft is
//! available) until it releases the session. All model math is the engine's
//! `eagle_engine::session::TargetSession`; this crate only validates, schedules and serialises.
//!
//! Invariants: see [`sequence`] (the last chosen token, and the cached prefix a later turn of
//! a multi-turn conversation reuses).
//!
//! As rank 0 of a tensor-parallel group ([`group`]), the service sends every model call to the
//! other ranks before running it, in one order for the whole group.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::DType;
use eagle_engine::models::TargetModel;
use eagle_engine::spec::CostProfile;
use eagle_proto::common::{Empty, SessionRef};
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::invalid;
use eagle_proto::wire::{sampling_from_wire, tree_from_wire};
use eagle_proto::worker::group_op::Op;
use eagle_proto::worker::worker_server::Worker;
use eagle_proto::worker::{
    CostPoint, DecodeRequest, GroupOp, PrefillRequest, Step, VerifyRequest, WorkerInfo,
};
use tonic::{Request, Response, Status};

pub mod batcher;
pub mod group;
pub mod metrics;
pub mod prefix_cache;
mod sequence;
pub use batcher::Limits;
use batcher::{Batcher, Task};
pub use group::Group;
use prefix_cache::PrefixCache;
use sequence::Sequence;

pub struct WorkerService {
    target: Arc<TargetModel>,
    /// Rank 0 of a tensor-parallel group: the other ranks to mirror every model call on.
    group: Option<Arc<Group>>,
    model_name: String,
    wire_dtype: DType,
    cost: CostProfile,
    sessions: Arc<SessionTable<Sequence>>,
    batcher: Batcher,
    prefix: Option<Arc<Mutex<PrefixCache>>>,
}

pub struct WorkerOptions {
    pub model_name: String,
    /// The dtype features travel in.
    pub wire_dtype: DType,
    pub cache_limit_bytes: u64,
    pub idle_timeout: Duration,
    /// How big one target pass may get.
    pub batch: Limits,
    /// Memory for the prefix cache (prompts' KV kept for later requests that share their
    /// first tokens); 0 turns it off. A tensor-parallel group runs without one.
    pub prefix_cache_bytes: u64,
}

impl WorkerService {
    /// Must be called inside a tokio runtime (it starts the idle-session reaper).
    pub fn new(target: TargetModel, cost: CostProfile, opts: WorkerOptions) -> Self {
        WorkerService::with_group(target, cost, opts, None)
    }

    /// A worker that is rank 0 of a tensor-parallel `group`.
    pub fn with_group(
        target: TargetModel,
        cost: CostProfile,
        opts: WorkerOptions,
        group: Option<Arc<Group>>,
    ) -> Self {
        let sessions = SessionTable::new(opts.cache_limit_bytes, opts.idle_timeout);
        sessions.spawn_reaper();
        let prefix = (opts.prefix_cache_bytes > 0 && group.is_none()).then(|| {
            Arc::new(Mutex::new(PrefixCache::new(
                opts.prefix_cache_bytes as usize,
                prefix_cache::BLOCK_TOKENS,
            )))
        });
        let target = Arc::new(target);
        let batcher = Batcher::start(
            target.clone(),
            sessions.clone(),
            group.clone(),
            opts.batch,
            prefix.clone(),
        );
        WorkerService {
            target,
            batcher,
            prefix,
            group,
            model_name: opts.model_name,
            wire_dtype: opts.wire_dtype,
            cost,
            sessions,
        }
    }

    /// Runs `task` on session `id` in the scheduler's next passes (see [`batcher`]).
    async fn call(&self, id: &str, task: Task) -> Result<Step, Status> {
        self.batcher.submit(id, task).await
    }

    /// Registers the worker's metrics, reading this service's session table and group.
    pub fn register_metrics(&self) {
        let (a, b, limit) = (
            self.sessions.clone(),
            self.sessions.clone(),
            self.sessions.limit_bytes(),
        );
        let group = self.group.clone();
        metrics::register(
            move || a.len(),
            move || b.bytes(),
            limit,
            self.group.as_ref().map_or(1, |g| {
                eagle_engine::parallel::Collective::world(g.tcp().as_ref())
            }),
            move || group.as_ref().is_none_or(|g| g.broken().is_none()),
        );
        if let Some(p) = &self.prefix {
            metrics::register_prefix_cache(p.clone());
        }
    }

    /// The keys of the blocks its prefix cache holds, most recently used first, at most
    /// `max`: what its membership record publishes for cache-aware routing (none without a
    /// prefix cache).
    pub fn prefix_probe(&self, max: usize) -> impl Fn() -> Vec<u64> + Send + Sync + 'static {
        let prefix = self.prefix.clone();
        move || {
            prefix.as_ref().map_or_else(Vec::new, |p| {
                p.lock().unwrap_or_else(|e| e.into_inner()).summary(max)
            })
        }
    }

    /// Live sessions, read by the membership registration as this worker's load.
    pub fn load_probe(&self) -> impl Fn() -> u32 + Send + Sync + 'static {
        let sessions = self.sessions.clone();
        move || sessions.len() as u32
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn prefill(&self, req: Request<PrefillRequest>) -> Result<Response<Step>, Status> {
        let span = tracing::info_span!("worker.prefill", session = %req.get_ref().session_id, tokens = req.get_ref().tokens.len(), cached = tracing::field::Empty);
        eagle_trace::adopt(&span, req.metadata());
        eagle_trace::rpc::handle(span, "eagle.worker.v1.Worker", "Prefill", async {
            let r = req.into_inner();
            let cfg = &self.target.cfg;
            if r.tokens.is_empty() {
                return Err(invalid("prefill: no tokens"));
            }
            if let Some(t) = r.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(invalid(format!(
                    "prefill: token {t} is outside the vocabulary of {}",
                    cfg.vocab_size
                )));
            }
            let capacity = r.capacity as usize;
            let max = cfg.max_position_embeddings + 128;
            if capacity <= r.tokens.len() || capacity > max {
                return Err(invalid(format!(
                    "prefill: capacity {capacity} must exceed the {} prompt tokens and stay within {max}",
                    r.tokens.len()
                )));
            }
            let sampling = sampling_from_wire(r.sampling.as_ref())?;
            let id = r.session_id.clone();
            let reuse = r.reuse_cache && self.sessions.contains(&id);
            if !reuse {
                let seq = Sequence::new(
                    &self.target,
                    capacity,
                    sampling.clone(),
                    Some(self.wire_dtype),
                )?;
                let bytes = seq.bytes_at(capacity);
                self.sessions.insert(&id, seq, bytes)?;
            }
            // The other ranks take the same decision: reuse exactly when this rank does.
            let mut request = r;
            request.reuse_cache = reuse;
            let task = Task::Prefill { request, sampling };
            let result = self.call(&id, task).await;
            if let Some(keep) = result.as_ref().ok().map(|st| st.cached_tokens) {
                tracing::Span::current().record("cached", keep);
            }
            match result {
                Ok(step) => Ok(Response::new(step)),
                Err(e) => {
                    self.sessions.remove(&id);
                    Err(e)
                }
            }
        })
        .await
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<Step>, Status> {
        let span = tracing::info_span!("worker.verify", session = %req.get_ref().session_id, nodes = tracing::field::Empty, accepted = tracing::field::Empty);
        eagle_trace::adopt(&span, req.metadata());
        eagle_trace::rpc::handle(span, "eagle.worker.v1.Worker", "Verify", async {
            let r = req.into_inner();
            let wire = r.tree.ok_or_else(|| invalid("verify: no tree"))?;
            let tree = tree_from_wire(&wire, self.target.cfg.vocab_size)?;
            tracing::Span::current().record("nodes", tree.len());
            let step = self.call(&r.session_id, Task::Verify(tree, wire)).await?;
            tracing::Span::current().record("accepted", step.tokens.len());
            Ok(Response::new(step))
        })
        .await
    }

    async fn decode(&self, req: Request<DecodeRequest>) -> Result<Response<Step>, Status> {
        let span = tracing::info_span!("worker.decode", session = %req.get_ref().session_id);
        eagle_trace::adopt(&span, req.metadata());
        eagle_trace::rpc::handle(span, "eagle.worker.v1.Worker", "Decode", async {
            let r = req.into_inner();
            let step = self.call(&r.session_id, Task::Decode(r.token)).await?;
            Ok(Response::new(step))
        })
        .await
    }

    async fn release(&self, req: Request<SessionRef>) -> Result<Response<Empty>, Status> {
        let span = tracing::info_span!("worker.release", session = %req.get_ref().session_id);
        eagle_trace::adopt(&span, req.metadata());
        let _g = span.enter();
        let id = req.into_inner().session_id;
        match self.group.clone().filter(|g| g.broken().is_none()) {
            // In a group, the removal and the broadcast happen under the group's lock, so a
            // call for the session reaches every rank before the release or not at all.
            Some(g) => {
                let table = self.sessions.clone();
                let op = GroupOp {
                    op: Some(Op::Release(SessionRef {
                        session_id: id.clone(),
                    })),
                };
                let remove = move || {
                    table.remove(&id);
                    Ok(())
                };
                tokio::task::spawn_blocking(move || g.mirror(remove, &op, || Ok(())))
                    .await
                    .map_err(|e| Status::internal(format!("release: {e}")))??;
            }
            // A broken group has nothing left to free on the other ranks. A lone worker first
            // offers the conversation (prompt and answer) to the prefix cache, for its next
            // turn.
            None => {
                if let (Some(prefix), Ok(seq)) = (self.prefix.clone(), self.sessions.get(&id)) {
                    let target = self.target.clone();
                    let offered = tokio::task::spawn_blocking(move || {
                        let s = seq.lock().unwrap_or_else(|e| e.into_inner());
                        batcher::offer(&prefix, &target, &s);
                    });
                    let _ = offered.await;
                }
                self.sessions.remove(&id);
            }
        }
        Ok(Response::new(Empty {}))
    }

    async fn info(&self, _req: Request<Empty>) -> Result<Response<WorkerInfo>, Status> {
        let cfg = &self.target.cfg;
        Ok(Response::new(WorkerInfo {
            model: self.model_name.clone(),
            hidden_size: cfg.hidden_size as u32,
            vocab_size: cfg.vocab_size as u32,
            max_context: cfg.max_position_embeddings as u32,
            cost_profile: self
                .cost
                .points
                .iter()
                .map(|&(n, s)| CostPoint {
                    tokens: n as u32,
                    seconds: s,
                })
                .collect(),
            active_sessions: self.sessions.len() as u32,
            cache_bytes: self.sessions.bytes(),
            cache_bytes_limit: self.sessions.limit_bytes(),
        }))
    }
}
