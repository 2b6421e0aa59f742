//! `GET /metrics`: the registry in the OpenMetrics text format (which carries exemplars), on
//! an address of its own, apart from the public API and its keys.

use std::net::SocketAddr;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::with_registry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every registered metric, in the OpenMetrics text format.
pub fn encode() -> String {
    let mut out = String::new();
    with_registry(|r| prometheus_client::encoding::text::encode(&mut out, r))
        .expect("writing to a String cannot fail");
    out
}

async fn metrics() -> impl IntoResponse {
    ([(CONTENT_TYPE, OPENMETRICS)], encode())
}

/// Binds `addr`, prints `metrics http://ADDR/metrics` on stdout, and serves in the background
/// for the life of the runtime. Call before the service prints its `listening` line.
pub async fn serve(addr: &str) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot serve metrics on {addr}: {e}"))
    })?;
    let local = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(metrics));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the metrics endpoint stopped");
        }
    });
    println!("metrics http://{local}/metrics");
    Ok(local)
}
