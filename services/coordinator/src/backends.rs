//! The coordinator's view of the services it drives: a verification worker and, optionally,
//! a draft service, each behind a lazily connecting gRPC channel (a restarted service is found
//! again on the next call), with a deadline on every call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eagle_engine::spec::CostProfile;
use eagle_engine::tokenizer::Tokenizer;
use eagle_proto::draft::draft_client::DraftClient;
use eagle_proto::worker::worker_client::WorkerClient;
use eagle_proto::worker::CostPoint;
use tonic::transport::Channel;
use tonic::{Code, Status};

use eagle_membership::Kind;

use crate::load::SpecLoad;
use crate::membership::{EtcdRoutes, SUSPECT_FOR};
use crate::metrics::metrics;
use crate::prefix_routing::{block_keys, PrefixIndex, Reason};
use crate::sessions::SessionPlacements;

pub struct Backends {
    pub workers: WorkerPool,
    /// A static draft service; with etcd and none given, drafts come from `etcd`.
    pub draft: Option<DraftClient<Channel>>,
    pub etcd: Option<Arc<EtcdRoutes>>,
    /// Multi-turn sessions: where their KV caches live.
    pub sessions: SessionPlacements,
    /// The worker's measured verification costs (for automatic tree sizes).
    pub cost: Vec<CostPoint>,
    /// Whether speculation pays at the current load (see [`crate::load`]).
    pub spec_load: SpecLoad,
    pub tokenizer: Tokenizer,
    pub model_name: String,
    pub max_context: usize,
    pub timeouts: Timeouts,
}

impl Backends {
    /// The worker's pass costs as the engine's cost model reads them.
    pub fn cost_profile(&self) -> CostProfile {
        CostProfile {
            points: self
                .cost
                .iter()
                .map(|c| (c.tokens as usize, c.seconds))
                .collect(),
            draft_level_s: 0.0,
        }
        .monotone()
    }

    /// The draft service to use now, if any.
    pub fn draft_client(&self) -> Option<DraftClient<Channel>> {
        self.draft
            .clone()
            .or_else(|| self.etcd.as_ref().and_then(|r| r.draft()))
    }
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
/// failures; over TLS when the process has it (`eagle_proto::tls`).
pub fn channel(addr: &str) -> Result<Channel, Status> {
    Ok(eagle_proto::tls::endpoint(addr)?.connect_lazy())
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
/// on (its KV cache lives there), and new sessions go to the least busy one. The workers are a
/// static address list, or (with etcd) the complete healthy groups of the membership view.
pub struct WorkerPool {
    workers: Vec<(String, WorkerClient<Channel>, Arc<AtomicUsize>)>,
    etcd: Option<Arc<EtcdRoutes>>,
    /// Groups (static: addresses) that failed a call recently, and when.
    suspects: Mutex<HashMap<String, Instant>>,
    /// Which prompt prefixes each group is believed to hold (cache-aware routing).
    prefixes: PrefixIndex,
}

/// Members and usable groups as the pool sees them (without etcd: the static workers).
#[derive(Clone, Copy, Debug, Default)]
pub struct Membership {
    pub etcd_reachable: bool,
    pub workers: usize,
    pub drafts: usize,
    /// Complete groups new sessions may go to.
    pub groups: usize,
}

/// A session's place on a worker; dropping it frees the place.
pub struct WorkerLease {
    pub client: WorkerClient<Channel>,
    pub addr: String,
    /// The worker group (a static worker's group is its address).
    pub group: String,
    active: Arc<AtomicUsize>,
}

impl WorkerLease {
    /// Sessions this coordinator has on the lease's worker, this one included.
    pub fn sessions(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
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
        Ok(WorkerPool {
            workers,
            etcd: None,
            suspects: Mutex::new(HashMap::new()),
            prefixes: PrefixIndex::default(),
        })
    }

    /// Workers from the membership view.
    pub fn from_etcd(routes: Arc<EtcdRoutes>) -> Self {
        WorkerPool {
            workers: Vec::new(),
            etcd: Some(routes),
            suspects: Mutex::new(HashMap::new()),
            prefixes: PrefixIndex::default(),
        }
    }

    /// The static workers.
    pub fn all(&self) -> impl Iterator<Item = (&str, &WorkerClient<Channel>)> {
        self.workers.iter().map(|(a, c, _)| (a.as_str(), c))
    }

    /// What the pool sees of the cluster now, for the membership metrics.
    pub fn membership(&self) -> Membership {
        match &self.etcd {
            Some(r) => {
                let members = r.view.members();
                let count = |k: Kind| members.iter().filter(|m| m.rec.kind == k).count();
                Membership {
                    etcd_reachable: r.view.health().is_reachable(),
                    workers: count(Kind::Worker),
                    drafts: count(Kind::Draft),
                    groups: r.groups().len(),
                }
            }
            None => Membership {
                etcd_reachable: false,
                workers: self.workers.len(),
                drafts: 0,
                groups: self
                    .workers
                    .iter()
                    .filter(|(a, _, _)| !self.is_suspect(a))
                    .count(),
            },
        }
    }

    /// Marks a group as failing: new sessions avoid it for a while, and what it held is
    /// forgotten (a restarted worker starts with an empty cache).
    pub fn suspect(&self, group: &str) {
        self.prefixes.forget(group);
        self.suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.to_string(), Instant::now());
    }

    fn is_suspect(&self, group: &str) -> bool {
        let mut s = self.suspects.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|_, t| t.elapsed() < SUSPECT_FOR);
        s.contains_key(group)
    }

