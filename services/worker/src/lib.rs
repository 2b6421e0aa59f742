//! eagle-worker: the target side of a cluster, as a gRPC service.
//!
//! A session is one sequence's KV cache plus its sampling state. The coordinator prefills a
//! prompt, then alternates verifying draft trees (or decoding one token when no draft is
//! available) until it releases the session. All model math is the engine's
//! [`TargetSession`]; this crate only validates, schedules and serialises.
//!
//! Invariant: a session's last chosen token is known here, and every tree or decode must start
//! from it, so a confused or malicious caller cannot desynchronise the cache.
//!
//! As rank 0 of a tensor-parallel group ([`group`]), the service sends every model call to the
//! other ranks before running it, in one order for the whole group.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Tensor};
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{choose, Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::CostProfile;
use eagle_engine::tree::DraftTree;
use eagle_proto::common::{Empty, SessionRef};
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::{from_engine, invalid};
use eagle_proto::wire::{features_to_wire, sampling_from_wire, tree_from_wire};
use eagle_proto::worker::group_op::Op;
use eagle_proto::worker::worker_server::Worker;
use eagle_proto::worker::{
    CostPoint, DecodeRequest, GroupOp, PrefillRequest, Step, VerifyRequest, WorkerInfo,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

pub mod group;
pub use group::Group;

fn prefill_op(r: PrefillRequest) -> GroupOp {
    GroupOp {
        op: Some(Op::Prefill(r)),
    }
}

/// One sequence on the worker (on every rank of a tensor-parallel group).
pub(crate) struct Sequence {
    sess: TargetSession,
    sampling: SamplingParams,
    rng: Rng,
    /// The last chosen token: not yet run through the target, the root of the next tree.
    last: u32,
}

impl Sequence {
    pub(crate) fn new(
        target: &TargetModel,
        capacity: usize,
        sampling: SamplingParams,
    ) -> Result<Self, Status> {
        let sess = TargetSession::new(target, capacity).map_err(|e| from_engine(&e))?;
        Ok(Sequence {
            sess,
            rng: Rng::new(sampling.seed),
            sampling,
            last: 0,
        })
    }

    /// Runs the prompt and chooses the first new token.
    pub(crate) fn prefill(
        &mut self,
        target: &TargetModel,
        tokens: &[u32],
    ) -> Result<(u32, Tensor), Status> {
        let (feats, logits) = self
            .sess
            .prefill(target, tokens)
            .map_err(|e| from_engine(&e))?;
        self.last = choose(&logits, &self.sampling, &mut self.rng);
        Ok((self.last, feats))
    }

    /// Verifies a tree rooted at the last chosen token.
    pub(crate) fn verify(
        &mut self,
        target: &TargetModel,
        tree: &DraftTree,
    ) -> Result<(Vec<u32>, Tensor), Status> {
        if tree.tokens[0] != self.last {
            return Err(Status::failed_precondition(format!(
                "verify: the tree's root {} is not the session's last token {}",
                tree.tokens[0], self.last
            )));
        }
        let room = self.sess.cache.capacity() - self.sess.cache.len();
        if tree.len() > room {
            return Err(Status::out_of_range(format!(
                "verify: {} nodes but the session has room for {room}",
                tree.len()
            )));
        }
        let v = self
            .sess
            .verify(target, tree, &self.sampling, &mut self.rng)
            .map_err(|e| from_engine(&e))?;
        self.last = *v
            .verdict
            .tokens
            .last()
            .expect("a verdict has a bonus token");
        Ok((v.verdict.tokens, v.features))
    }

    /// Runs the last chosen token alone and chooses the next.
    pub(crate) fn decode(
        &mut self,
        target: &TargetModel,
        token: u32,
    ) -> Result<(u32, Tensor), Status> {
        if token != self.last {
            return Err(Status::failed_precondition(format!(
                "decode: token {token} is not the session's last token {}",
                self.last
            )));
        }
        if self.sess.cache.len() >= self.sess.cache.capacity() {
            return Err(Status::out_of_range("decode: the session's cache is full"));
        }
        let (feats, logits) = self
            .sess
            .decode(target, token)
            .map_err(|e| from_engine(&e))?;
        self.last = choose(&logits, &self.sampling, &mut self.rng);
        Ok((self.last, feats))
    }
}

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

    /// Runs `f` here and, in a tensor-parallel group, on every rank (`op` tells them what).
    fn mirror<T>(
        group: &Option<Arc<Group>>,
        op: impl FnOnce() -> GroupOp,
        f: impl FnOnce() -> Result<T, Status>,
    ) -> Result<T, Status> {
        match group {
            Some(g) => g.mirror(&op(), f),
            None => f(),
        }
    }

    fn step(&self, tokens: Vec<u32>, feats: &candle_core::Tensor) -> Result<Step, Status> {
        Ok(Step {
            tokens,
            features: Some(features_to_wire(feats, self.wire_dtype)?),
        })
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn prefill(&self, req: Request<PrefillRequest>) -> Result<Response<Step>, Status> {
        let span = tracing::info_span!("worker.prefill", session = %req.get_ref().session_id, tokens = req.get_ref().tokens.len());
        eagle_trace::adopt(&span, req.metadata());
        async {
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
            let seq = Sequence::new(&self.target, capacity, sampling)?;
            let bytes = seq.sess.cache.bytes() as u64;
            self.sessions.insert(&r.session_id, seq, bytes)?;
            let id = r.session_id.clone();
            let group = self.group.clone();
            let result = self
                .sessions
                .run(&id, &self.target, move |target, s| {
                    let tokens = r.tokens.clone();
                    Self::mirror(&group, || prefill_op(r), || s.prefill(target, &tokens))
                })
                .await;
            match result {
                Ok((next, feats)) => Ok(Response::new(self.step(vec![next], &feats)?)),
                Err(e) => {
                    self.sessions.remove(&id);
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn verify(&self, req: Request<VerifyRequest>) -> Result<Response<Step>, Status> {
        let span = tracing::info_span!("worker.verify", session = %req.get_ref().session_id, nodes = tracing::field::Empty, accepted = tracing::field::Empty);
        eagle_trace::adopt(&span, req.metadata());
        async {
            let r = req.into_inner();
            let wire = r.tree.ok_or_else(|| invalid("verify: no tree"))?;
            let tree = tree_from_wire(&wire, self.target.cfg.vocab_size)?;
            tracing::Span::current().record("nodes", tree.len());
            let group = self.group.clone();
            let id = r.session_id.clone();
            let (tokens, feats) = self
                .sessions
                .run(&id, &self.target, move |target, s| {
                    let op = || GroupOp {
                        op: Some(Op::Verify(VerifyRequest {
                            session_id: r.session_id,
                            tree: Some(wire),
                        })),
                    };
                    Self::mirror(&group, op, || s.verify(target, &tree))
                })
                .await?;
            tracing::Span::current().record("accepted", tokens.len());
            Ok(Response::new(self.step(tokens, &feats)?))
        }
        .instrument(span)
        .await
    }

    async fn decode(&self, req: Request<DecodeRequest>) -> Result<Response<Step>, Status> {
        let span = tracing::info_span!("worker.decode", session = %req.get_ref().session_id);
        eagle_trace::adopt(&span, req.metadata());
        async {
            let r = req.into_inner();
            let token = r.token;
            let group = self.group.clone();
            let id = r.session_id.clone();
            let (next, feats) = self
                .sessions
                .run(&id, &self.target, move |target, s| {
                    let op = || GroupOp {
                        op: Some(Op::Decode(r)),
                    };
                    Self::mirror(&group, op, || s.decode(target, token))
                })
                .await?;
            Ok(Response::new(self.step(vec![next], &feats)?))
        }
        .instrument(span)
        .await
    }

    async fn release(&self, req: Request<SessionRef>) -> Result<Response<Empty>, Status> {
        let span = tracing::info_span!("worker.release", session = %req.get_ref().session_id);
        eagle_trace::adopt(&span, req.metadata());
        let _g = span.enter();
        let id = req.into_inner().session_id;
        self.sessions.remove(&id);
        // A broken group has nothing left to free on the other ranks.
        if let Some(g) = self.group.clone().filter(|g| g.broken().is_none()) {
            let op = GroupOp {
                op: Some(Op::Release(SessionRef { session_id: id })),
            };
            tokio::task::spawn_blocking(move || g.mirror(&op, || Ok(())))
                .await
                .map_err(|e| Status::internal(format!("release: {e}")))??;
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
