//! A member's registration: its record under its key, on a lease it keeps alive.
//!
//! Invariants:
//! - While the process lives and etcd answers, its key is present: a lease that expired or a
//!   keep-alive stream that broke (etcd restarted, network trouble) is replaced by a new lease
//!   and the record is put again, retrying with backoff while etcd is away.
//! - When the process dies, the key vanishes with the lease, within its TTL; a graceful
//!   shutdown revokes the lease, so the key vanishes at once.
//! - The record's load figures (and a worker's prefix cache summary) follow the member's,
//!   refreshed every third of the TTL, written only when they changed.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{backoff, deadline, unix_now, EtcdConfig, EtcdHealth, MembershipError, Result};
use crate::record::{Load, MemberRecord};

/// Reads a member's current load.
pub type LoadProbe = Arc<dyn Fn() -> Load + Send + Sync>;

/// Reads a worker's prefix cache summary (packed block keys, bounded).
pub type PrefixProbe = Arc<dyn Fn() -> String + Send + Sync>;

pub struct Registration {
    key: String,
    lease: Arc<AtomicI64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// Registers `rec` (one attempt before returning, so a reachable etcd lists the member when
    /// this returns) and keeps it registered in the background until [`Registration::shutdown`].
    pub async fn start(
        client: Client,
        cfg: &EtcdConfig,
        mut rec: MemberRecord,
        load: LoadProbe,
        prefixes: Option<PrefixProbe>,
        health: EtcdHealth,
    ) -> Registration {
        let key = cfg.keys().member(rec.kind, &rec.group, rec.rank);
        rec.started_at = unix_now();
        rec.load = load();
        if let Some(p) = &prefixes {
            rec.prefixes = p();
        }
        let lease = Arc::new(AtomicI64::new(0));
        let mut keeper = Keeper {
            client,
            key: key.clone(),
            timeout: cfg.timeout,
            ttl_s: cfg.ttl_s.max(1),
            rec,
            load,
            prefixes,
            health,
            lease: lease.clone(),
        };
        let first = keeper.register().await;
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(async move { keeper.run(first, stop_rx).await });
        Registration {
            key,
            lease,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease currently holding the key (None before the first successful registration).
    pub fn lease_id(&self) -> Option<i64> {
        match self.lease.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Revokes the lease, so the member vanishes at once, and stops keeping it alive.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

struct Keeper {
    client: Client,
    key: String,
    timeout: Duration,
    ttl_s: i64,
    rec: MemberRecord,
    load: LoadProbe,
    prefixes: Option<PrefixProbe>,
    health: EtcdHealth,
    lease: Arc<AtomicI64>,
}

enum Outcome {
    Stop,
    /// The lease is gone or cannot be kept alive: register again.
    Lost,
}

impl Keeper {
    /// Grants a lease and puts the record on it.
    async fn register(&mut self) -> Result<i64> {
        let r = async {
            let t = self.timeout;
            let mut c = self.client.clone();
            let lease = deadline("lease grant", t, c.lease_grant(self.ttl_s, None))
                .await?
                .id();
            self.rec.load = (self.load)();
            self.put(lease).await?;
            Ok(lease)
        }
        .await;
        match &r {
            Ok(id) => {
                self.health.reachable();
                self.lease.store(*id, Ordering::Relaxed);
                tracing::info!(key = %self.key, lease = id, "registered in etcd");
            }
            Err(e) => self.health.unreachable(e),
        }
        r
    }

    async fn put(&mut self, lease: i64) -> Result<()> {
        let value = serde_json::to_string(&self.rec).map_err(|source| MembershipError::Record {
            key: self.key.clone(),
            source,
        })?;
        let mut c = self.client.clone();
        let opts = PutOptions::new().with_lease(lease);
        deadline(
            "put",
            self.timeout,
            c.put(self.key.clone(), value, Some(opts)),
        )
        .await?;
        Ok(())
    }

    async fn run(&mut self, first: Result<i64>, mut stop: oneshot::Receiver<()>) {
        let mut lease = first.ok();
        let mut attempt = 0;
        loop {
            let id = match lease.take() {
                Some(id) => id,
                None => match self.register().await {
                    Ok(id) => id,
                    Err(_) => {
                        attempt += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(backoff(attempt)) => continue,
                            _ = &mut stop => return,
                        }
                    }
                },
            };
            attempt = 0;
            match self.keep(id, &mut stop).await {
                Outcome::Stop => {
                    let mut c = self.client.clone();
                    match deadline("lease revoke", self.timeout, c.lease_revoke(id)).await {
                        Ok(_) => tracing::info!(key = %self.key, "left etcd (lease revoked)"),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not revoke the lease; it expires by itself")
                        }
                    }
                    return;
                }
                Outcome::Lost => {
                    self.lease.store(0, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(0)) => {},
                        _ = &mut stop => return,
                    }
                }
            }
        }
    }

    /// Keeps lease `id` alive and the record's load current until stopped or the lease is lost.
    async fn keep(&mut self, id: i64, stop: &mut oneshot::Receiver<()>) -> Outcome {
        let t = self.timeout;
        let mut c = self.client.clone();
        let (mut keeper, mut stream) =
            match deadline("lease keep-alive", t, c.lease_keep_alive(id)).await {
                Ok(ks) => ks,
                Err(e) => {
                    self.health.unreachable(&e);
                    return Outcome::Lost;
                }
            };
        let every = Duration::from_millis((self.ttl_s as u64 * 1000 / 3).max(200));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = &mut *stop => return Outcome::Stop,
                _ = tick.tick() => {}
            }
            let alive = deadline("lease keep-alive", t, async {
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await;
            match alive {
                Ok(Some(r)) if r.ttl() > 0 => self.health.reachable(),
                Ok(Some(_)) => {
                    tracing::warn!(key = %self.key, lease = id, "lease expired; registering again");
                    return Outcome::Lost;
                }
                Ok(None) | Err(_) => {
                    // The keep-alive stream broke (etcd restarted, or the connection was
                    // replaced): reopen it on the same lease, which still holds the key unless
                    // it expired meanwhile (then the reopening fails and a new lease is made).
                    match deadline("lease keep-alive", t, c.lease_keep_alive(id)).await {
                        Ok((k, s)) => {
                            (keeper, stream) = (k, s);
                            self.health.reachable();
                            continue;
                        }
                        Err(e) => {
                            self.health.unreachable(&e);
                            return Outcome::Lost;
                        }
                    }
                }
            }
            // One put per refresh at most, and only when something changed: a busy worker's
            // summary costs etcd one write every third of the TTL.
            let load = (self.load)();
            let prefixes = self.prefixes.as_ref().map(|p| p());
            let new_prefixes = prefixes.as_ref().is_some_and(|p| *p != self.rec.prefixes);
            if load != self.rec.load || new_prefixes {
                self.rec.load = load;
                if let Some(p) = prefixes {
                    self.rec.prefixes = p;
                }
                if let Err(e) = self.put(id).await {
                    self.health.unreachable(&e);
                    return Outcome::Lost;
                }
            }
        }
    }
}
