//! The OpenAI-compatible HTTP API and the web chat page, served by the coordinator next to its
//! gRPC API, on the same runtime.
//!
//! - `openai.rs`: OpenAI's request bodies to the gRPC API's requests.
//! - `completions.rs`: `/v1/chat/completions` and `/v1/completions`, unary and streamed.
//! - `error.rs`: OpenAI's error object and the HTTP status of every failure.
//! - `page.html`: the chat page at `/` (no build step; everything it loads is served here).
//! - `tls.rs`: HTTPS, when the coordinator has a certificate.
//!
//! Invariants:
//! - An HTTP request is a gRPC request in another dress: the same validation, queue and step
//!   loop ([`Coordinator::start`]), so the tokens are the same for the same request.
//! - The API key, when keys are set, is checked by the same door ([`Coordinator::start`]) and
//!   by the model listing; `/` and `/health` stay open (the page asks for a key itself).
//! - A client that goes away (a closed connection, a dropped stream) cancels its request as a
//!   gRPC cancel does: the step loop sees its channel closed and releases its sessions.

mod completions;
pub mod error;
pub mod openai;
mod tls;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::Coordinator;
use error::ApiError;
use openai::Endpoint;

/// Request bodies past this are refused with 413 (the prompt limit is 1 MiB of text).
pub const MAX_BODY_BYTES: usize = 4 << 20;

const PAGE: &str = include_str!("page.html");

/// The HTTP API's routes over a coordinator.
pub fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route(
            "/v1/chat/completions",
            post(|s, h, b| completions::handle(s, h, b, Endpoint::Chat)),
        )
        .route(
            "/v1/completions",
            post(|s, h, b| completions::handle(s, h, b, Endpoint::Completions)),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(coord)
}

/// A bound HTTP listener, plain or TLS.
pub enum Listener {
    Plain(tokio::net::TcpListener),
    Tls(tls::TlsListener),
}

/// Binds `addr` and prints `http http://ADDR` (`https://` with `tls`) on stdout.
pub async fn bind(addr: &str, tls: Option<&eagle_proto::tls::Tls>) -> std::io::Result<Listener> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {addr} for HTTP: {e}"))
    })?;
    let local = listener.local_addr()?;
    let (scheme, l) = match tls {
        Some(t) => ("https", Listener::Tls(tls::TlsListener::new(listener, t)?)),
        None => ("http", Listener::Plain(listener)),
    };
    println!("http {scheme}://{local}");
    Ok(l)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: Listener,
    coord: Arc<Coordinator>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = router(coord);
    match listener {
        Listener::Plain(l) => {
            // Streamed chunks are small: Nagle's algorithm would hold them for delayed ACKs.
            let l = l.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(l, app).with_graceful_shutdown(shutdown).await
        }
        // (Nagle is off on TLS connections from their accept.)
        Listener::Tls(l) => axum::serve(l, app).with_graceful_shutdown(shutdown).await,
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn model_object(id: &str) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": created(), "owned_by": "eagle-serve"})
}

/// The `authorization` header, if it is text.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

fn authorize(c: &Coordinator, headers: &HeaderMap) -> Result<(), ApiError> {
    c.authorize(authorization(headers))
        .map_err(|s| ApiError::from_status(&s))
}

async fn models(State(c): State<Arc<Coordinator>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&c, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [model_object(c.model_name())]})).into_response()
}

async fn model(
    State(c): State<Arc<Coordinator>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = authorize(&c, &headers) {
        return e.into_response();
    }
    if id == c.model_name() {
        Json(model_object(&id)).into_response()
    } else {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model {id:?} does not exist here"),
            param: Some("model".into()),
        }
        .into_response()
    }
}

async fn health(State(c): State<Arc<Coordinator>>) -> Json<serde_json::Value> {
    let q = c.queue_stats().await;
    Json(json!({
        "status": "ok",
        "model": c.model_name(),
        "running": q.running,
        "waiting": q.waiting,
    }))
}
