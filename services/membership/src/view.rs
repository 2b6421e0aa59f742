//! The watched membership view: every member and KV placement of one cluster, kept in memory
//! from one read of the cluster's prefix and a watch from the revision after it.
//!
//! Invariants:
//! - The view applies etcd's events in revision order, so it equals etcd's state at the last
//!   revision it saw; a broken or cancelled watch (etcd restarted, history compacted) starts
//!   over with a fresh read, retrying with backoff while etcd is away.
//! - While etcd is away the view keeps what it last saw (serving goes on), and the shared
//!   [`EtcdHealth`] says since when.
//! - A group counts only when complete: ranks `0..tp` all present, healthy, and agreeing on the
//!   model and `tp` (the usual rule of membership services such as Kubernetes endpoints: route
//!   only to what is ready).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{backoff, deadline, EtcdConfig, EtcdHealth, MembershipError, Result};
use crate::keys::{KeyKind, Keys};
use crate::record::{Kind, Load, MemberRecord, Placement};

/// A member as seen in etcd.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub key: String,
    pub lease: i64,
    pub rec: MemberRecord,
}

/// A complete, healthy worker group.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub model: String,
    /// Rank 0's address: the group's endpoint.
    pub addr: String,
    pub tp: u32,
    /// Ranks in order.
    pub ranks: Vec<Member>,
    /// Rank 0's load figures.
    pub load: Load,
}

#[derive(Default)]
struct State {
    members: BTreeMap<String, Member>,
    placements: BTreeMap<String, (i64, Placement)>,
    revision: i64,
}

pub struct MembershipView {
    state: Arc<RwLock<State>>,
    changed: watch::Receiver<u64>,
    health: EtcdHealth,
    task: JoinHandle<()>,
}

impl Drop for MembershipView {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MembershipView {
    /// Reads the cluster once (so a reachable etcd's members are in the view when this
    /// returns) and keeps the view current in the background.
    pub async fn start(client: Client, cfg: &EtcdConfig, health: EtcdHealth) -> MembershipView {
        let state = Arc::new(RwLock::new(State::default()));
        let (tx, changed) = watch::channel(0);
        let mut w = Watcher {
            client,
            keys: cfg.keys(),
            timeout: cfg.timeout,
            state: state.clone(),
            tx,
            health: health.clone(),
        };
        let first = w.sync().await;
        let task = tokio::spawn(async move { w.run(first.is_ok()).await });
        MembershipView {
            state,
            changed,
            health,
            task,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Ticks on every change of the view.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    pub fn health(&self) -> &EtcdHealth {
        &self.health
    }

    /// The etcd revision the view reflects.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    pub fn members(&self) -> Vec<Member> {
        self.read().members.values().cloned().collect()
    }

    /// Healthy draft services of `model`.
    pub fn drafts(&self, model: &str) -> Vec<Member> {
        self.read()
            .members
            .values()
            .filter(|m| m.rec.kind == Kind::Draft && m.rec.model == model && m.rec.healthy)
            .cloned()
            .collect()
    }

    /// Complete, healthy worker groups, of `model` when given.
    pub fn groups(&self, model: Option<&str>) -> Vec<Group> {
        let st = self.read();
        let mut by_group: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
        for m in st.members.values().filter(|m| m.rec.kind == Kind::Worker) {
            by_group.entry(m.rec.group.as_str()).or_default().push(m);
        }
        by_group
            .into_iter()
            .filter_map(|(name, ranks)| complete_group(name, ranks))
            .filter(|g| model.is_none_or(|m| g.model == m))
            .collect()
    }

    pub fn placement(&self, session_id: &str) -> Option<Placement> {
        self.read()
            .placements
            .get(session_id)
            .map(|(_, p)| p.clone())
    }

    /// (session id, lease, placement) for every placement.
    pub fn placements(&self) -> Vec<(String, i64, Placement)> {
        self.read()
            .placements
            .iter()
            .map(|(s, (l, p))| (s.clone(), *l, p.clone()))
            .collect()
    }
}

fn complete_group(name: &str, mut ranks: Vec<&Member>) -> Option<Group> {
    ranks.sort_by_key(|m| m.rec.rank);
    let head = ranks.first()?;
    let tp = head.rec.tp.max(1);
    let complete = ranks.len() == tp as usize
        && ranks.iter().enumerate().all(|(i, m)| {
            m.rec.rank == i as u32 && m.rec.tp == head.rec.tp && m.rec.model == head.rec.model
        })
        && ranks.iter().all(|m| m.rec.healthy);
    complete.then(|| Group {
        name: name.to_string(),
        model: head.rec.model.clone(),
        addr: head.rec.addr.clone(),
        tp,
        load: head.rec.load,
        ranks: ranks.into_iter().cloned().collect(),
    })
}

struct Watcher {
    client: Client,
    keys: Keys,
    timeout: Duration,
    state: Arc<RwLock<State>>,
    tx: watch::Sender<u64>,
    health: EtcdHealth,
}

impl Watcher {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.tx.send_modify(|n| *n += 1);
    }

