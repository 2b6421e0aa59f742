//! The worker's metrics (names and meaning: `docs/metrics.md`): time of each model call by
//! operation, live sessions and KV cache bytes against the budget, and for rank 0 of a
//! tensor-parallel group the time of each collective and the group's health.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use candle_core::Tensor;
use eagle_engine::parallel::Collective;
use eagle_metrics::{op_histograms, OpHistograms, OpLabel, StepMetrics};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::prefix_cache::PrefixCache;

pub(crate) static STEPS: LazyLock<StepMetrics> =
    LazyLock::new(|| StepMetrics::new(&["prefill", "verify", "decode"]));

static PASS_ROWS: LazyLock<Histogram> = LazyLock::new(|| {
    eagle_metrics::histogram(
        "eagle_batch_rows",
        "Rows (tokens) in one target pass, all sessions together",
        exponential_buckets(1.0, 2.0, 10),
    )
});

static PASS_SESSIONS: LazyLock<Histogram> = LazyLock::new(|| {
    eagle_metrics::histogram(
        "eagle_batch_sessions",
        "Sessions whose steps shared one target pass",
        exponential_buckets(1.0, 2.0, 8),
    )
});

/// Records one target pass of the scheduler.
pub(crate) fn observe_pass(sessions: usize, rows: usize) {
    PASS_SESSIONS.observe(sessions as f64);
    PASS_ROWS.observe(rows as f64);
}

static COLLECTIVES: LazyLock<OpHistograms> = LazyLock::new(|| {
    op_histograms(
        "eagle_collective_duration_seconds",
        "Tensor-parallel collectives run by rank 0",
        &["all_reduce", "all_gather"],
    )
});

/// Registers the worker's metrics: step times, the session table's gauges, and the group's
/// (`world` ranks; `healthy` read at scrape time).
pub fn register(
    sessions: impl Fn() -> usize + Send + Sync + 'static,
    cache_bytes: impl Fn() -> u64 + Send + Sync + 'static,
    cache_limit: u64,
    world: usize,
    healthy: impl Fn() -> bool + Send + Sync + 'static,
) {
    LazyLock::force(&STEPS);
    LazyLock::force(&COLLECTIVES);
    LazyLock::force(&PASS_ROWS);
    LazyLock::force(&PASS_SESSIONS);
    eagle_metrics::session_gauges(sessions, Some((Box::new(cache_bytes), cache_limit)));
    eagle_metrics::gauge_fn(
        "eagle_tp_world_size",
        "Ranks in this worker's group (1: not sharded)",
        move || world as f64,
    );
    eagle_metrics::gauge_fn(
        "eagle_tp_group_healthy",
        "1 while every rank of the group answers, 0 once one died",
        move || f64::from(u8::from(healthy())),
    );
}

/// Registers the prefix cache's metrics, read from it at scrape time.
pub(crate) fn register_prefix_cache(cache: Arc<Mutex<PrefixCache>>) {
    type Read<T> = fn(&PrefixCache) -> T;
    let counters: [(&str, &str, Read<u64>); 4] = [
        (
            "eagle_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            |c| c.stats().queried_tokens,
        ),
        (
            "eagle_prefix_cache_hit_tokens",
            "Prompt tokens taken from cached KV rather than computed (prefix cache or the session's own earlier turn)",
            |c| c.stats().hit_tokens,
        ),
        (
            "eagle_prefix_cache_inserted_blocks",
            "Blocks of tokens stored in the prefix cache",
            |c| c.stats().inserted_blocks,
        ),
        (
            "eagle_prefix_cache_evicted_blocks",
            "Blocks evicted from the prefix cache to make room (least recently used first)",
            |c| c.stats().evicted_blocks,
        ),
    ];
    let gauges: [(&str, &str, Read<f64>); 3] = [
        (
            "eagle_prefix_cache_bytes",
            "Bytes held by the prefix cache (KV, features and tokens of its blocks)",
            |c| c.bytes() as f64,
        ),
        (
            "eagle_prefix_cache_capacity_bytes",
            "The prefix cache's budget",
            |c| c.budget() as f64,
        ),
        (
            "eagle_prefix_cache_blocks",
            "Blocks held by the prefix cache",
            |c| c.len() as f64,
        ),
    ];
    fn lock(c: &Mutex<PrefixCache>) -> std::sync::MutexGuard<'_, PrefixCache> {
        c.lock().unwrap_or_else(|e| e.into_inner())
    }
    for (name, help, f) in counters {
        let c = cache.clone();
        eagle_metrics::counter_fn(name, help, move || f(&lock(&c)));
    }
    for (name, help, f) in gauges {
        let c = cache.clone();
        eagle_metrics::gauge_fn(name, help, move || f(&lock(&c)));
    }
}

/// A collective whose calls are timed into `eagle_collective_duration_seconds`.
#[derive(Debug)]
pub struct Timed(pub Arc<dyn Collective>);

impl Timed {
    fn time<T>(op: &'static str, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let r = f();
        COLLECTIVES
            .get_or_create(&OpLabel { op })
            .observe(t0.elapsed().as_secs_f64());
        r
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn all_reduce_sum(&self, x: &mut [f32]) -> eagle_engine::Result<()> {
        Self::time("all_reduce", || self.0.all_reduce_sum(x))
    }
    fn all_gather(&self, x: &[f32]) -> eagle_engine::Result<Vec<f32>> {
        Self::time("all_gather", || self.0.all_gather(x))
    }
    fn all_reduce_tensor(&self, t: &Tensor) -> eagle_engine::Result<Tensor> {
        Self::time("all_reduce", || self.0.all_reduce_tensor(t))
    }
    fn all_gather_tensor(&self, t: &Tensor) -> eagle_engine::Result<Tensor> {
        Self::time("all_gather", || self.0.all_gather_tensor(t))
    }
}
