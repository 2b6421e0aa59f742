//! Rank rendezvous for a tensor-parallel group: every rank publishes its address (or, on CUDA,
//! whatever its peers need, such as rank 0's NCCL unique id) under the group's rendezvous key
//! and waits until all `world` ranks have, so ranks on different hosts find each other with
//! no hand-written host lists.
//!
//! The idea is the rendezvous of PyTorch's elastic launcher (`torch.distributed.elastic`'s
//! etcd rendezvous), reduced to one round: put, then read and watch until complete.
//!
//! Invariant: the call returns exactly `world` values ordered by rank, or fails with a deadline
//! error; each rank's entry lives on a lease of the deadline plus ten seconds, so a group that
//! restarts later does not read a dead incarnation's addresses for long.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};

use crate::client::{deadline, MembershipError, Result};
use crate::keys::Keys;

/// Publishes `my_addr` as `rank` of `group` in `cluster`, waits for all `world` ranks, and
/// returns their values ordered by rank.
pub async fn rendezvous(
    client: &Client,
    cluster: &str,
    group: &str,
    rank: u32,
    world: u32,
    my_addr: &str,
    timeout: Duration,
) -> Result<Vec<String>> {
    if world == 0 || rank >= world {
        return Err(MembershipError::Invalid(format!(
            "rendezvous: rank {rank} of a world of {world}"
        )));
    }
    let t0 = Instant::now();
    let call = Duration::from_secs(2).min(timeout);
    let prefix = Keys::new(cluster).rendezvous(group);
    let mut c = client.clone();
    let ttl = timeout.as_secs() as i64 + 10;
    let lease = deadline("lease grant", call, c.lease_grant(ttl, None))
        .await?
        .id();
    deadline(
        "put",
        call,
        c.put(
            format!("{prefix}{rank}"),
            my_addr,
            Some(PutOptions::new().with_lease(lease)),
        ),
    )
    .await?;
    let mut have;
    loop {
        let resp = deadline(
            "rendezvous read",
            call,
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut ranks = BTreeMap::new();
        for kv in resp.kvs() {
            let (Ok(k), Ok(v)) = (kv.key_str(), kv.value_str()) else {
                continue;
            };
            if let Some(Ok(r)) = k.strip_prefix(prefix.as_str()).map(str::parse::<u32>) {
                if r < world {
                    ranks.insert(r, v.to_string());
                }
            }
        }
        have = ranks.len();
        if have == world as usize {
            return Ok(ranks.into_values().collect());
        }
        let left = timeout.saturating_sub(t0.elapsed());
        if left.is_zero() {
            break;
        }
        // Wait for the next change under the prefix (or the deadline), then read again.
        let from = resp.header().map_or(0, |h| h.revision()) + 1;
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let waited = tokio::time::timeout(left, async {
            let mut s = c.watch(prefix.clone(), Some(opts)).await?;
            loop {
                match s.message().await? {
                    Some(m) if m.events().is_empty() && !m.canceled() => continue,
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
            }
        })
        .await;
        if let Ok(Err(e)) = waited {
            // A broken watch: read again after a pause rather than spin.
            tracing::debug!(error = %e, "rendezvous watch failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if t0.elapsed() >= timeout {
            break;
        }
    }
    Err(MembershipError::Rendezvous {
        group: group.to_string(),
        have,
        world,
        timeout,
    })
}
