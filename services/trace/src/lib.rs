//! eagle-trace: one tracing setup for every eagle-serve process, and trace context in gRPC
//! metadata.
//!
//! Each process logs to stderr (`EAGLE_LOG`, default `info`) and records spans through
//! OpenTelemetry (`EAGLE_TRACE_LEVEL`, default `info`). A request's spans (queue, prefill, each
//! draft, verify and commit step) form one trace across the coordinator, the draft service and
//! the workers ([`outgoing`] and [`adopt`] carry the context).
//!
//! Export, either or both:
//! - OTLP over gRPC when `--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT` is set, through a
//!   batch processor (`otlp.rs`). The standard variables apply: `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`,
//!   `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_TIMEOUT`.
//! - `EAGLE_TRACE_FILE=PATH`: finished spans are appended to PATH as JSON lines (trace id, span
//!   id, parent id, name, service, times, attributes); several processes may share one file.
//!
//! Resource: `service.name` (the binary's, unless `OTEL_SERVICE_NAME` says otherwise),
//! `service.version`, `service.instance.id` (host and process id), and what the process adds
//! (a worker's group and rank).

mod file_export;
mod otlp;
mod propagation;
pub mod rpc;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

pub use file_export::FileExporter;
pub use otlp::spans_dropped;
pub use propagation::{adopt, current_trace_id, outgoing, traceparent};

/// Trace export flags, shared by every binary.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TraceFlags {
    /// Export spans by OTLP over gRPC to this collector (e.g. http://127.0.0.1:4317). The
    /// other OTEL_* variables (service name, resource attributes, sampler, batch processor)
    /// apply as the OpenTelemetry specification says.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

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

/// The resource of this process: the detected one (OTEL_SERVICE_NAME,
/// OTEL_RESOURCE_ATTRIBUTES) with our defaults where it says nothing.
fn resource(service: &'static str, extra: Vec<KeyValue>) -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let mut b = Resource::builder().with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new(
            "service.instance.id",
            format!("{host}:{}", std::process::id()),
        ),
    ]);
    if !named {
        b = b.with_service_name(service);
    }
    b.with_attributes(extra).build()
}

/// Sets up logging and span recording for the process `service` (e.g. "eagle-worker"), with
/// extra resource attributes. Call inside the tokio runtime when OTLP export is on.
pub fn init(service: &'static str, flags: &TraceFlags, extra: Vec<KeyValue>) -> TraceGuard {
    let mut builder = SdkTracerProvider::builder().with_resource(resource(service, extra));
    if let Some(path) = std::env::var_os("EAGLE_TRACE_FILE") {
        match FileExporter::open(std::path::Path::new(&path), service) {
            Ok(e) => builder = builder.with_simple_exporter(e),
            Err(e) => eprintln!("warning: EAGLE_TRACE_FILE: {e}; spans are not exported"),
        }
    }
    if let Some(endpoint) = flags.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        match otlp::exporter(endpoint) {
            Ok(e) => builder = builder.with_batch_exporter(e),
            Err(e) => eprintln!("warning: OTLP export to {endpoint}: {e}; spans are not exported"),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);
    // Logs and spans are filtered apart: quiet logs must not lose a request's spans.
    // The OpenTelemetry SDK logs every failed export; ours says it once per outage
    // (`otlp.rs`). Its own logs show only when EAGLE_LOG names them.
    let log = std::env::var("EAGLE_LOG").unwrap_or_else(|_| "info".into());
    let log = if log.contains("opentelemetry") {
        log
    } else {
        format!("{log},opentelemetry_sdk=off,opentelemetry_otlp=off")
    };
    let log_filter = EnvFilter::try_new(&log).unwrap_or_else(|_| EnvFilter::new("info"));
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
