//! Multi-turn sessions: where each session's KV cache lives, so the next turn goes back there
//! and prefills only its new tokens.
//!
//! Invariants:
//! - One request per session at a time: a second one while a turn runs is refused with
//!   `ABORTED` (two turns interleaving on one cache could not both be right), on this
//!   coordinator and, with etcd, on every other (a lock key on a lease, taken in a
//!   transaction).
//! - A placement is only a hint. The worker checks the cached tokens itself and reuses only
//!   the prefix that matches, so a stale or lost placement costs a full prefill, never a wrong
//!   token.
//! - A placement expires with the cache: after the worker's session idle timeout (`ttl`), in
//!   memory and, with etcd, by its lease. Writes to etcd happen off the request path; an etcd
//!   outage leaves the in-memory placements working.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eagle_membership::{MembershipView, Placement, PlacementStore, SessionLock};

/// The lease of a session's lock in etcd, kept alive while its turn runs: a coordinator that
/// dies holding it frees the session within this time.
const LOCK_TTL: Duration = Duration::from_secs(10);
use tonic::Status;

pub struct SessionPlacements {
    local: Mutex<HashMap<String, (Placement, Instant)>>,
    busy: Arc<Mutex<HashSet<String>>>,
    store: Option<PlacementStore>,
    view: Option<Arc<MembershipView>>,
    ttl: Duration,
}

/// A session's turn in progress; dropping it lets the next one in.
pub struct Claim {
    id: String,
    busy: Arc<Mutex<HashSet<String>>>,
    /// With etcd: the session's lock across coordinators.
    _lock: Option<SessionLock>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The worker's session id for a client's multi-turn session.
pub fn worker_session_id(session_id: &str) -> String {
    format!("kv:{session_id}")
}

impl SessionPlacements {
    /// In memory only (no etcd).
    pub fn local(ttl: Duration) -> Self {
        SessionPlacements {
            local: Mutex::new(HashMap::new()),
            busy: Arc::new(Mutex::new(HashSet::new())),
            store: None,
            view: None,
            ttl,
        }
    }

    /// In memory and in etcd.
    pub fn with_etcd(ttl: Duration, store: PlacementStore, view: Arc<MembershipView>) -> Self {
        SessionPlacements {
            store: Some(store),
            view: Some(view),
            ..Self::local(ttl)
        }
    }

    /// Takes the session for one turn: refused with `ABORTED` while another turn runs, on
    /// this coordinator or (with etcd) on any other. An etcd that cannot be reached leaves the
    /// local check alone in force, with a log line: never an error for the client.
    pub async fn claim(&self, id: &str) -> Result<Claim, Status> {
        let busy = || {
            Status::aborted(format!(
                "session {id:?} has a request running; send its next turn after that one ends"
            ))
        };
        if !self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
        {
            return Err(busy());
        }
        let mut claim = Claim {
            id: id.to_string(),
            busy: self.busy.clone(),
            _lock: None,
        };
        if let Some(store) = &self.store {
            match store.lock(id, LOCK_TTL).await {
                Ok(Some(lock)) => claim._lock = Some(lock),
                Ok(None) => return Err(busy()),
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "etcd unreachable: the session's lock across coordinators is not taken")
                }
            }
        }
        Ok(claim)
    }

    /// Where the session's cache was left, if it may still be there.
    pub fn lookup(&self, id: &str) -> Option<Placement> {
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, t)| t.elapsed() < self.ttl);
        if let Some((p, _)) = m.get(id) {
            return Some(p.clone());
        }
        drop(m);
        // Placed by an earlier coordinator process, as etcd remembers.
        self.view.as_ref().and_then(|v| v.placement(id))
    }

    /// Sessions with a recorded placement: etcd's count when it keeps them, else this
    /// process's unexpired ones.
    pub fn count(&self) -> usize {
        if let Some(v) = &self.view {
            return v.placements().len();
        }
        let mut m = self.local.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, t)| t.elapsed() < self.ttl);
        m.len()
    }

    /// The session's cache now lives at `p`.
    pub fn record(&self, id: &str, p: Placement) {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), (p.clone(), Instant::now()));
        if let Some(store) = self.store.clone() {
            let (id, ttl) = (id.to_string(), self.ttl);
            tokio::spawn(async move {
                if let Err(e) = store.put(&id, &p, ttl).await {
                    tracing::warn!(session = %id, error = %e, "could not record the KV placement in etcd");
                }
            });
        }
    }

    /// The session's cache is gone.
    pub fn forget(&self, id: &str) {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(store) = self.store.clone() {
            let id = id.to_string();
            tokio::spawn(async move {
                let _ = store.delete(&id).await;
            });
        }
    }
}
