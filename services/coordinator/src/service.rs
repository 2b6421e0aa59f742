//! The public `eagle.v1.Generation` service: validate, queue, run the step loop, answer.
//!
//! Both calls run the same loop in a task of its own and read its events from a channel; when
//! the client goes away (a dropped unary call or a closed stream) the channel closes, the loop
//! sees it before its next step, and it releases its sessions.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use eagle_proto::v1::generation_server::Generation;
use eagle_proto::v1::{GenerateChunk, GenerateRequest, GenerateResponse, SpeculationStats, Usage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::auth::ApiKeys;
use crate::backends::Backends;
use crate::generation::{run, Arrival, Event, Summary};
use crate::metrics::metrics;
use crate::queue::Queue;
use crate::request::{validate, Limits};

pub struct Coordinator {
    backends: Arc<Backends>,
    queue: Queue,
    /// None: the public API is open.
    keys: Option<ApiKeys>,
    next_id: AtomicU64,
    /// Distinguishes this process's session ids from an earlier run's.
    epoch: u64,
}

impl Coordinator {
    pub fn new(backends: Backends, queue: Queue) -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Coordinator {
            backends: Arc::new(backends),
            queue,
            keys: None,
            next_id: AtomicU64::new(1),
            epoch,
        }
    }

    /// Requires an API key on every request.
    pub fn with_keys(mut self, keys: Option<ApiKeys>) -> Self {
        self.keys = keys;
        self
    }

    /// Checks a request's `authorization` value without starting anything.
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), Status> {
        match &self.keys {
            Some(k) => k.check(authorization),
            None => Ok(()),
        }
    }

    /// Registers this process's coordinator metrics, the membership gauges reading this
    /// coordinator's view. Call once, inside the runtime.
    pub fn register_metrics(&self, max_running: usize, max_waiting: usize) {
        crate::metrics::register_all(&self.backends, max_running, max_waiting);
    }

    /// The name clients use for the served model.
    pub fn model_name(&self) -> &str {
        &self.backends.model_name
    }

    /// Requests generating and waiting now.
    pub async fn queue_stats(&self) -> crate::queue::QueueStats {
        self.queue.stats().await
    }

    /// Checks the API key, validates, waits for admission, starts the step loop; returns its
    /// events. Every front end (gRPC here, HTTP in `http/`) goes through this one door, and a
    /// request refused here is counted here (one that starts is counted when it ends).
    pub(crate) async fn start(
        &self,
        req: GenerateRequest,
        authorization: Option<&str>,
        span: tracing::Span,
    ) -> Result<mpsc::Receiver<Result<Event, Status>>, Status> {
        let r = self.admit_and_run(req, authorization, span.clone()).await;
        if let Err(e) = &r {
            metrics().ended(None, e.code());
            eagle_trace::rpc::finish(&span, &r);
        }
        r
    }

    async fn admit_and_run(
        &self,
        req: GenerateRequest,
        authorization: Option<&str>,
        span: tracing::Span,
    ) -> Result<mpsc::Receiver<Result<Event, Status>>, Status> {
        let arrived = Instant::now();
        let key = self
            .keys
            .as_ref()
            .map(|k| k.admit(authorization))
            .transpose()?;
        let b = &self.backends;
        let limits = Limits {
            model_name: b.model_name.clone(),
            max_context: b.max_context,
        };
        let job = span.in_scope(|| validate(&req, &b.tokenizer, &limits))?;
        request_attributes(&span, &b.model_name, &job);
        let id = format!(
            "{:x}-{}",
            self.epoch,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        span.record("session", id.as_str());
        let t0 = Instant::now();
        let permit = self
            .queue
            .admit()
            .instrument(tracing::info_span!(parent: &span, "queue"))
            .await?;
        let queued = t0.elapsed();
        let ex = span.in_scope(eagle_metrics::exemplar);
        metrics().queue_time.observe(queued.as_secs_f64(), ex, None);
        let arrival = Arrival {
            at: arrived,
            queue_ms: queued.as_secs_f64() * 1e3,
        };
        let (tx, rx) = mpsc::channel(32);
        let backends = self.backends.clone();
        tokio::spawn(
            async move {
                run(backends, job, id, tx, arrival).await;
                drop(permit);
                drop(key);
            }
            .instrument(span),
        );
        Ok(rx)
    }
}

