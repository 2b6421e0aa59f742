//! Routing by etcd membership: which worker groups and draft services the coordinator may
//! use, read from the watched membership view.
//!
//! Invariants:
//! - A new session goes only to a complete, healthy group serving the coordinator's model, and
//!   to the least loaded of them: load is the group's own figures from etcd (live sessions,
//!   queue depth) plus this coordinator's sessions in flight there, which etcd learns of only
//!   at the group's next refresh. Among them, a group believed to hold the prompt's prefix
//!   may win over a less loaded one (`prefix_routing.rs`).
//! - A group whose member record vanished (lease expired or revoked) is never chosen again; a
//!   group that just failed a call is avoided for a few seconds even before etcd notices.
//! - With no usable group, a request waits a bounded time for one to appear (a group
//!   re-registering after an etcd restart) and then fails with `UNAVAILABLE`; it never hangs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eagle_membership::service::report_health;
use eagle_membership::{connect, EtcdConfig, EtcdHealth, Group, MembershipView, PlacementStore};
use eagle_proto::draft::draft_client::DraftClient;
use eagle_proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;
use tonic::Status;
use tonic_health::server::HealthReporter;

use crate::backends::{draft_client, worker_client};
use crate::prefix_routing::Reason;
use crate::sessions::SessionPlacements;

/// How long a group that failed a call is passed over.
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// A worker's client and this coordinator's sessions in flight on it.
type Slot = (WorkerClient<Channel>, Arc<AtomicUsize>);

pub struct EtcdRoutes {
    pub view: Arc<MembershipView>,
    pub model: String,
    /// How long a request waits for a usable group before `UNAVAILABLE`.
    pub wait: Duration,
    workers: Mutex<HashMap<String, Slot>>,
    drafts: Mutex<HashMap<String, DraftClient<Channel>>>,
    /// Each group's last published prefix summary, as published and parsed.
    published: Mutex<HashMap<String, (String, HashSet<u64>)>>,
}

