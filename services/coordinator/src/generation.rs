//! One request's step loop across the services: prefill on the worker, then repeatedly draft
//! a tree on the draft service and verify it on the worker, streaming accepted text.
//!
//! Invariants:
//! - The emitted tokens are exactly the worker's choices: drafts only propose, so the output is
//!   what the in-process engine gives (token for token at T = 0).
//! - Draft trouble never fails a request: a draft call that errors or misses its deadline turns
//!   that step into a plain decode on the worker; after `draft_retry` the session is reopened
//!   on the draft side with every committed (token, feature) pair, and speculation resumes.
//! - However the request ends (done, failed, cancelled by the client), its sessions are
//!   released on the worker and the draft service; except that a multi-turn session's worker
//!   session (its KV cache) is kept after a turn that completed, and its placement recorded.
//! - A worker that cannot be reached at prefill (nothing generated yet) is passed over and the
//!   request starts from scratch on another; a worker lost later fails the request with
//!   `UNAVAILABLE`. Either way no call waits past its deadline.

use std::sync::Arc;
use std::time::Instant;

use eagle_engine::spec::{BatchLoad, SpecConfig};
use eagle_membership::Placement;
use eagle_proto::common::{Features, SessionRef};
use eagle_proto::draft::{DraftRequest, OpenRequest};
use eagle_proto::v1::FinishReason;
use eagle_proto::wire::{sampling_to_wire, spec_to_wire};
use eagle_proto::worker::worker_client::WorkerClient;
use eagle_proto::worker::{DecodeRequest, PrefillRequest, Step, VerifyRequest};
use eagle_trace::outgoing;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::backends::{worker_error, Backends, WorkerLease};
use crate::metrics::metrics;
use crate::request::Job;
use crate::sessions::worker_session_id;
use crate::text::TextStream;

/// What the step loop sends to the client side.
#[derive(Debug)]
pub enum Event {
    /// Newly accepted tokens and the text that became final with them.
    Delta {
        text: String,
        token_ids: Vec<u32>,
    },
    Done(Summary),
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Target passes, the prefill included.
    pub steps: usize,
    pub fallback_steps: usize,
    /// Steps decoded plainly because speculation did not pay at the load.
    pub load_plain_steps: usize,
    pub prefill_ms: f64,
    pub queue_ms: f64,
    pub wall_ms: f64,
    /// Prompt tokens reused from a session's KV cache.
    pub cached_prompt_tokens: usize,
}

impl Summary {
    pub fn mean_accepted(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.generated_tokens as f64 / self.steps as f64
        }
    }
}

pub type Events = mpsc::Sender<Result<Event, Status>>;

/// The draft side of one request.
enum DraftState {
    /// No speculation (not asked for, or no draft service).
    Off,
    /// Open under this session id; history chunks from `committed` on are not yet sent.
    Open { sid: String, committed: usize },
    /// Lost or never opened; try again at `retry_at`.
    Down { retry_at: Instant, attempt: u32 },
}

/// When a request arrived and how long it queued.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: Instant,
    pub queue_ms: f64,
}

/// Runs a job to the end, sending events; then releases its sessions. Counts the request in
/// the metrics however it ends.
pub async fn run(b: Arc<Backends>, job: Job, id: String, tx: Events, arrival: Arrival) {
    metrics().prompt_tokens.inc_by(job.prompt.len() as u64);
    let span = tracing::Span::current();
    let (finish, code) = match run_counted(b, job, id, tx, arrival).await {
        Ok(s) => {
            use eagle_trace::rpc::attribute;
            attribute(&span, "gen_ai.usage.input_tokens", s.prompt_tokens as i64);
            attribute(
                &span,
                "gen_ai.usage.output_tokens",
                s.generated_tokens as i64,
            );
            attribute(
                &span,
                "gen_ai.response.finish_reasons",
                crate::metrics::finish_label(s.finish),
            );
            attribute(&span, "eagle.target_passes", s.steps as i64);
            attribute(&span, "eagle.mean_accepted", s.mean_accepted());
            attribute(&span, "eagle.fallback_steps", s.fallback_steps as i64);
            (Some(s.finish), Code::Ok)
        }
        Err(code) => (None, code),
    };
    eagle_trace::rpc::attribute(&span, "rpc.grpc.status_code", code as i64);
    metrics().ended(finish, code);
}