/// The `authorization` metadata of a gRPC call, if it is text.
fn authorization(req: &Request<GenerateRequest>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

fn request_span(
    kind: &'static str,
    method: &'static str,
    req: &Request<GenerateRequest>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        kind,
        session = tracing::field::Empty,
        worker = tracing::field::Empty
    );
    eagle_trace::adopt(&span, req.metadata());
    eagle_trace::rpc::server(&span, "eagle.v1.Generation", method);
    span
}

/// The OpenTelemetry generative-AI attributes of a validated request (the usage ones are
/// added when it ends), and ours for speculation.
fn request_attributes(span: &tracing::Span, model: &str, job: &crate::request::Job) {
    use eagle_trace::rpc::attribute;
    let s = &job.sampling;
    attribute(span, "gen_ai.operation.name", "text_completion");
    attribute(span, "gen_ai.request.model", model.to_string());
    attribute(span, "gen_ai.request.max_tokens", job.max_new_tokens as i64);
    attribute(span, "gen_ai.request.temperature", f64::from(s.temperature));
    attribute(span, "gen_ai.request.top_p", f64::from(s.top_p));
    attribute(span, "gen_ai.request.top_k", s.top_k as i64);
    attribute(span, "gen_ai.request.seed", s.seed as i64);
    attribute(span, "eagle.speculation", job.spec.is_some());
    if let Some(spec) = &job.spec {
        attribute(span, "eagle.tree.total_token", i64::from(spec.total_token));
        attribute(span, "eagle.tree.depth", spec.depth as i64);
    }
}

pub(crate) fn stats(s: &Summary) -> (Usage, SpeculationStats) {
    (
        Usage {
            prompt_tokens: s.prompt_tokens as u32,
            generated_tokens: s.generated_tokens as u32,
            cached_prompt_tokens: s.cached_prompt_tokens as u32,
        },
        SpeculationStats {
            steps: s.steps as u32,
            mean_accepted: s.mean_accepted(),
            fallback_steps: s.fallback_steps as u32,
            load_plain_steps: s.load_plain_steps as u32,
            prefill_ms: s.prefill_ms,
            queue_ms: s.queue_ms,
            wall_ms: s.wall_ms,
            cached_prompt_tokens: s.cached_prompt_tokens as u32,
        },
    )
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for Coordinator {
    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let span = request_span("unary", "Generate", &req);
        let auth = authorization(&req);
        let mut rx = self.start(req.into_inner(), auth.as_deref(), span).await?;
        let mut out = GenerateResponse::default();
        while let Some(ev) = rx.recv().await {
            match ev? {
                Event::Delta { text, token_ids } => {
                    out.text.push_str(&text);
                    out.token_ids.extend_from_slice(&token_ids);
                }
                Event::Done(s) => {
                    let (usage, st) = stats(&s);
                    out.finish_reason = s.finish as i32;
                    out.usage = Some(usage);
                    out.stats = Some(st);
                    return Ok(Response::new(out));
                }
            }
        }
        Err(Status::internal("the generation ended without a result"))
    }

    type StreamGenerateStream = ChunkStream;

    async fn stream_generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let span = request_span("stream", "StreamGenerate", &req);
        let auth = authorization(&req);
        let rx = self.start(req.into_inner(), auth.as_deref(), span).await?;
        let stream = ReceiverStream::new(rx).map(|ev| {
            ev.map(|e| match e {
                Event::Delta { text, token_ids } => GenerateChunk {
                    text,
                    token_ids,
                    ..Default::default()
                },
                Event::Done(s) => {
                    let (usage, st) = stats(&s);
                    GenerateChunk {
                        finish_reason: s.finish as i32,
                        usage: Some(usage),
                        stats: Some(st),
                        ..Default::default()
                    }
                }
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
