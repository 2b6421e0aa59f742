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

use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use eagle_engine::models::TargetModel;
use eagle_engine::spec::CostProfile;
use eagle_proto::common::{Empty, SessionRef};
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::{invalid, unknown_session};
use eagle_proto::wire::{sampling_from_wire, tree_from_wire};
use eagle_proto::worker::group_op::Op;
use eagle_proto::worker::worker_server::Worker;
use eagle_proto::worker::{
    CostPoint, DecodeRequest, GroupOp, PrefillRequest, Step, VerifyRequest, WorkerInfo,
};
use tonic::{Request, Response, Status};

pub mod group;
pub mod metrics;
mod sequence;
pub use group::Group;
use sequence::Sequence;

pub struct WorkerService {
    target: Arc<TargetModel>,
    /// Rank 0 of a tensor-parallel group: the other ranks to mirror every model call on.
    group: Option<Arc<Group>>,
    model_name: String,
    wire_dtype: DType,
    cost: CostProfile,
    sessions: Arc<SessionTable<Sequence>>,
}

pub struct WorkerOptions {
    pub model_name: String,
    /// The dtype features travel in.
    pub wire_dtype: DType,
    pub cache_limit_bytes: u64,
    pub idle_timeout: Duration,
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
        WorkerService {
            target: Arc::new(target),
            group,
            model_name: opts.model_name,
            wire_dtype: opts.wire_dtype,
            cost,
            sessions,
        }
    }

    /// Runs `call` on session `id` (on a blocking thread, holding the session) here and, in a
    /// tensor-parallel group, on every other rank, which `op` tells what to run. `prepare` runs
    /// first, on this rank alone, and may refuse the call before anything is sent. In a group
    /// the call is sent only if the session is still in the table once the group's lock is held
    /// (a release may have won the race for it).
    async fn call<T: Send + 'static>(
        &self,
        id: &str,
        op: GroupOp,
        prepare: impl FnOnce(&mut Sequence) -> Result<(), Status> + Send + 'static,
        call: impl FnOnce(&TargetModel, &mut Sequence) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let name = match &op.op {
            Some(Op::Prefill(_)) => "prefill",
            Some(Op::Verify(_)) => "verify",
            _ => "decode",
        };
        let t0 = std::time::Instant::now();
        let (group, table, sid) = (self.group.clone(), self.sessions.clone(), id.to_string());
        let r = self
            .sessions
            .run(id, &self.target, move |target, s| {
                prepare(s)?;
                let Some(g) = group else {
                    return call(target, s);
                };
                let still_there = || {
                    if table.contains(&sid) {
                        Ok(())
                    } else {
                        Err(unknown_session(&sid))
                    }
                };
                g.mirror(still_there, &op, || call(target, s))
            })
            .await;
        metrics::STEPS.observe(name, t0);
        r
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
            let mut op = r.clone();
            op.reuse_cache = reuse;
            let tokens = r.tokens;
            let (table, sid) = (self.sessions.clone(), id.clone());
            let grow = move |s: &mut Sequence| {
                if capacity > s.sess.cache.capacity() {
                    table.resize(&sid, s.bytes_at(capacity))?;
                }
                Ok(())
            };
            let op = GroupOp {
                op: Some(Op::Prefill(op)),
            };
            let result = self
                .call(&id, op, grow, move |target, s| {
                    s.prefill(target, &tokens, reuse, capacity, sampling)
                })
                .await;
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
            let id = r.session_id;
            let op = GroupOp {
                op: Some(Op::Verify(VerifyRequest {
                    session_id: id.clone(),
                    tree: Some(wire),
                })),
            };
            let step = self
                .call(
                    &id,
                    op,
                    |_| Ok(()),
                    move |target, s| s.verify(target, &tree),
                )
                .await?;
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
            let token = r.token;
            let id = r.session_id.clone();
            let op = GroupOp {
                op: Some(Op::Decode(r)),
            };
            let step = self
                .call(
                    &id,
                    op,
                    |_| Ok(()),
                    move |target, s| s.decode(target, token),
                )
                .await?;
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
            // A broken group has nothing left to free on the other ranks.
            None => {
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
