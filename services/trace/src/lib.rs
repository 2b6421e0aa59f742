//! eagle-trace: one tracing setup for every eagle-serve process, and trace context in gRPC
//! metadata.
//!
//! Each process logs to stderr (`EAGLE_LOG`, default `info`) and records spans through
//! OpenTelemetry (`EAGLE_TRACE_LEVEL`, default `info`). A caller puts its current span's
//! context into the request metadata as a W3C `traceparent` header ([`outgoing`]); the callee
//! makes its handler span a child of it ([`adopt`]). So a request's spans (queue, prefill,
//! each draft, verify and commit step) form one trace across the coordinator, the draft service
//! and the workers.
//!
//! Export: with `EAGLE_TRACE_FILE=PATH`, finished spans are appended to PATH as JSON lines
//! (trace id, span id, parent id, name, service, times, attributes); several processes may
//! share one file. OTLP export to a collector plugs in at the same place.

mod file_export;

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

pub use file_export::FileExporter;

/// Keeps the span pipeline alive; dropping it flushes and shuts it down.
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(2));
    }
}

/// Sets up logging and span recording for the process `service` (e.g. "coordinator").
pub fn init(service: &'static str) -> TraceGuard {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    if let Some(path) = std::env::var_os("EAGLE_TRACE_FILE") {
        match FileExporter::open(std::path::Path::new(&path), service) {
            Ok(e) => builder = builder.with_simple_exporter(e),
            Err(e) => eprintln!("warning: EAGLE_TRACE_FILE: {e}; spans are not exported"),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);
    // Logs and spans are filtered apart: quiet logs must not lose a request's spans.
    let log_filter =
        EnvFilter::try_from_env("EAGLE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let span_filter =
        EnvFilter::try_from_env("EAGLE_TRACE_LEVEL").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(log_filter);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(span_filter);
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    TraceGuard { provider }
}

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
