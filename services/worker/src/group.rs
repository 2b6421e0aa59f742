//! Tensor-parallel worker groups. Rank 0 serves the worker API; before each target pass (the
//! batched steps of several sessions, see `batcher`) it sends the pass (a `GroupOp`) to the
//! other ranks, and every rank then runs the same pass on its shard, meeting the others in the
//! collectives inside the model. Ranks other than 0 keep their own copy of every session (cache
//! shard, sampling state, last token), updated by the same passes in the same order, so they
//! stay in step without being told results.
//!
//! Invariant: one call at a time crosses the group, in one order ([`Group::mirror`] and
//! [`Group::locked`] hold the group's lock from sending the call to finishing it), so the
//! collectives of two calls never interleave. A rank that dies breaks the group: calls fail
//! with `UNAVAILABLE` at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eagle_engine::models::TargetModel;
use eagle_engine::parallel::Collective;
use eagle_parallel::TcpGroup;
use eagle_proto::status::from_engine;
use eagle_proto::wire::{sampling_from_wire, tree_from_wire};
use eagle_proto::worker::group_op::Op;
use eagle_proto::worker::pass_part::Part;
use eagle_proto::worker::{GroupOp, Pass, PromptChunk};
use prost::Message;
use tonic::Status;

use crate::Sequence;

/// Sends one call to the other ranks of a group (inside [`Group::locked`]).
pub type Broadcast<'a> = dyn Fn(&GroupOp) -> Result<(), Status> + 'a;

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

    /// Under the group's lock: runs `f`, which may send calls to the other ranks (through the
    /// function it is given) and run them here. For a call whose content depends on the session
    /// table (a batched pass): what `f` reads of the table cannot change before it is sent.
    pub fn locked<T>(&self, f: impl FnOnce(&Broadcast) -> Result<T, Status>) -> Result<T, Status> {
        let _one_at_a_time = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let send = |op: &GroupOp| {
            self.tcp
                .broadcast(&op.encode_to_vec())
                .map_err(|e| from_engine(&e))
        };
        f(&send)
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
            Some(Op::Pass(pass)) => follow_pass(target, &mut sessions, pass, now),
            Some(Op::Release(r)) => {
                sessions.remove(&r.session_id);
                Ok(())
            }
            // The heartbeat: answer it.
            None => tcp.all_reduce_sum(&mut [0.0]).map_err(|e| from_engine(&e)),
        };
        if let Err(e) = result {
            // Anything that fails here and not on rank 0 is this rank's alone: rank 0 would wait
            // for it in a collective, so leave the group at once and let it fail fast.
            anyhow::bail!(
                "rank {}: {}",
                eagle_engine::parallel::Collective::rank(tcp),
                e.message()
            );
        }
    }
    Ok(())
}

/// Runs rank 0's batched pass on this rank's sessions: begins its new prompts as rank 0 did,
/// then runs every part in one pass. A part refused on rank 0 is refused the same way here
/// (same checks, same state); an error of the pass itself is returned.
fn follow_pass(
    target: &TargetModel,
    sessions: &mut HashMap<String, (Sequence, Instant)>,
    pass: Pass,
    now: Instant,
) -> Result<(), Status> {
    for p in &pass.parts {
        let Some(Part::Prompt(PromptChunk {
            begin: Some(r),
            keep,
            ..
        })) = &p.part
        else {
            continue;
        };
        let sampling = sampling_from_wire(r.sampling.as_ref())?;
        let capacity = r.capacity as usize;
        if !r.reuse_cache {
            let s = Sequence::new(target, capacity, sampling.clone(), None)?;
            sessions.insert(p.session_id.clone(), (s, now));
        }
        let (s, _) = sessions
            .get_mut(&p.session_id)
            .ok_or_else(|| lost(&p.session_id))?;
        let kept = s.begin_prefill(target, &r.tokens, r.reuse_cache, capacity, sampling)?;
        if kept as u32 != *keep {
            return Err(lost(&p.session_id));
        }
    }
    let trees = pass
        .parts
        .iter()
        .map(|p| match &p.part {
            Some(Part::Tree(t)) => tree_from_wire(t, target.cfg.vocab_size).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let ids: Vec<&str> = pass.parts.iter().map(|p| p.session_id.as_str()).collect();
    let mut seqs: HashMap<&str, &mut Sequence> = sessions
        .iter_mut()
        .filter(|(id, _)| ids.contains(&id.as_str()))
        .map(|(id, (s, used))| {
            *used = now;
            (id.as_str(), s)
        })
        .collect();
    let mut items = Vec::with_capacity(pass.parts.len());
    for (p, tree) in pass.parts.iter().zip(&trees) {
        let seq = seqs
            .remove(p.session_id.as_str())
            .ok_or_else(|| lost(&p.session_id))?;
        let part = match (&p.part, tree) {
            (Some(Part::Prompt(c)), _) => crate::sequence::Part::Prompt {
                tokens: &c.tokens,
                last: c.last,
                keep: c.keep as usize,
            },
            (Some(Part::Decode(t)), _) => crate::sequence::Part::Decode(*t),
            (Some(Part::Tree(_)), Some(tree)) => crate::sequence::Part::Verify(tree),
            _ => return Err(Status::invalid_argument("a pass part without a step")),
        };
        items.push((seq, part));
    }
    let results = Sequence::run_batch(target, items)?;
    // Rank 0 drops a session whose prompt failed; so does this rank.
    for (p, r) in pass.parts.iter().zip(results) {
        if r.is_err() && matches!(p.part, Some(Part::Prompt(_))) {
            sessions.remove(&p.session_id);
        }
    }
    Ok(())
}

fn lost(id: &str) -> Status {
    Status::data_loss(format!(
        "session {id:?} is unknown on this rank: the group is out of step"
    ))
}
