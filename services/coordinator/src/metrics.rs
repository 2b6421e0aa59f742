//! The coordinator's metrics (names and meaning: `docs/metrics.md`): request latencies with
//! exemplars, request and token counts, the queue, speculation (draft and accepted tokens,
//! acceptance per position, tree size, tokens per pass, fallback), and membership.
//!
//! Invariants: every request that reaches [`Coordinator::start`](crate::Coordinator) is
//! counted once in `eagle_requests_total`, however it ends; a verify pass that accepted k draft
//! tokens adds exactly k to the accepted counter and 1 at each position 0..k-1, so the
//! per-position counts sum to the accepted count.

use std::sync::{Arc, LazyLock};

use eagle_metrics::{counter, gauge, histogram, latency, register, LatencyHistogram};
use eagle_proto::v1::FinishReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::backends::Backends;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub finish_reason: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Position {
    pub position: u32,
}

pub struct Metrics {
    pub ttft: LatencyHistogram,
    pub itl: LatencyHistogram,
    pub e2e: LatencyHistogram,
    pub queue_time: LatencyHistogram,
    pub requests: Family<Outcome, Counter>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub running: Gauge,
    pub waiting: Gauge,
    pub running_limit: Gauge,
    pub waiting_limit: Gauge,
    pub draft_tokens: Counter,
    pub accepted_tokens: Counter,
    pub accepted_per_pos: Family<Position, Counter>,
    pub tree_size: Histogram,
    pub tokens_per_pass: Histogram,
    pub plain_steps: Counter,
    pub load_plain_steps: Counter,
    pub draft_unavailable: Counter,
    pub routing: Family<RouteReason, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    ttft: latency(
        "eagle_time_to_first_token_seconds",
        "Arrival of a request to its first generated token",
    ),
    itl: latency(
        "eagle_inter_token_latency_seconds",
        "Time between successive generated tokens of a request",
    ),
    e2e: latency(
        "eagle_e2e_request_latency_seconds",
        "Arrival to the last token of a request that generated",
    ),
    queue_time: latency(
        "eagle_request_queue_time_seconds",
        "Time a request waited for admission",
    ),
    requests: register(
        "eagle_requests",
        "Requests that ended, by finish reason and gRPC status code",
        Family::default(),
    ),
    prompt_tokens: counter("eagle_prompt_tokens", "Prompt tokens of requests that ran"),
    generation_tokens: counter("eagle_generation_tokens", "Tokens generated"),
    running: gauge("eagle_requests_running", "Requests generating now"),
    waiting: gauge("eagle_requests_waiting", "Requests waiting for a slot"),
    running_limit: gauge(
        "eagle_requests_running_limit",
        "Requests generating at once, at most",
    ),
    waiting_limit: gauge(
        "eagle_requests_waiting_limit",
        "Requests waiting at most; past it, RESOURCE_EXHAUSTED",
    ),
    draft_tokens: counter(
        "eagle_spec_decode_draft_tokens",
        "Draft tokens proposed (tree nodes, the root not counted)",
    ),
    accepted_tokens: counter(
        "eagle_spec_decode_accepted_tokens",
        "Draft tokens accepted (the bonus token not counted)",
    ),
    accepted_per_pos: register(
        "eagle_spec_decode_accepted_tokens_per_pos",
        "Accepted draft tokens by their position in the accepted path",
        Family::default(),
    ),
    tree_size: histogram(
        "eagle_spec_decode_tree_size",
        "Nodes of each verified tree, the root included",
        [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0].into_iter(),
    ),
    tokens_per_pass: histogram(
        "eagle_spec_decode_tokens_per_pass",
        "Tokens each target pass after the prefill gave",
        (1..=10).map(f64::from),
    ),
    plain_steps: counter(
        "eagle_spec_decode_plain_steps",
        "Plain decode steps of requests that asked for speculation",
    ),
    load_plain_steps: counter(
        "eagle_spec_load_plain_steps",
        "Plain decode steps chosen because speculation did not pay at the worker's load",
    ),
    draft_unavailable: counter(
        "eagle_draft_unavailable",
        "Draft calls that failed or missed their deadline",
    ),
    routing: register(
        "eagle_routing_decisions",
        "Worker groups chosen for new sessions, by why",
        Family::default(),
    ),
});

