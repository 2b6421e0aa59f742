//! eagle-draft: the draft side of a cluster, as a gRPC service.
//!
//! A session is one sequence's EAGLE head cache, its sampling and speculation settings and
//! its own random stream. The coordinator opens it with the prompt's (token, feature) pairs,
//! then each step commits the pairs the worker accepted and asks for a tree rooted at the last
//! chosen token. All model math is the engine's [`Drafter`]; this crate only validates,
//! schedules and serialises.
//!
//! Losslessness does not depend on this service: the worker verifies every tree against the
//! target, so a wrong, slow or missing draft only costs speed.

mod batcher;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use eagle_engine::draft::{DraftSession, Drafter};
use eagle_engine::sampling::{Rng, SamplingParams};
use eagle_engine::spec::{BatchLoad, CostProfile, SpecConfig, TreeBudget};
use eagle_proto::common::{Empty, Features, SessionRef};
use eagle_proto::draft::draft_server::Draft;
use eagle_proto::draft::{CommitRequest, DraftInfo, DraftRequest, DraftResponse, OpenRequest};
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::{from_engine, invalid};
use eagle_proto::wire::{features_from_wire, sampling_from_wire, spec_from_wire, tree_to_wire};
use tonic::{Request, Response, Status};

pub(crate) struct Sequence {
    ds: DraftSession,
    sampling: SamplingParams,
    spec: SpecConfig,
    budget: TreeBudget,
    rng: Rng,
}

/// `eagle_step_duration_seconds{op="open"|"draft"}` (docs/metrics.md).
static STEPS: LazyLock<eagle_metrics::StepMetrics> =
    LazyLock::new(|| eagle_metrics::StepMetrics::new(&["open", "draft"]));

/// `eagle_draft_batch_sessions` (docs/metrics.md).
static BATCH_SESSIONS: LazyLock<prometheus_client::metrics::histogram::Histogram> =
    LazyLock::new(|| {
        eagle_metrics::histogram(
            "eagle_draft_batch_sessions",
            "Sessions whose draft trees were built together, one head pass per tree level",
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 8),
        )
    });

/// Records one batch of the draft scheduler.
pub(crate) fn observe_batch(sessions: usize) {
    BATCH_SESSIONS.observe(sessions as f64);
}

pub struct DraftService {
    drafter: Arc<Drafter>,
    model_name: String,
    head_name: String,
    sessions: Arc<SessionTable<Sequence>>,
    batcher: batcher::Batcher,
    /// Measured seconds per draft level; added to the worker's costs that sessions bring.
    draft_level_s: f64,
}

pub struct DraftOptions {
    pub model_name: String,
    pub head_name: String,
    pub cache_limit_bytes: u64,
    pub idle_timeout: Duration,
    /// Sessions whose trees one batch drafts together, at most.
    pub max_batch_sessions: usize,
}

/// The draft stream's seed: distinct from the worker's stream of the same request seed, so
/// drafting and verification draw independent randomness.
fn draft_seed(seed: u64) -> u64 {
    seed ^ 0x9e37_79b9_7f4a_7c15
}

impl DraftService {
    /// Must be called inside a tokio runtime (it starts the idle-session reaper).
    pub fn new(drafter: Drafter, opts: DraftOptions) -> Self {
        let sessions = SessionTable::new(opts.cache_limit_bytes, opts.idle_timeout);
        sessions.spawn_reaper();
        let draft_level_s = drafter
            .measure_level_cost(eagle_engine::SpecConfig::default().top_k)
            .unwrap_or_else(|e| {
                tracing::warn!("cannot time a draft level ({e}); trees are sized without it");
                0.0
            });
        tracing::info!(ms = draft_level_s * 1e3, "draft level cost measured");
        let drafter = Arc::new(drafter);
        let batcher =
            batcher::Batcher::start(drafter.clone(), sessions.clone(), opts.max_batch_sessions);
        DraftService {
            drafter,
            model_name: opts.model_name,
            head_name: opts.head_name,
            sessions,
            batcher,
            draft_level_s,
        }
    }

    /// Live sessions, read by the membership registration as this service's load.
    /// Registers the draft service's metrics: step times and live sessions.
    pub fn register_metrics(&self) {
        LazyLock::force(&STEPS);
        LazyLock::force(&BATCH_SESSIONS);
        let sessions = self.sessions.clone();
        eagle_metrics::session_gauges(move || sessions.len(), None);
    }

    pub fn load_probe(&self) -> impl Fn() -> u32 + Send + Sync + 'static {
        let sessions = self.sessions.clone();
        move || sessions.len() as u32
    }

    /// Checks pairs from the wire and queues them on the session.
    pub(crate) fn commit(
        drafter: &Drafter,
        s: &mut Sequence,
        tokens: &[u32],
        feats: Option<&Features>,
    ) -> Result<(), Status> {
        if tokens.is_empty() {
            return Ok(());
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= drafter.vocab_size()) {
            return Err(invalid(format!(
                "token {t} is outside the vocabulary of {}",
                drafter.vocab_size()
            )));
        }
        let f = feats.ok_or_else(|| invalid("tokens without features"))?;
        let width = drafter.head.feature_width();
        let t = features_from_wire(f, width, &drafter.head.device)?;
        s.ds.push(tokens, &t).map_err(|e| from_engine(&e))
    }
}