async fn run_counted(
    b: Arc<Backends>,
    job: Job,
    id: String,
    tx: Events,
    arrival: Arrival,
) -> Result<Summary, Code> {
    let session = job.session.clone();
    let claim = match session.as_deref() {
        Some(s) => b.sessions.claim(s).await.map(Some),
        None => Ok(None),
    };
    let claim = match claim {
        Ok(c) => c,
        Err(e) => {
            let code = e.code();
            let _ = tx.send(Err(e)).await;
            return Err(code);
        }
    };
    let placed = session.as_deref().and_then(|s| b.sessions.lookup(s));
    let lease = match b
        .workers
        .lease(placed.as_ref().map(|p| p.group.as_str()), &job.prompt)
        .await
    {
        Ok(l) => l,
        Err(e) => {
            let code = e.code();
            let _ = tx.send(Err(e)).await;
            return Err(code);
        }
    };
    tracing::Span::current().record("worker", lease.addr.as_str());
    let worker_sid = session
        .as_deref()
        .map_or_else(|| id.clone(), worker_session_id);
    let mut run = Run {
        lease,
        b: b.clone(),
        job,
        id: id.clone(),
        worker_sid,
        cached_len: 0,
        history: Vec::new(),
        draft: DraftState::Off,
        summary: Summary {
            queue_ms: arrival.queue_ms,
            ..Default::default()
        },
        tokens: Vec::new(),
        arrived: arrival.at,
        last_token_at: None,
    };
    let result = run.drive(&tx).await;
    let draft_sid = match &run.draft {
        DraftState::Open { sid, .. } => Some(sid.clone()),
        _ => None,
    };
    let keep = result.is_ok() && run.summary.finish != FinishReason::Cancelled;
    match session.as_deref() {
        Some(s) if keep => {
            release(&b, None, &run.worker_sid, draft_sid).await;
            b.sessions.record(
                s,
                Placement {
                    group: run.lease.group.clone(),
                    addr: run.lease.addr.clone(),
                    worker_session: run.worker_sid.clone(),
                    cached_tokens: run.cached_len as u32,
                },
            );
        }
        _ => {
            release(&b, Some(&run.lease.client), &run.worker_sid, draft_sid).await;
            if let Some(s) = session.as_deref() {
                b.sessions.forget(s);
            }
        }
    }
    drop(run.lease);
    drop(claim);
    match result {
        Ok(()) => {
            if run.summary.generated_tokens > 0 {
                let m = metrics();
                m.e2e.observe(
                    arrival.at.elapsed().as_secs_f64(),
                    eagle_metrics::exemplar(),
                    None,
                );
            }
            let _ = tx.send(Ok(Event::Done(run.summary.clone()))).await;
            Ok(run.summary)
        }
        Err(e) => {
            tracing::warn!(session = %id, error = %e.message(), "request failed");
            let code = e.code();
            let _ = tx.send(Err(e)).await;
            Err(code)
        }
    }
}

/// Releases the worker session (when given a worker) and closes the draft session.
async fn release(
    b: &Backends,
    worker: Option<&WorkerClient<Channel>>,
    id: &str,
    draft_sid: Option<String>,
) {
    let t = b.timeouts.draft;
    let worker = async {
        match worker {
            Some(w) => w
                .clone()
                .release(outgoing(
                    SessionRef {
                        session_id: id.into(),
                    },
                    t,
                ))
                .await
                .map(|_| ()),
            None => Ok(()),
        }
    };
    let draft = async {
        if let (Some(sid), Some(mut d)) = (draft_sid, b.draft_client()) {
            // A draft session left behind idles out; nothing to report.
            let _ = d.close(outgoing(SessionRef { session_id: sid }, t)).await;
        }
    };
    if let (Err(e), ()) = tokio::join!(worker, draft) {
        tracing::warn!(session = %id, error = %e.message(), "worker release failed; the session will idle out");
    }
}

struct Run {
    b: Arc<Backends>,
    lease: WorkerLease,
    job: Job,
    /// The request's id (its draft session's).
    id: String,
    /// The worker's session id: the request's, or for a multi-turn session one per session.
    worker_sid: String,
    /// Tokens in the worker's cache (the prompt, then every token run since).
    cached_len: usize,
    /// Every committed (tokens, features) chunk, in order: what reopening the draft side needs.
    history: Vec<(Vec<u32>, Features)>,
    draft: DraftState,
    summary: Summary,
    tokens: Vec<u32>,
    /// When the request arrived, and when it last sent a token (for the latency metrics).
    arrived: Instant,
    last_token_at: Option<Instant>,
}