    /// Replaces the view with a fresh read of the prefix.
    async fn sync(&mut self) -> Result<()> {
        let mut c = self.client.clone();
        let r = deadline(
            "read of the cluster prefix",
            self.timeout,
            c.get(self.keys.root(), Some(GetOptions::new().with_prefix())),
        )
        .await;
        let resp = match r {
            Ok(resp) => resp,
            Err(e) => {
                self.health.unreachable(&e);
                return Err(e);
            }
        };
        self.health.reachable();
        let revision = resp.header().map_or(0, |h| h.revision());
        {
            let mut st = State {
                revision,
                ..State::default()
            };
            for kv in resp.kvs() {
                apply_put(&self.keys, &mut st, kv);
            }
            *self.write() = st;
        }
        self.notify();
        Ok(())
    }

    async fn run(&mut self, mut synced: bool) {
        let mut attempt = 0;
        loop {
            if !synced {
                if self.sync().await.is_err() {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                attempt = 0;
            }
            synced = false;
            if let Err(e) = self.watch().await {
                self.health.unreachable(&e);
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
    }

    /// Applies events from the revision after the view's until the watch breaks.
    async fn watch(&mut self) -> Result<()> {
        let from = self
            .state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revision
            + 1;
        let mut c = self.client.clone();
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream =
            deadline("watch", self.timeout, c.watch(self.keys.root(), Some(opts))).await?;
        // Ask for progress regularly: a stopped etcd (or a dead connection) shows as a
        // missing answer rather than as a watch that waits forever.
        let every = Duration::from_secs(2);
        let mut tick = tokio::time::interval(every);
        let mut heard = Instant::now();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m.map_err(MembershipError::from)?,
                _ = tick.tick() => {
                    if heard.elapsed() > every + self.timeout {
                        return Err(MembershipError::Timeout {
                            what: "watch progress".into(),
                            timeout: every + self.timeout,
                        });
                    }
                    let _ = stream.request_progress().await;
                    continue;
                }
            };
            heard = Instant::now();
            let Some(resp) = msg else {
                return Err(MembershipError::Invalid("the watch ended".into()));
            };
            if resp.canceled() {
                return Err(MembershipError::Invalid(format!(
                    "the watch was cancelled (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            self.health.reachable();
            if resp.events().is_empty() {
                continue;
            }
            {
                let mut st = self.write();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        EventType::Put => apply_put(&self.keys, &mut st, kv),
                        EventType::Delete => apply_delete(&self.keys, &mut st, kv),
                    }
                    st.revision = st.revision.max(kv.mod_revision());
                }
                if let Some(h) = resp.header() {
                    st.revision = st.revision.max(h.revision());
                }
            }
            self.notify();
        }
    }
}

fn apply_put(keys: &Keys, st: &mut State, kv: &KeyValue) {
    let Ok(key) = kv.key_str() else { return };
    match keys.classify(key) {
        Some(KeyKind::Member) => match serde_json::from_slice::<MemberRecord>(kv.value()) {
            Ok(rec) => {
                st.members.insert(
                    key.to_string(),
                    Member {
                        key: key.to_string(),
                        lease: kv.lease(),
                        rec,
                    },
                );
            }
            Err(e) => tracing::warn!(key, error = %e, "ignoring a bad member record"),
        },
        Some(KeyKind::Placement(sid)) => match serde_json::from_slice::<Placement>(kv.value()) {
            Ok(p) => {
                st.placements.insert(sid.to_string(), (kv.lease(), p));
            }
            Err(e) => tracing::warn!(key, error = %e, "ignoring a bad placement record"),
        },
        None => {}
    }
}

fn apply_delete(keys: &Keys, st: &mut State, kv: &KeyValue) {
    let Ok(key) = kv.key_str() else { return };
    match keys.classify(key) {
        Some(KeyKind::Member) => {
            st.members.remove(key);
        }
        Some(KeyKind::Placement(sid)) => {
            st.placements.remove(sid);
        }
        None => {}
    }
}
