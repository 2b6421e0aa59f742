//! KV placement records: which worker group holds a multi-turn session's KV cache, and how
//! many tokens it covers.
//!
//! Invariant: a record never outlives the cache it points to by more than a moment: each put
//! takes a fresh lease with the worker's session idle timeout as TTL, so the record expires
//! when the worker's reaper would free the idle cache. A record is only a routing hint: the
//! worker checks the cached tokens itself before reusing any of them.

use std::time::Duration;

use etcd_client::{Client, PutOptions};

use crate::client::{deadline, EtcdConfig, EtcdHealth, MembershipError, Result};
use crate::keys::Keys;
use crate::record::Placement;

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