impl Run {
    fn spec(&self) -> Option<&SpecConfig> {
        self.job.spec.as_ref()
    }

    async fn drive(&mut self, tx: &Events) -> Result<(), Status> {
        let t0 = Instant::now();
        let b = self.b.clone();
        let job = self.job.clone();
        self.summary.prompt_tokens = job.prompt.len();
        let tree_room = self.spec().map_or(0, |s| s.node_budget() + 1);
        let capacity = job.prompt.len() + job.max_new_tokens + tree_room + 1;
        let mut text = TextStream::new(&b.tokenizer, job.stop.clone());

        let step = self.prefill(capacity).await?;
        self.summary.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.summary.cached_prompt_tokens = step.cached_tokens as usize;
        let (toks, feats) = split_step(step, Some(job.prompt.len()))?;
        let mut last = toks[0];
        let mut shifted = job.prompt[1..].to_vec();
        shifted.push(last);
        self.history.push((shifted, feats));
        let mut going = self.accept(&toks, &mut text, tx).await;
        let mut run_len = job.prompt.len();

        if going && self.spec().is_some() && b.draft_client().is_some() {
            self.draft = DraftState::Down {
                retry_at: Instant::now(),
                attempt: 0,
            };
        }
        let depth = self.spec().map_or(0, |s| s.depth);
        let explores = self.spec().is_some() && b.spec_load.explores();
        // The worker's pass costs, for the choices by load below (fixed while the cluster runs).
        let cost = b.cost_profile();
        while going {
            if tx.is_closed() {
                self.summary.finish = FinishReason::Cancelled;
                break;
            }
            let room = run_len + depth < b.max_context;
            // Automatic trees give way to plain decoding where the load makes them cost more
            // than they gain (see `load.rs`); a fixed tree size is the caller's choice. Greedy
            // requests only: at T > 0 a step's random draws depend on whether it speculated,
            // and a seeded request must give the same tokens whatever the load.
            let auto =
                self.spec().is_some_and(|s| s.total_token == -1) && self.job.sampling.is_greedy();
            let by_load = room
                && auto
                && !explores
                && !matches!(self.draft, DraftState::Off)
                && !b.spec_load.pays(&cost, self.lease.sessions());
            let drafting = Instant::now();
            let tree = if room && !by_load {
                // An automatic greedy tree is sized for the whole pass it joins.
                let load = if auto {
                    b.spec_load.others(&cost, self.lease.sessions())
                } else {
                    BatchLoad::default()
                };
                self.draft_tree(last, load).await
            } else {
                None
            };
            let draft_s = drafting.elapsed().as_secs_f64();
            let nodes = tree.as_ref().map(|t| t.tokens.len());
            let step = match tree {
                Some(tree) => {
                    let n = tree.tokens.len();
                    async {
                        self.lease
                            .client
                            .clone()
                            .verify(outgoing(
                                VerifyRequest {
                                    session_id: self.worker_sid.clone(),
                                    tree: Some(tree),
                                },
                                b.timeouts.worker,
                            ))
                            .await
                            .map_err(|e| worker_error("verify", e))
                    }
                    .instrument(tracing::info_span!("verify", nodes = n))
                    .await?
                }
                None => {
                    let fallback = !matches!(self.draft, DraftState::Off) && !by_load;
                    if fallback {
                        self.summary.fallback_steps += 1;
                    }
                    if by_load {
                        self.summary.load_plain_steps += 1;
                        metrics().load_plain_steps.inc();
                    }
                    metrics().decoded(fallback);
                    async {
                        self.lease
                            .client
                            .clone()
                            .decode(outgoing(
                                DecodeRequest {
                                    session_id: self.worker_sid.clone(),
                                    token: last,
                                },
                                b.timeouts.worker,
                            ))
                            .await
                            .map_err(|e| worker_error("decode", e))
                    }
                    .instrument(tracing::info_span!("decode"))
                    .await?
                }
            }
            .into_inner();
            let (toks, feats) = split_step(step, None)?;
            if let Some(n) = nodes {
                metrics().verified(n, toks.len());
                if auto {
                    b.spec_load.observe(n, toks.len(), draft_s);
                }
            }
            // The root (the previous last token) and the accepted path were run.
            run_len += toks.len();
            last = *toks.last().expect("split_step checked");
            self.history.push((toks.clone(), feats));
            going = self.accept(&toks, &mut text, tx).await;
        }
        let rest = text
            .finish()
            .map_err(|e| eagle_proto::status::from_engine(&e))?;
        if !rest.is_empty() {
            let _ = tx
                .send(Ok(Event::Delta {
                    text: rest,
                    token_ids: Vec::new(),
                }))
                .await;
        }
        self.cached_len = run_len;
        self.summary.generated_tokens = self.tokens.len();
        self.summary.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Prefills the prompt (only its uncached part, for a session whose cache is there). A
    /// worker that cannot be reached is passed over: the request starts again on another
    /// group, as long as there is another to try.
    async fn prefill(&mut self, capacity: usize) -> Result<Step, Status> {
        let b = self.b.clone();
        let n = self.job.prompt.len();
        let mut tried = vec![self.lease.group.clone()];
        loop {
            let req = PrefillRequest {
                session_id: self.worker_sid.clone(),
                tokens: self.job.prompt.clone(),
                capacity: capacity as u32,
                sampling: Some(sampling_to_wire(&self.job.sampling)),
                reuse_cache: self.job.session.is_some(),
            };
            let r = async {
                self.lease
                    .client
                    .clone()
                    .prefill(outgoing(req, b.timeouts.worker))
                    .await
                    .map_err(|e| worker_error("prefill", e))
            }
            .instrument(tracing::info_span!("prefill", tokens = n, worker = %self.lease.addr))
            .await;
            let e = match r {
                Ok(step) => return Ok(step.into_inner()),
                Err(e) if e.code() == Code::Unavailable && tried.len() < 3 => e,
                Err(e) => return Err(e),
            };
            b.workers.suspect(&self.lease.group);
            let next = b.workers.lease(None, &self.job.prompt).await?;
            if tried.contains(&next.group) {
                return Err(e);
            }
            tracing::warn!(session = %self.id, failed = %self.lease.addr, next = %next.addr, error = %e.message(), "worker unreachable; starting over on another");
            tracing::Span::current().record("worker", next.addr.as_str());
            tried.push(next.group.clone());
            self.lease = next;
        }
    }

    /// Takes a step's tokens: EOS, the length limit and stop strings end the generation.
    /// Sends the accepted part; returns false when the generation is over.
    async fn accept(&mut self, toks: &[u32], text: &mut TextStream<'_>, tx: &Events) -> bool {
        self.summary.steps += 1;
        let mut taken = Vec::new();
        let mut finish = None;
        for &t in toks {
            if self.b.tokenizer.eos_ids().contains(&t) {
                finish = Some(FinishReason::Eos);
                break;
            }
            taken.push(t);
            match text.push(t) {
                Ok(true) => {
                    finish = Some(FinishReason::Stop);
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "detokenising failed");
                }
            }
            if self.tokens.len() + taken.len() >= self.job.max_new_tokens {
                finish = Some(FinishReason::Length);
                break;
            }
        }
        self.observe_latency(taken.len());
        metrics().generation_tokens.inc_by(taken.len() as u64);
        self.tokens.extend_from_slice(&taken);
        let delta = text.take();
        if (!taken.is_empty() || !delta.is_empty())
            && tx
                .send(Ok(Event::Delta {
                    text: delta,
                    token_ids: taken,
                }))
                .await
                .is_err()
        {
            finish = Some(FinishReason::Cancelled);
        }
        match finish {
            Some(f) => {
                self.summary.finish = f;
                false
            }
            None => true,
        }
    }