/// This process's coordinator metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The `finish_reason` label of a finish reason.
pub fn finish_label(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Eos => "eos",
        FinishReason::Cancelled => "cancelled",
        _ => "none",
    }
}

/// The `code` label of a gRPC code: its canonical upper-case name.
pub fn code_label(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Metrics {
    /// Counts a request that ended with `code` (finish reason `none` unless it generated).
    pub fn ended(&self, finish: Option<FinishReason>, code: tonic::Code) {
        self.requests
            .get_or_create(&Outcome {
                finish_reason: finish.map_or("none", finish_label),
                code: code_label(code),
            })
            .inc();
    }

    /// A verify pass of a `nodes`-node tree (root included) that gave `tokens` tokens.
    pub fn verified(&self, nodes: usize, tokens: usize) {
        let accepted = tokens.saturating_sub(1);
        self.draft_tokens.inc_by(nodes.saturating_sub(1) as u64);
        self.accepted_tokens.inc_by(accepted as u64);
        for position in 0..accepted as u32 {
            self.accepted_per_pos
                .get_or_create(&Position { position })
                .inc();
        }
        self.tree_size.observe(nodes as f64);
        self.tokens_per_pass.observe(tokens as f64);
    }

    /// A plain decode pass; `fallback` when the request asked for speculation.
    pub fn decoded(&self, fallback: bool) {
        if fallback {
            self.plain_steps.inc();
        }
        self.tokens_per_pass.observe(1.0);
    }

    /// A worker group chosen for a new session.
    pub fn routed(&self, reason: crate::prefix_routing::Reason) {
        self.routing
            .get_or_create(&RouteReason {
                reason: reason.label(),
            })
            .inc();
    }
}

/// Membership gauges, refreshed every second from the coordinator's view.
pub struct MembershipGauges {
    etcd_reachable: Gauge,
    members: Family<Kind, Gauge>,
    worker_groups: Gauge,
    placements: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// Registers the coordinator's metrics, so that every series exists before its first event,
/// and starts refreshing the membership gauges from `b` (while it lives). Call once, inside
/// the runtime.
pub fn register_all(b: &Arc<Backends>, max_running: usize, max_waiting: usize) {
    let m = metrics();
    m.running_limit.set(max_running as i64);
    m.waiting_limit.set(max_waiting as i64);
    let _ = m.accepted_per_pos.get_or_create(&Position { position: 0 });
    let _ = m.requests.get_or_create(&Outcome {
        finish_reason: "stop",
        code: "OK",
    });
    let g = MembershipGauges {
        etcd_reachable: gauge(
            "eagle_etcd_reachable",
            "1 while etcd answers the membership watch (0 without etcd)",
        ),
        members: register(
            "eagle_members",
            "Members registered in etcd, by kind, as this coordinator sees them",
            Family::default(),
        ),
        worker_groups: gauge("eagle_worker_groups", "Complete, routable worker groups"),
        placements: gauge(
            "eagle_kv_placements",
            "Multi-turn sessions whose KV cache placement is recorded",
        ),
    };
    let weak = Arc::downgrade(b);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(b) = weak.upgrade() else { break };
            let m = b.workers.membership();
            g.etcd_reachable.set(i64::from(m.etcd_reachable));
            for (kind, n) in [("worker", m.workers), ("draft", m.drafts)] {
                g.members.get_or_create(&Kind { kind }).set(n as i64);
            }
            g.worker_groups.set(m.groups as i64);
            g.placements.set(b.sessions.count() as i64);
        }
    });
}
