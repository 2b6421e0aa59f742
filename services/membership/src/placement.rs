//! KV placement records: which worker group holds a multi-turn session's KV cache, and how
//! many tokens it covers; and the lock that keeps two coordinators from running one session's
//! turns at once.
//!
//! Invariant: a record never outlives the cache it points to by more than a moment: each put
//! takes a fresh lease with the worker's session idle timeout as TTL, so the record expires
//! when the worker's reaper would free the idle cache. A record is only a routing hint: the
//! worker checks the cached tokens itself before reusing any of them.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};

use crate::client::{deadline, EtcdConfig, EtcdHealth, MembershipError, Result};
use crate::keys::Keys;
use crate::record::Placement;

/// A session's lock across coordinators, held while a turn runs; dropping it releases it.
pub struct SessionLock {
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Clone)]
pub struct PlacementStore {
    client: Client,
    keys: Keys,
    timeout: Duration,
    health: EtcdHealth,
}

impl PlacementStore {
    pub fn new(client: Client, cfg: &EtcdConfig, health: EtcdHealth) -> Self {
        PlacementStore {
            client,
            keys: cfg.keys(),
            timeout: cfg.timeout,
            health,
        }
    }

    fn seen<T>(&self, r: Result<T>) -> Result<T> {
        match &r {
            Ok(_) => self.health.reachable(),
            Err(e) => self.health.unreachable(e),
        }
        r
    }

    /// Records `p` for `session_id`, expiring after `ttl` unless put again.
    pub async fn put(&self, session_id: &str, p: &Placement, ttl: Duration) -> Result<i64> {
        let r = async {
            let mut c = self.client.clone();
            let ttl_s = ttl.as_secs().max(1) as i64;
            let lease = deadline("lease grant", self.timeout, c.lease_grant(ttl_s, None))
                .await?
                .id();
            let key = self.keys.placement(session_id);
            let value = serde_json::to_string(p).map_err(|source| MembershipError::Record {
                key: key.clone(),
                source,
            })?;
            deadline(
                "put",
                self.timeout,
                c.put(key, value, Some(PutOptions::new().with_lease(lease))),
            )
            .await?;
            Ok(lease)
        }
        .await;
        self.seen(r)
    }

    pub async fn get(&self, session_id: &str) -> Result<Option<Placement>> {
        let r = async {
            let mut c = self.client.clone();
            let key = self.keys.placement(session_id);
            let resp = deadline("get", self.timeout, c.get(key.clone(), None)).await?;
            match resp.kvs().first() {
                None => Ok(None),
                Some(kv) => serde_json::from_slice(kv.value())
                    .map(Some)
                    .map_err(|source| MembershipError::Record { key, source }),
            }
        }
        .await;
        self.seen(r)
    }

    /// Takes the session's lock for one turn, on a lease of `ttl` kept alive until the returned
    /// guard is dropped (which deletes the key and revokes the lease; a coordinator that dies
    /// loses it within `ttl`). `Ok(None)`: another coordinator holds it.
    pub async fn lock(&self, session_id: &str, ttl: Duration) -> Result<Option<SessionLock>> {
        let r = async {
            let mut c = self.client.clone();
            let lease = deadline(
                "lease grant",
                self.timeout,
                c.lease_grant(ttl.as_secs().max(1) as i64, None),
            )
            .await?
            .id();
            let key = self.keys.session_lock(session_id);
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    std::process::id().to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let won = deadline("lock", self.timeout, c.txn(txn))
                .await?
                .succeeded();
            if !won {
                let _ = c.lease_revoke(lease).await;
                return Ok(None);
            }
            let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
            let every = (ttl / 3).max(Duration::from_millis(200));
            let mut keeper = c.clone();
            tokio::spawn(async move {
                if let Ok((mut k, _stream)) = keeper.lease_keep_alive(lease).await {
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            _ = tokio::time::sleep(every) => {
                                if k.keep_alive().await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
                let _ = keeper.delete(key, None).await;
                let _ = keeper.lease_revoke(lease).await;
            });
            Ok(Some(SessionLock { _stop: stop }))
        }
        .await;
        self.seen(r)
    }

    pub async fn delete(&self, session_id: &str) -> Result<()> {
        let mut c = self.client.clone();
        let r = deadline(
            "delete",
            self.timeout,
            c.delete(self.keys.placement(session_id), None),
        )
        .await
        .map(|_| ());
        self.seen(r)
    }
}
