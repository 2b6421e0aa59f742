//! eagle-worker: the target side of a cluster, as a gRPC service.
//!
//! A session is one sequence's KV cache plus its sampling state. The coordinator prefills a
//! prompt, then alternates verifying draft trees (or decoding one token when no draft is
//! available) until it releases the session. All model math is the engine's
//! [`TargetSession`]; this crate only validates, schedules and serialises.
//!
//! Invariants:
//! - A session's last chosen token is known here, and every tree or decode must start from it,
//!   so a confused or malicious caller cannot desynchronise the cache.
//! - A session knows the tokens its cache holds (and their features), so a later turn of a
//!   multi-turn conversation (`reuse_cache`) keeps only the prefix that matches its prompt
//!   token by token and runs the rest: the cache then holds exactly what a fresh prefill of the
//!   whole prompt would, and the kernels' batch invariance makes the logits the same bits.

use std::sync::Arc;
use std::time::Duration;

use candle_core::DType;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{choose, Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::CostProfile;
use eagle_proto::common::{Empty, Features, SessionRef};
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::{from_engine, invalid};
use eagle_proto::wire::{features_to_wire, sampling_from_wire, tree_from_wire};
use eagle_proto::worker::worker_server::Worker;
use eagle_proto::worker::{
    CostPoint, DecodeRequest, PrefillRequest, Step, VerifyRequest, WorkerInfo,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// One sequence on the worker.
struct Sequence {
    sess: TargetSession,
    sampling: SamplingParams,
    rng: Rng,
    /// The last chosen token: not yet run through the target, the root of the next tree.
    last: u32,
    /// The tokens in the cache, in position order, and their features in wire form.
    cached: Vec<u32>,
    features: Vec<u8>,
}

impl Sequence {
    /// Records tokens just run into the cache, with their features.
    fn commit(&mut self, tokens: &[u32], f: &Features) {
        self.cached.extend_from_slice(tokens);
        self.features.extend_from_slice(&f.data);
    }

    /// Forgets everything after the first `n` cached tokens.
    fn truncate(&mut self, n: usize, row_bytes: usize) {
        self.cached.truncate(n);
        self.features.truncate(n * row_bytes);
        self.sess.cache.truncate(n);
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub struct WorkerService {
    target: Arc<TargetModel>,
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
        let sessions = SessionTable::new(opts.cache_limit_bytes, opts.idle_timeout);
        sessions.spawn_reaper();
        WorkerService {
            target: Arc::new(target),
            model_name: opts.model_name,
            wire_dtype: opts.wire_dtype,
            cost,
            sessions,
        }
    }

    /// Bytes of one token's features on the wire.
    fn row_bytes(&self) -> usize {
        self.target.cfg.hidden_size * self.wire_dtype.size_in_bytes()
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
            let id = r.session_id.clone();
            let reuse = r.reuse_cache && self.sessions.contains(&id);
            if !reuse {
                let sess =
                    TargetSession::new(&self.target, capacity).map_err(|e| from_engine(&e))?;
                let bytes = sess.cache.bytes() as u64;
                let seq = Sequence {
                    sess,
                    rng: Rng::new(sampling.seed),
                    sampling: sampling.clone(),
                    last: 0,
                    cached: Vec::new(),
                    features: Vec::new(),
                };
                self.sessions.insert(&id, seq, bytes)?;
            }
            let tokens = r.tokens;
            let (wire, row_bytes, hidden) = (self.wire_dtype, self.row_bytes(), cfg.hidden_size);
            let table = self.sessions.clone();
            let sid = id.clone();
            let result = self
                .sessions
                .run(&id, &self.target, move |target, s| {
                    // The longest cached prefix of the prompt, leaving at least one token to run
                    // (its logits choose the next token).
                    let keep = if reuse {
                        common_prefix(&s.cached, &tokens).min(tokens.len() - 1)
                    } else {
                        0
                    };
                    s.truncate(keep, row_bytes);
                    if capacity > s.sess.cache.capacity() {
                        let per_slot = s.sess.cache.bytes() / s.sess.cache.capacity().max(1);
                        table.resize(&sid, (capacity * per_slot) as u64)?;
                        s.sess.cache.grow(capacity).map_err(|e| from_engine(&e))?;
                    }
                    s.sampling = sampling;
                    s.rng = Rng::new(s.sampling.seed);
                    let (feats, logits) = s
                        .sess
                        .prefill(target, &tokens[keep..])
                        .map_err(|e| from_engine(&e))?;
                    s.last = choose(&logits, &s.sampling, &mut s.rng);
                    let f = features_to_wire(&feats, wire)?;
                    s.commit(&tokens[keep..], &f);
                    let all = Features {
                        rows: s.cached.len() as u32,
                        hidden: hidden as u32,
                        dtype: f.dtype,
                        data: s.features.clone(),
                    };
                    Ok(Step {
                        tokens: vec![s.last],
                        features: Some(all),
                        cached_tokens: keep as u32,
                    })
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
            let wire_dtype = self.wire_dtype;
            let step = self
                .sessions
                .run(&r.session_id, &self.target, move |target, s| {
                    if tree.tokens[0] != s.last {
                        return Err(Status::failed_precondition(format!(
                            "verify: the tree's root {} is not the session's last token {}",
                            tree.tokens[0], s.last
                        )));
                    }
                    let room = s.sess.cache.capacity() - s.sess.cache.len();
                    if tree.len() > room {
                        return Err(Status::out_of_range(format!(
                            "verify: {} nodes but the session has room for {room}",
                            tree.len()
                        )));
                    }
                    let (sampling, rng) = (&s.sampling, &mut s.rng);
                    let v = s
                        .sess
                        .verify(target, &tree, sampling, rng)
                        .map_err(|e| from_engine(&e))?;
                    let root = s.last;
                    let (bonus, path) = v
                        .verdict
                        .tokens
                        .split_last()
                        .expect("a verdict has a bonus token");
                    let f = features_to_wire(&v.features, wire_dtype)?;
                    let mut run = vec![root];
                    run.extend_from_slice(path);
                    s.commit(&run, &f);
                    s.last = *bonus;
                    Ok(Step {
                        tokens: v.verdict.tokens,
                        features: Some(f),
                        cached_tokens: 0,
                    })
                })
                .await?;
            tracing::Span::current().record("accepted", step.tokens.len());
            Ok(Response::new(step))
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
            let wire_dtype = self.wire_dtype;
            let step = self
                .sessions
                .run(&r.session_id, &self.target, move |target, s| {
                    if token != s.last {
                        return Err(Status::failed_precondition(format!(
                            "decode: token {token} is not the session's last token {}",
                            s.last
                        )));
                    }
                    if s.sess.cache.len() >= s.sess.cache.capacity() {
                        return Err(Status::out_of_range("decode: the session's cache is full"));
                    }
                    let (feats, logits) =
                        s.sess.decode(target, token).map_err(|e| from_engine(&e))?;
                    s.last = choose(&logits, &s.sampling, &mut s.rng);
                    let f = features_to_wire(&feats, wire_dtype)?;
                    s.commit(&[token], &f);
                    Ok(Step {
                        tokens: vec![s.last],
                        features: Some(f),
                        cached_tokens: 0,
                    })
                })
                .await?;
            Ok(Response::new(step))
        }
        .instrument(span)
        .await
    }

    async fn release(&self, req: Request<SessionRef>) -> Result<Response<Empty>, Status> {
        let span = tracing::info_span!("worker.release", session = %req.get_ref().session_id);
        eagle_trace::adopt(&span, req.metadata());
        let _g = span.enter();
        self.sessions.remove(&req.get_ref().session_id);
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
