//! The coordinator's view of the services it drives: a verification worker and, optionally,
//! a draft service, each behind a lazily connecting gRPC channel (a restarted service is found
//! again on the next call), with a deadline on every call.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eagle_engine::tokenizer::Tokenizer;
use eagle_proto::draft::draft_client::DraftClient;
use eagle_proto::worker::worker_client::WorkerClient;
use eagle_proto::worker::CostPoint;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

pub struct Backends {
    pub workers: WorkerPool,
    pub draft: Option<DraftClient<Channel>>,
    /// The worker's measured verification costs (for automatic tree sizes).
    pub cost: Vec<CostPoint>,
    pub tokenizer: Tokenizer,
    pub model_name: String,
    pub max_context: usize,
    pub timeouts: Timeouts,
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Deadline of each worker call (prefill of a long prompt included).
    pub worker: Duration,
    /// Deadline of each draft call; past it, the step decodes plainly.
    pub draft: Duration,
    /// After a draft failure, how long to decode plainly before trying the draft side again.
    pub draft_retry: Duration,
}

/// A channel to `addr` (`host:port` or a URL) that connects on first use and reconnects after
/// failures.
pub fn channel(addr: &str) -> Result<Channel, Status> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(url)
        .map_err(|e| Status::invalid_argument(format!("bad address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    Ok(ep.connect_lazy())
}

pub fn worker_client(addr: &str) -> Result<WorkerClient<Channel>, Status> {
    Ok(WorkerClient::new(channel(addr)?).max_decoding_message_size(64 << 20))
}

pub fn draft_client(addr: &str) -> Result<DraftClient<Channel>, Status> {
    Ok(DraftClient::new(channel(addr)?).max_decoding_message_size(64 << 20))
}

/// A worker failure as the client should see it: a worker that cannot be reached, or that did
/// not answer in time, makes the request `UNAVAILABLE`; other codes pass through.
pub fn worker_error(what: &str, s: Status) -> Status {
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
            Status::unavailable(format!("verification worker: {what}: {}", s.message()))
        }
        _ => Status::new(
            s.code(),
            format!("verification worker: {what}: {}", s.message()),
        ),
    }
}

/// Verification workers serving the same model; each session stays on the worker it started
/// on (its KV cache lives there), and new sessions go to the least busy one.
pub struct WorkerPool {
    workers: Vec<(String, WorkerClient<Channel>, Arc<AtomicUsize>)>,
}

/// A session's place on a worker; dropping it frees the place.
pub struct WorkerLease {
    pub client: WorkerClient<Channel>,
    pub addr: String,
    active: Arc<AtomicUsize>,
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkerPool {
    pub fn new(addrs: &[String]) -> Result<Self, Status> {
        if addrs.is_empty() {
            return Err(Status::invalid_argument("no verification worker given"));
        }
        let workers = addrs
            .iter()
            .map(|a| Ok((a.clone(), worker_client(a)?, Arc::new(AtomicUsize::new(0)))))
            .collect::<Result<_, Status>>()?;
        Ok(WorkerPool { workers })
    }

    pub fn all(&self) -> impl Iterator<Item = (&str, &WorkerClient<Channel>)> {
        self.workers.iter().map(|(a, c, _)| (a.as_str(), c))
    }

    /// The worker with the fewest sessions from this coordinator.
    pub fn lease(&self) -> WorkerLease {
        let (addr, client, active) = self
            .workers
            .iter()
            .min_by_key(|(_, _, n)| n.load(Ordering::Relaxed))
            .expect("a pool has a worker");
        active.fetch_add(1, Ordering::Relaxed);
        WorkerLease {
            client: client.clone(),
            addr: addr.clone(),
            active: active.clone(),
        }
    }
}
