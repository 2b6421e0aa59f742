//! Tensor-parallel worker groups. Rank 0 serves the worker API; before each model call it
//! sends the call (a `GroupOp`) to the other ranks, and every rank then runs the same engine
//! call on its shard, meeting the others in the collectives inside the model. Ranks other than
//! 0 keep their own copy of every session (cache shard, sampling state, last token), updated by
//! the same calls in the same order, so they stay in step without being told results.
//!
//! Invariant: one call at a time crosses the group, in one order ([`Group::mirror`] holds the
//! group's lock from sending the call to finishing it), so the collectives of two calls never
//! interleave. A rank that dies breaks the group: calls fail with `UNAVAILABLE` at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eagle_engine::models::TargetModel;
use eagle_engine::parallel::Collective;
use eagle_parallel::TcpGroup;
use eagle_proto::status::from_engine;
use eagle_proto::wire::{sampling_from_wire, tree_from_wire};
use eagle_proto::worker::group_op::Op;
use eagle_proto::worker::GroupOp;
use prost::Message;
use tonic::{Code, Status};

use crate::Sequence;

/// Rank 0's handle on its group.
pub struct Group {
    tcp: Arc<TcpGroup>,
    order: Mutex<()>,
}

impl Group {
    pub fn new(tcp: Arc<TcpGroup>) -> Self {
        Group {
            tcp,
            order: Mutex::new(()),
        }
    }

    /// Under the group's lock: runs `check` (which may refuse the call: then nothing is sent),
    /// sends `op` to every other rank, then runs `f` (which runs the same call here). Checks of
    /// rank 0's session table belong in `check`, so no other call can change the table between
    /// the check and the broadcast.
    pub fn mirror<T>(
        &self,
        check: impl FnOnce() -> Result<(), Status>,
        op: &GroupOp,
        f: impl FnOnce() -> Result<T, Status>,
    ) -> Result<T, Status> {
        let _one_at_a_time = self.order.lock().unwrap_or_else(|p| p.into_inner());
        check()?;
        self.tcp
            .broadcast(&op.encode_to_vec())
            .map_err(|e| from_engine(&e))?;
        f()
    }

    /// Sends an empty call every `every` while the group is idle, answered by a one-number
    /// all-reduce, so a rank that died or stopped (on this host or another) is noticed without
    /// waiting for the next request, and the other ranks know rank 0 lives. Start it only once
    /// every model call goes through [`Group::mirror`] (after loading and measuring).
    pub fn spawn_heartbeat(self: &Arc<Self>, every: Duration) {
        let g = Arc::downgrade(self);
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            let Some(g) = g.upgrade() else { return };
            let round_trip = || {
                g.tcp
                    .all_reduce_sum(&mut [0.0])
                    .map_err(|e| from_engine(&e))
            };
            let beat = g.mirror(|| Ok(()), &GroupOp { op: None }, round_trip);
            if g.broken().is_some() || beat.is_err() {
                return;
            }
        });
    }

    /// Why the group is broken, once a rank has died or stopped answering.
    pub fn broken(&self) -> Option<String> {
        self.tcp.broken()
    }

    pub fn tcp(&self) -> &Arc<TcpGroup> {
        &self.tcp
    }
}

/// A rank other than 0: runs rank 0's calls until it closes the group. Rank 0 reclaims idle
/// sessions on its own clock (its reaper runs every quarter of `idle`), so a rank drops a
/// session only well after rank 0 must have: idle for twice `idle` plus a minute. A session id
/// rank 0 reuses after reclaiming it simply replaces the stale one here.
pub fn follow(tcp: &TcpGroup, target: &TargetModel, idle: Duration) -> anyhow::Result<()> {
    let mut sessions: HashMap<String, (Sequence, Instant)> = HashMap::new();
    // Rank 0 heartbeats an idle group every 250 ms; a minute of silence means it is gone.
    let silence = Some(Duration::from_secs(60));
    while let Some(bytes) = tcp.receive_within(silence)? {
        let op = GroupOp::decode(bytes.as_slice())?;
        let now = Instant::now();
        let keep = idle * 2 + Duration::from_secs(60);
        sessions.retain(|_, (_, used)| now.duration_since(*used) < keep);
        let result: Result<(), Status> = match op.op {
            Some(Op::Prefill(r)) => (|| {
                let sampling = sampling_from_wire(r.sampling.as_ref())?;
                let capacity = r.capacity as usize;
                if !r.reuse_cache {
                    let s = Sequence::new(target, capacity, sampling.clone(), None)?;
                    sessions.insert(r.session_id.clone(), (s, now));
                }
                let Some((s, used)) = sessions.get_mut(&r.session_id) else {
                    return Err(lost(&r.session_id));
                };
                *used = now;
                let out = s.prefill(target, &r.tokens, r.reuse_cache, capacity, sampling);
                if out.is_err() {
                    // Rank 0 drops a session whose prefill failed.
                    sessions.remove(&r.session_id);
                }
                out.map(|_| ())
            })(),
            Some(Op::Verify(r)) => match sessions.get_mut(&r.session_id) {
                Some((s, used)) => {
                    *used = now;
                    let wire = r.tree.unwrap_or_default();
                    tree_from_wire(&wire, target.cfg.vocab_size)
                        .and_then(|tree| s.verify(target, &tree).map(|_| ()))
                }
                None => Err(lost(&r.session_id)),
            },
            Some(Op::Decode(r)) => match sessions.get_mut(&r.session_id) {
                Some((s, used)) => {
                    *used = now;
                    s.decode(target, r.token).map(|_| ())
                }
                None => Err(lost(&r.session_id)),
            },
            Some(Op::Release(r)) => {
                sessions.remove(&r.session_id);
                Ok(())
            }
            // The heartbeat: answer it.
            None => tcp.all_reduce_sum(&mut [0.0]).map_err(|e| from_engine(&e)),
        };
        if let Err(e) = result {
            // Rank 0 refuses a bad call the same way (same checks, same state), before any
            // collective. Any other failure is this rank's alone: rank 0 would wait for it in a
            // collective, so leave the group at once and let it fail fast.
            let same_on_rank_0 = matches!(
                e.code(),
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange
            );
            if !same_on_rank_0 {
                anyhow::bail!(
                    "rank {}: {}",
                    eagle_engine::parallel::Collective::rank(tcp),
                    e.message()
                );
            }
            tracing::debug!("call refused as on rank 0: {}", e.message());
        }
    }
    Ok(())
}

fn lost(id: &str) -> Status {
    Status::data_loss(format!(
        "session {id:?} is unknown on this rank: the group is out of step"
    ))
}
