//! OTLP export over gRPC (to an OpenTelemetry collector, Tempo, Jaeger...), and the count of
//! spans it could not deliver.
//!
//! Invariant: exporting never blocks or fails a request. Spans leave through the SDK's batch
//! processor (its own thread and bounded queue; `OTEL_BSP_*` tune it); a collector that is down
//! or slow costs dropped spans, counted in [`spans_dropped`] (the metric
//! `eagle_trace_spans_dropped_total`), and nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Whether the last export failed: failures are logged once per outage, not once per batch.
static FAILING: AtomicBool = AtomicBool::new(false);

/// Spans this process's exporter failed to deliver, since it started.
pub fn spans_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// An exporter that counts the spans of every batch it could not deliver.
#[derive(Debug)]
pub(crate) struct Counted<E>(pub(crate) E);

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let r = self.0.export(batch).await;
        match &r {
            Err(e) => {
                DROPPED.fetch_add(n, Ordering::Relaxed);
                if !FAILING.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "OTLP span export failing; spans are dropped (counted in eagle_trace_spans_dropped_total) until the collector answers");
                }
            }
            Ok(()) => {
                if FAILING.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP span export works again");
                }
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.0.set_resource(resource)
    }
}

/// The OTLP/gRPC exporter for `endpoint` (e.g. `http://collector:4317`). Must be built inside
/// a tokio runtime: its channel connects lazily on that runtime. The per-export deadline is the
/// exporter's own: `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` or `OTEL_EXPORTER_OTLP_TIMEOUT`
/// (milliseconds; default 10 s).
pub(crate) fn exporter(
    endpoint: &str,
) -> Result<Counted<opentelemetry_otlp::SpanExporter>, String> {
    opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map(Counted)
        .map_err(|e| e.to_string())
}