    /// Time to first token, or the inter-token latency of `n` new tokens (the gap since the
    /// last ones, divided over them).
    fn observe_latency(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let (m, now, ex) = (metrics(), Instant::now(), eagle_metrics::exemplar());
        match self.last_token_at {
            None => m.ttft.observe((now - self.arrived).as_secs_f64(), ex, None),
            Some(t) => {
                let gap = (now - t).as_secs_f64() / n as f64;
                for _ in 0..n {
                    m.itl.observe(gap, ex.clone(), None);
                }
            }
        }
        self.last_token_at = Some(now);
    }

    /// A tree from the draft side, or None (no speculation, or the draft side failed).
    async fn draft_tree(
        &mut self,
        root: u32,
        load: BatchLoad,
    ) -> Option<eagle_proto::common::Tree> {
        let b = self.b.clone();
        let mut client = b.draft_client()?;
        if let DraftState::Down { retry_at, attempt } = self.draft {
            if Instant::now() < retry_at {
                return None;
            }
            match self.open_draft(&mut client, attempt).await {
                Ok(sid) => {
                    self.draft = DraftState::Open {
                        sid,
                        committed: self.history.len(),
                    }
                }
                Err(e) => {
                    metrics().draft_unavailable.inc();
                    tracing::warn!(session = %self.id, error = %e.message(), "draft service unavailable; decoding plainly");
                    self.draft = DraftState::Down {
                        retry_at: Instant::now() + b.timeouts.draft_retry,
                        attempt: attempt + 1,
                    };
                    return None;
                }
            }
        }
        let DraftState::Open { sid, committed } = &self.draft else {
            return None;
        };
        let (sid, committed) = (sid.clone(), *committed);
        let (commit_tokens, commit_features) = concat(&self.history[committed..]);
        let n_commit = commit_tokens.len();
        let res = async {
            client
                .draft(outgoing(
                    DraftRequest {
                        session_id: sid.clone(),
                        commit_tokens,
                        commit_features,
                        root,
                        batch_rows: load.rows as f32,
                        batch_tokens: load.tokens as f32,
                    },
                    b.timeouts.draft,
                ))
                .await
        }
        .instrument(tracing::info_span!("draft", committed = n_commit))
        .await;
        match res {
            Ok(r) => {
                self.draft = DraftState::Open {
                    sid,
                    committed: self.history.len(),
                };
                r.into_inner().tree
            }
            Err(e) => {
                metrics().draft_unavailable.inc();
                tracing::warn!(session = %self.id, code = ?e.code(), error = %e.message(), "drafting failed; decoding plainly");
                // Close the old session in the background in case it is still there.
                let mut c = client.clone();
                let t = b.timeouts.draft;
                tokio::spawn(async move {
                    let _ = c.close(outgoing(SessionRef { session_id: sid }, t)).await;
                });
                self.draft = DraftState::Down {
                    retry_at: Instant::now() + b.timeouts.draft_retry,
                    attempt: 1,
                };
                None
            }
        }
    }