/// Chooses among (group, load) candidates (see [`crate::prefix_routing::PrefixIndex::pick`]).
pub type Picker<'p> =
    dyn for<'a, 'b> Fn(&'b [(&'a str, usize, usize)]) -> Option<(&'a str, Reason)> + Sync + 'p;

/// A group chosen for a session.
pub struct Chosen {
    pub group: String,
    pub addr: String,
    pub client: WorkerClient<Channel>,
    pub active: Arc<AtomicUsize>,
}

impl EtcdRoutes {
    pub fn new(view: Arc<MembershipView>, model: &str, wait: Duration) -> Self {
        EtcdRoutes {
            view,
            model: model.to_string(),
            wait,
            workers: Mutex::new(HashMap::new()),
            drafts: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Usable groups now.
    pub fn groups(&self) -> Vec<Group> {
        self.view.groups(Some(&self.model))
    }

    /// How many leading prompt tokens (block `keys`) group `g`'s published prefix summary
    /// shows; the parsed summary is kept until the group publishes another.
    fn published(&self, g: &Group, keys: &[u64]) -> usize {
        let Some(rec) = g.ranks.first().map(|m| &m.rec) else {
            return 0;
        };
        if rec.prefixes.is_empty() || keys.is_empty() {
            return 0;
        }
        let mut m = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let entry = m.entry(g.name.clone()).or_default();
        if entry.0 != rec.prefixes {
            *entry = (
                rec.prefixes.clone(),
                eagle_proto::prefix::unpack(&rec.prefixes)
                    .into_iter()
                    .collect(),
            );
        }
        keys.iter().take_while(|k| entry.1.contains(k)).count() * eagle_proto::prefix::BLOCK_TOKENS
    }

    fn slot(&self, addr: &str) -> Result<Slot, Status> {
        let mut m = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, n)) = m.get(addr) {
            return Ok((c.clone(), n.clone()));
        }
        let c = worker_client(addr)?;
        let n = Arc::new(AtomicUsize::new(0));
        m.insert(addr.to_string(), (c.clone(), n.clone()));
        Ok((c, n))
    }

    /// The group for a new session: `prefer` when it is usable (it holds the session's KV
    /// cache), else the least loaded; groups in `avoid` only when nothing else is left.
    pub async fn choose(
        &self,
        prefer: Option<&str>,
        avoid: &(dyn Fn(&str) -> bool + Sync),
        keys: &[u64],
        pick: &Picker<'_>,
    ) -> Result<(Chosen, Reason), Status> {
        let until = Instant::now() + self.wait;
        let mut changed = self.view.changed();
        loop {
            let groups = self.groups();
            let fresh: Vec<&Group> = groups.iter().filter(|g| !avoid(&g.name)).collect();
            let chosen = prefer
                .and_then(|p| fresh.iter().find(|g| g.name == p))
                .map(|g| (*g, Reason::Session))
                .or_else(|| {
                    let cands: Vec<(&str, usize, usize)> = fresh
                        .iter()
                        .map(|g| {
                            let own = self
                                .slot(&g.addr)
                                .map_or(0, |(_, n)| n.load(Ordering::Relaxed));
                            let l = g.load;
                            (
                                g.name.as_str(),
                                own + l.active_sessions as usize + l.queue_depth as usize,
                                self.published(g, keys),
                            )
                        })
                        .collect();
                    let (name, reason) = pick(&cands)?;
                    fresh.iter().find(|g| g.name == name).map(|g| (*g, reason))
                });
            if let Some((g, reason)) = chosen {
                let (client, active) = self.slot(&g.addr)?;
                return Ok((
                    Chosen {
                        group: g.name.clone(),
                        addr: g.addr.clone(),
                        client,
                        active,
                    },
                    reason,
                ));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Status::unavailable(format!(
                    "no healthy worker group serves {:?} ({} known, {} recently failing); etcd: {}",
                    self.model,
                    groups.len(),
                    groups.len() - fresh.len(),
                    self.view.health().describe()
                )));
            }
            // Wait for the view to change, or a failing group's grace to pass.
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(250)), changed.changed()).await;
        }
    }

    /// A client of a healthy draft service of the model, if any: the same one for as long as
    /// it is registered (a request's draft session lives there).
    pub fn draft(&self) -> Option<DraftClient<Channel>> {
        let d = self
            .view
            .drafts(&self.model)
            .into_iter()
            .min_by(|a, b| a.rec.addr.cmp(&b.rec.addr))?;
        let mut m = self.drafts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(&d.rec.addr) {
            return Some(c.clone());
        }
        let c = draft_client(&d.rec.addr).ok()?;
        m.insert(d.rec.addr.clone(), c.clone());
        Some(c)
    }
}

/// What the coordinator runs on when it uses etcd.
pub struct Started {
    pub routes: Arc<EtcdRoutes>,
    pub sessions: SessionPlacements,
}

/// Connects to etcd, starts watching the cluster, reports etcd's state on `reporter`, and
/// waits up to `startup_wait` for a healthy group serving `model`.
pub async fn start(
    cfg: &EtcdConfig,
    model: &str,
    startup_wait: Duration,
    route_wait: Duration,
    session_ttl: Duration,
    reporter: &HealthReporter,
) -> anyhow::Result<Started> {
    let client = connect(cfg).await?;
    let health = EtcdHealth::default();
    report_health(reporter.clone(), health.clone());
    let view = Arc::new(MembershipView::start(client.clone(), cfg, health.clone()).await);
    let routes = Arc::new(EtcdRoutes::new(view.clone(), model, route_wait));
    let t0 = Instant::now();
    let mut changed = view.changed();
    while routes.groups().is_empty() {
        let left = startup_wait.saturating_sub(t0.elapsed());
        if left.is_zero() {
            anyhow::bail!(
                "no healthy worker group serving {model:?} appeared in etcd ({}, cluster {:?}) \
                 within {startup_wait:?}; etcd: {}",
                cfg.endpoints.join(","),
                cfg.cluster,
                health.describe()
            );
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), changed.changed()).await;
    }
    let store = PlacementStore::new(client, cfg, health);
    Ok(Started {
        routes,
        sessions: SessionPlacements::with_etcd(session_ttl, store, view),
    })
}