#[tonic::async_trait]
impl Draft for DraftService {
    async fn open(&self, req: Request<OpenRequest>) -> Result<Response<Empty>, Status> {
        let span = tracing::info_span!("draft.open", session = %req.get_ref().session_id, tokens = req.get_ref().tokens.len());
        eagle_trace::adopt(&span, req.metadata());
        let t0 = std::time::Instant::now();
        let r = eagle_trace::rpc::handle(span, "eagle.draft.v1.Draft", "Open", async {
            let r = req.into_inner();
            let sampling = sampling_from_wire(r.sampling.as_ref())?;
            let spec = spec_from_wire(r.spec.as_ref())?;
            if r.cost_tokens.len() != r.cost_seconds.len() {
                return Err(invalid("cost profile: tokens and seconds differ in length"));
            }
            let profile = (!r.cost_tokens.is_empty()).then(|| {
                CostProfile {
                    points: r
                        .cost_tokens
                        .iter()
                        .zip(&r.cost_seconds)
                        .map(|(&n, &s)| (n as usize, s))
                        .collect(),
                    draft_level_s: self.draft_level_s,
                }
                .monotone()
            });
            let budget = TreeBudget::for_spec(&spec, profile);
            let capacity = r.capacity as usize + spec.draft_slots();
            let max = self.drafter.head.cfg.max_position_embeddings + 1024;
            if r.capacity == 0 || capacity > max {
                return Err(invalid(format!(
                    "open: capacity {} outside 1..{max}",
                    r.capacity
                )));
            }
            let ds = self.drafter.open(capacity).map_err(|e| from_engine(&e))?;
            let bytes = ds.cache_bytes() as u64;
            let seq = Sequence {
                ds,
                rng: Rng::new(draft_seed(sampling.seed)),
                sampling,
                spec,
                budget,
            };
            self.sessions.insert(&r.session_id, seq, bytes)?;
            let id = r.session_id.clone();
            let res = self
                .sessions
                .run(&id, &self.drafter, move |d, s| {
                    Self::commit(d, s, &r.tokens, r.features.as_ref())
                })
                .await;
            if let Err(e) = res {
                self.sessions.remove(&id);
                return Err(e);
            }
            Ok(Response::new(Empty {}))
        })
        .await;
        STEPS.observe("open", t0);
        r
    }

    async fn draft(&self, req: Request<DraftRequest>) -> Result<Response<DraftResponse>, Status> {
        let span = tracing::info_span!("draft.draft", session = %req.get_ref().session_id, committed = req.get_ref().commit_tokens.len(), nodes = tracing::field::Empty);
        eagle_trace::adopt(&span, req.metadata());
        let t0 = std::time::Instant::now();
        let r = eagle_trace::rpc::handle(span, "eagle.draft.v1.Draft", "Draft", async {
            let r = req.into_inner();
            let load =
                BatchLoad::checked(r.batch_rows as f64, r.batch_tokens as f64).map_err(invalid)?;
            let tree = self
                .batcher
                .submit(
                    r.session_id,
                    r.commit_tokens,
                    r.commit_features,
                    r.root,
                    load,
                )
                .await?;
            tracing::Span::current().record("nodes", tree.len());
            Ok(Response::new(DraftResponse {
                tree: Some(tree_to_wire(&tree)),
            }))
        })
        .await;
        STEPS.observe("draft", t0);
        r
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<Empty>, Status> {
        let span = tracing::info_span!("draft.commit", session = %req.get_ref().session_id, tokens = req.get_ref().tokens.len());
        eagle_trace::adopt(&span, req.metadata());
        eagle_trace::rpc::handle(span, "eagle.draft.v1.Draft", "Commit", async {
            let r = req.into_inner();
            self.sessions
                .run(&r.session_id, &self.drafter, move |d, s| {
                    Self::commit(d, s, &r.tokens, r.features.as_ref())
                })
                .await?;
            Ok(Response::new(Empty {}))
        })
        .await
    }

    async fn close(&self, req: Request<SessionRef>) -> Result<Response<Empty>, Status> {
        let span = tracing::info_span!("draft.close", session = %req.get_ref().session_id);
        eagle_trace::adopt(&span, req.metadata());
        let _g = span.enter();
        self.sessions.remove(&req.get_ref().session_id);
        Ok(Response::new(Empty {}))
    }

    async fn info(&self, _req: Request<Empty>) -> Result<Response<DraftInfo>, Status> {
        Ok(Response::new(DraftInfo {
            model: self.model_name.clone(),
            head: self.head_name.clone(),
            active_sessions: self.sessions.len() as u32,
            cache_bytes: self.sessions.bytes(),
            cache_bytes_limit: self.sessions.limit_bytes(),
        }))
    }
}
