//! Span attributes from the OpenTelemetry semantic conventions: RPC (`rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code`) on every gRPC handler span, and the
//! status of the call.

use opentelemetry::trace::Status as OtelStatus;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Marks `span` as the server side of the gRPC call `service`/`method` (e.g.
/// `eagle.worker.Worker`, `Verify`).
pub fn server(span: &tracing::Span, service: &'static str, method: &'static str) {
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service);
    span.set_attribute("rpc.method", method);
}

/// Records how a call ended: `rpc.grpc.status_code` (0 for OK) and, on an error, the span's
/// status with the message.
pub fn finish<T>(span: &tracing::Span, result: &Result<T, tonic::Status>) {
    match result {
        Ok(_) => span.set_attribute("rpc.grpc.status_code", 0i64),
        Err(e) => {
            span.set_attribute("rpc.grpc.status_code", e.code() as i64);
            span.set_status(OtelStatus::error(e.message().to_string()));
        }
    }
}

/// Sets one attribute on `span` (for values known only after the span started).
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    span.set_attribute(key, value);
}

/// Runs a gRPC handler's `body` inside `span` (already adopted from the caller's metadata),
/// marked as the server side of `service`/`method`, and records how it ended.
pub async fn handle<T>(
    span: tracing::Span,
    service: &'static str,
    method: &'static str,
    body: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    use tracing::Instrument;
    server(&span, service, method);
    let r = body.instrument(span.clone()).await;
    finish(&span, &r);
    r
}
