//! `POST /v1/chat/completions` and `POST /v1/completions`: one body in, either one JSON answer
//! or server-sent events in OpenAI's chunk format.
//!
//! Invariants:
//! - Errors found before the first token (bad parameters, a full queue, no worker, a busy
//!   session) are HTTP errors with their status; the stream starts only with the first event
//!   of the step loop in hand. An error after that is an `error` event, then the end.
//! - A streamed answer sends one chunk per target pass (its accepted tokens in
//!   `eagle.token_ids`), so a client sees which tokens came in one step; then the finish
//!   chunk with the statistics, the usage chunk when asked (`stream_options.include_usage`),
//!   and `data: [DONE]`.
//! - Dropping the response (the client went away) drops the event receiver, which is what
//!   cancels a gRPC call too.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use eagle_proto::v1::FinishReason;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::error::ApiError;
use super::openai::{parse, Endpoint};
use crate::generation::{Event, Summary};
use crate::service::stats;
use crate::Coordinator;

/// What every chunk and answer of one request shares.
struct Answer {
    ep: Endpoint,
    id: String,
    created: u64,
    model: String,
    speculation: bool,
}

fn next_id(ep: Endpoint) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    });
    let prefix = match ep {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    format!(
        "{prefix}-{epoch:x}{:06}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens},
    })
}

fn eagle_stats(s: &Summary, speculation: bool) -> Value {
    let (_, st) = stats(s);
    json!({
        "speculation": speculation,
        "steps": st.steps,
        "mean_accepted": st.mean_accepted,
        "fallback_steps": st.fallback_steps,
        "load_plain_steps": st.load_plain_steps,
        "prefill_ms": st.prefill_ms,
        "queue_ms": st.queue_ms,
        "wall_ms": st.wall_ms,
        "cached_prompt_tokens": st.cached_prompt_tokens,
    })
}

impl Answer {
    /// One streamed chunk: `text` is the delta, `finish` set on the last one.
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        let choice = match self.ep {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completions => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.ep {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn whole(&self, text: &str, token_ids: &[u32], s: &Summary) -> Value {
        let finish = finish_name(s.finish);
        let choice = match self.ep {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completions => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        let mut eagle = eagle_stats(s, self.speculation);
        eagle["token_ids"] = json!(token_ids);
        json!({
            "id": self.id,
            "object": match self.ep {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(s),
            "eagle": eagle,
        })
    }
}

pub async fn handle(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    ep: Endpoint,
) -> Response {
    match run(c, headers, body, ep).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run(
    c: Arc<Coordinator>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    ep: Endpoint,
) -> Result<Response, ApiError> {
    // The key first: a caller without one learns nothing else, not even what is wrong with
    // the body.
    let auth = super::authorization(&headers).map(str::to_owned);
    let checked = (|| {
        c.authorize(auth.as_deref())
            .map_err(|s| ApiError::from_status(&s))?;
        let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
        let req = parse(&body)?;
        let grpc = req.to_grpc(ep, c.model_name())?;
        Ok::<_, ApiError>((req, grpc))
    })();
    // Refused here, before the common door: counted here (the door counts the rest).
    let (req, grpc) = checked.inspect_err(|e| {
        crate::metrics::metrics().ended(None, e.grpc_code());
    })?;
    let span = tracing::info_span!(
        "request",
        kind = if req.stream { "http-stream" } else { "http" },
        session = tracing::field::Empty,
        worker = tracing::field::Empty,
        user = req.user.as_deref().unwrap_or(""),
    );
    eagle_trace::adopt(&span, &tonic::metadata::MetadataMap::from_headers(headers));
    let speculation = grpc
        .speculation
        .as_ref()
        .and_then(|s| s.enabled)
        .unwrap_or(true);
    let mut rx = c
        .start(grpc, auth.as_deref(), span)
        .await
        .map_err(|s| ApiError::from_status(&s))?;
    let answer = Answer {
        ep,
        id: next_id(ep),
        created: super::created(),
        model: c.model_name().to_string(),
        speculation,
    };
    if !req.stream {
        return unary(answer, &mut rx)
            .await
            .map(|v| Json(v).into_response());
    }
    // The first event decides between an HTTP error and a stream.
    let first = match rx.recv().await {
        None => return Err(ended()),
        Some(Err(s)) => return Err(ApiError::from_status(&s)),
        Some(Ok(ev)) => ev,
    };
    let (tx, out) = mpsc::channel::<Result<Sse, Infallible>>(64);
    tokio::spawn(forward(answer, req.include_usage(), first, rx, tx));
    Ok(axum::response::Sse::new(ReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn ended() -> ApiError {
    ApiError::from_status(&Status::internal("the generation ended without a result"))
}

async fn unary(
    answer: Answer,
    rx: &mut mpsc::Receiver<Result<Event, Status>>,
) -> Result<Value, ApiError> {
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev.map_err(|s| ApiError::from_status(&s))? {
            Event::Delta { text: t, token_ids } => {
                text.push_str(&t);
                ids.extend_from_slice(&token_ids);
            }
            Event::Done(s) => return Ok(answer.whole(&text, &ids, &s)),
        }
    }
    Err(ended())
}

fn data(v: &Value) -> Result<Sse, Infallible> {
    Ok(Sse::default().data(v.to_string()))
}

/// Turns the step loop's events into chunks until the end, or until the client is gone
/// (a failed send), which drops `rx` and so cancels the request.
async fn forward(
    answer: Answer,
    include_usage: bool,
    first: Event,
    mut rx: mpsc::Receiver<Result<Event, Status>>,
    tx: mpsc::Sender<Result<Sse, Infallible>>,
) {
    if answer.ep == Endpoint::Chat
        && tx
            .send(data(&answer.chunk(Some(""), None, true)))
            .await
            .is_err()
    {
        return;
    }
    let mut next = Some(Ok(first));
    let mut failed = false;
    while let Some(ev) = next.take() {
        let chunks = match ev {
            Ok(Event::Delta { text, token_ids }) => {
                let mut c = answer.chunk(Some(&text), None, false);
                c["eagle"] = json!({"token_ids": token_ids});
                vec![c]
            }
            Ok(Event::Done(s)) => {
                let mut last = answer.chunk(None, Some(finish_name(s.finish)), false);
                last["eagle"] = eagle_stats(&s, answer.speculation);
                let mut v = vec![last];
                if include_usage {
                    let mut u = answer.chunk(None, None, false);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    v.push(u);
                }
                v
            }
            Err(s) => {
                failed = true;
                vec![ApiError::from_status(&s).body()]
            }
        };
        for c in &chunks {
            if tx.send(data(c)).await.is_err() {
                return;
            }
        }
        next = tokio::select! {
            ev = rx.recv() => ev,
            _ = tx.closed() => return,
        };
    }
    if !failed {
        let _ = tx.send(Ok(Sse::default().data("[DONE]"))).await;
    }
}