    /// A place for a new session whose prompt is `prompt`: on group `prefer` when it is usable
    /// (it holds the session's cache), else where the prompt's prefix is believed cached,
    /// weighed against load ([`crate::prefix_routing`]), passing over recently failing groups
    /// while others are left. The chosen group is then believed to hold the prompt.
    pub async fn lease(&self, prefer: Option<&str>, prompt: &[u32]) -> Result<WorkerLease, Status> {
        let keys = block_keys(prompt);
        let lease = self.choose(prefer, &keys).await?;
        metrics().routed(lease.1);
        self.prefixes.record(&lease.0.group, &keys);
        Ok(lease.0)
    }

    async fn choose(
        &self,
        prefer: Option<&str>,
        keys: &[u64],
    ) -> Result<(WorkerLease, Reason), Status> {
        if let Some(r) = &self.etcd {
            let (c, reason) = r
                .choose(prefer, &|g| self.is_suspect(g), keys, &|cands| {
                    self.prefixes.pick(keys, cands)
                })
                .await?;
            c.active.fetch_add(1, Ordering::Relaxed);
            return Ok((
                WorkerLease {
                    client: c.client,
                    addr: c.addr,
                    group: c.group,
                    active: c.active,
                },
                reason,
            ));
        }
        let usable: Vec<_> = self
            .workers
            .iter()
            .filter(|(a, _, _)| !self.is_suspect(a))
            .collect();
        let pool = if usable.is_empty() {
            self.workers.iter().collect()
        } else {
            usable
        };
        let preferred = pool
            .iter()
            .find(|(a, _, _)| Some(a.as_str()) == prefer)
            .map(|w| (*w, Reason::Session));
        let picked = preferred.or_else(|| {
            let cands: Vec<(&str, usize, usize)> = pool
                .iter()
                .map(|(a, _, n)| (a.as_str(), n.load(Ordering::Relaxed), 0))
                .collect();
            let (name, reason) = self.prefixes.pick(keys, &cands)?;
            pool.iter()
                .find(|(a, _, _)| a == name)
                .map(|w| (*w, reason))
        });
        let ((addr, client, active), reason) =
            picked.ok_or_else(|| Status::unavailable("no verification worker"))?;
        active.fetch_add(1, Ordering::Relaxed);
        Ok((
            WorkerLease {
                client: client.clone(),
                addr: addr.clone(),
                group: addr.clone(),
                active: active.clone(),
            },
            reason,
        ))
    }
}
