//! W3C trace context (`traceparent`) in gRPC metadata, so that spans nest across processes:
//! a caller puts its current span's context into the request ([`outgoing`]), the callee makes
//! its handler span a child of it ([`adopt`]).

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetaInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetaInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetaExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetaExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// A request carrying the current span's trace context, with a deadline.
pub fn outgoing<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetaInjector(req.metadata_mut()));
    req
}

/// Makes `span` a child of the trace context the request carries (if any).
pub fn adopt(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    let cx = TraceContextPropagator::new().extract(&MetaExtractor(metadata));
    let _ = span.set_parent(cx);
}

/// The W3C `traceparent` of a span, for logs and tests.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut map = tonic::metadata::MetadataMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut MetaInjector(&mut map));
    map.get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// The trace id (32 hex digits) of the current span, when it is recorded: what a metric's
/// exemplar names so that a dashboard can jump from a latency bucket to the trace.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}