    /// Opens a draft session holding every committed pair so far.
    async fn open_draft(
        &self,
        client: &mut eagle_proto::draft::draft_client::DraftClient<tonic::transport::Channel>,
        attempt: u32,
    ) -> Result<String, Status> {
        let b = &self.b;
        let spec = self.spec().expect("speculating");
        let sid = if attempt == 0 {
            self.id.clone()
        } else {
            format!("{}#{attempt}", self.id)
        };
        let (tokens, features) = concat(&self.history);
        let capacity = self.job.prompt.len() + self.job.max_new_tokens + spec.node_budget() + 2;
        client
            .open(outgoing(
                OpenRequest {
                    session_id: sid.clone(),
                    capacity: capacity as u32,
                    sampling: Some(sampling_to_wire(&self.job.sampling)),
                    spec: Some(spec_to_wire(spec)),
                    cost_tokens: b.cost.iter().map(|c| c.tokens).collect(),
                    cost_seconds: b.cost.iter().map(|c| c.seconds).collect(),
                    tokens,
                    features,
                },
                b.timeouts.draft,
            ))
            .instrument(tracing::info_span!("draft_open", attempt))
            .await?;
        Ok(sid)
    }
}

/// A worker step's tokens and features, checked: `rows` feature rows (default: one per token).
fn split_step(step: Step, rows: Option<usize>) -> Result<(Vec<u32>, Features), Status> {
    let f = step
        .features
        .ok_or_else(|| Status::internal("the worker sent a step without features"))?;
    if step.tokens.is_empty() || f.rows as usize != rows.unwrap_or(step.tokens.len()) {
        return Err(Status::internal(format!(
            "the worker sent {} tokens with {} feature rows",
            step.tokens.len(),
            f.rows
        )));
    }
    Ok((step.tokens, f))
}

/// Chunks of (tokens, features) as one.
fn concat(chunks: &[(Vec<u32>, Features)]) -> (Vec<u32>, Option<Features>) {
    if chunks.is_empty() {
        return (Vec::new(), None);
    }
    let mut tokens = Vec::new();
    let first = &chunks[0].1;
    let mut f = Features {
        rows: 0,
        hidden: first.hidden,
        dtype: first.dtype,
        data: Vec::new(),
    };
    for (t, x) in chunks {
        tokens.extend_from_slice(t);
        f.rows += x.rows;
        f.data.extend_from_slice(&x.data);
    }
    (tokens, Some(f))
}
