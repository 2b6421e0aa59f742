//! eagle-metrics: Prometheus metrics for every eagle-serve process.
//!
//! One registry per process. A service declares its metrics once (its own `metrics.rs`),
//! registering them here; [`serve`] answers `GET /metrics` in the OpenMetrics text format on
//! `--metrics-addr`. The names and their meaning are the contract of `docs/metrics.md`, which
//! the dashboard, the alerting rules and the Prometheus test read.
//!
//! - Latency histograms carry exemplars naming the trace of a request that fell in the bucket
//!   ([`LatencyHistogram`], [`exemplar`]), so a dashboard can jump from a spike to its trace.
//! - Values a service already keeps (live sessions, cache bytes) are read at scrape time
//!   ([`gauge_fn`]) rather than copied on every change.
//! - Every process also exports `eagle_build_info`, `eagle_trace_spans_dropped_total` and the
//!   standard `process_*` metrics (`process.rs`).

mod process;
mod scrape;
mod server;

use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

pub use scrape::{counter_fn, gauge_fn};
pub use server::{encode, serve};

/// Metrics flags, shared by every binary.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetricsFlags {
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics (port 0 picks a free
    /// port); prints `metrics http://ADDR/metrics` on stdout once it accepts connections. Keep
    /// it off the public API's address: it needs no API key.
    #[arg(long, env = "EAGLE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

/// Registers `metric` under `name` (a counter's `_total` suffix is added when encoding) and
/// returns it, to be kept and updated by the caller.
pub fn register<M: Metric + Clone>(name: &str, help: &str, metric: M) -> M {
    REGISTRY
        .lock()
        .expect("metrics registry")
        .register(name, help, metric.clone());
    metric
}

pub(crate) fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    f(&mut REGISTRY.lock().expect("metrics registry"))
}

/// An exemplar's labels: the trace of the observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceExemplar {
    pub trace_id: String,
}

/// A latency histogram (seconds) whose buckets remember the trace of a request that fell in
/// them.
pub type LatencyHistogram = HistogramWithExemplars<TraceExemplar>;

/// The current span's trace, as an exemplar (None when the span is not recorded or sampled).
pub fn exemplar() -> Option<TraceExemplar> {
    eagle_trace::current_trace_id().map(|trace_id| TraceExemplar { trace_id })
}

/// Buckets for request latencies: 5 ms to about 82 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}

/// Buckets for one model call or collective: 0.25 ms to about 8 s, doubling.
pub fn step_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.00025, 2.0, 16)
}

/// A latency histogram with exemplars, registered.
pub fn latency(name: &str, help: &str) -> LatencyHistogram {
    register(name, help, LatencyHistogram::new(latency_buckets()))
}

/// A histogram with the given buckets, registered.
pub fn histogram(name: &str, help: &str, buckets: impl Iterator<Item = f64>) -> Histogram {
    register(name, help, Histogram::new(buckets))
}

/// A counter, registered (`name` without `_total`).
pub fn counter(name: &str, help: &str) -> Counter {
    register(name, help, Counter::default())
}

/// A gauge, registered.
pub fn gauge(name: &str, help: &str) -> Gauge {
    register(name, help, Gauge::default())
}

/// A family of step-time histograms by the label `op`.
pub type OpHistograms = Family<OpLabel, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// Step-time histograms by `op`, registered, with `ops` created up front so that each series
/// exists (with zero counts) before its first observation.
pub fn op_histograms(name: &str, help: &str, ops: &[&'static str]) -> OpHistograms {
    let f: OpHistograms = Family::new_with_constructor(|| Histogram::new(step_buckets()));
    for &op in ops {
        let _ = f.get_or_create(&OpLabel { op });
    }
    register(name, help, f)
}

/// Registers what every process exports: `eagle_build_info{binary, version}`, the dropped
/// spans of the trace exporter, and the `process_*` metrics. Call once, at start.
pub fn init_process(service: &'static str) {
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Build {
        binary: &'static str,
        version: &'static str,
    }
    let info: Family<Build, Gauge> = Family::default();
    info.get_or_create(&Build {
        binary: service,
        version: env!("CARGO_PKG_VERSION"),
    })
    .set(1);
    register(
        "eagle_build_info",
        "Which eagle-serve binary and version",
        info,
    );
    counter_fn(
        "eagle_trace_spans_dropped",
        "Spans the OTLP exporter could not deliver (collector down or slow)",
        eagle_trace::spans_dropped,
    );
    with_registry(|r| r.register_collector(Box::new(process::ProcessCollector)));
}

/// Registers the process metrics of `service` and, with `--metrics-addr`, serves them. Call
/// after the service registered its own metrics and before it prints `listening`.
pub async fn start(flags: &MetricsFlags, service: &'static str) -> std::io::Result<()> {
    init_process(service);
    if let Some(addr) = &flags.metrics_addr {
        serve(addr).await?;
    }
    Ok(())
}

/// What every model-serving service (worker, draft service) exports about its model calls:
/// `eagle_step_duration_seconds{op}`.
pub struct StepMetrics {
    steps: OpHistograms,
}

impl StepMetrics {
    /// Registers the histogram with the series of `ops`.
    pub fn new(ops: &[&'static str]) -> Self {
        StepMetrics {
            steps: op_histograms(
                "eagle_step_duration_seconds",
                "Time of one model call, the wait for its session included",
                ops,
            ),
        }
    }

    /// Records one call of `op` that started at `t0`.
    pub fn observe(&self, op: &'static str, t0: std::time::Instant) {
        self.steps
            .get_or_create(&OpLabel { op })
            .observe(t0.elapsed().as_secs_f64());
    }
}

/// `eagle_sessions` (and, given a budget, `eagle_kv_cache_bytes` and
/// `eagle_kv_cache_capacity_bytes`) read at scrape time.
pub fn session_gauges(
    sessions: impl Fn() -> usize + Send + Sync + 'static,
    cache: Option<(Box<dyn Fn() -> u64 + Send + Sync + 'static>, u64)>,
) {
    gauge_fn("eagle_sessions", "Live sessions", move || sessions() as f64);
    if let Some((bytes, capacity)) = cache {
        gauge_fn(
            "eagle_kv_cache_bytes",
            "KV cache bytes held by live sessions",
            move || bytes() as f64,
        );
        gauge_fn(
            "eagle_kv_cache_capacity_bytes",
            "The KV cache budget",
            move || capacity as f64,
        );
    }
}
