//! The worker's scheduler: one target pass at a time over the pending steps of every session
//! (iteration-level batching: Orca, Yu et al., OSDI 2022; vLLM's scheduler). The RPC handlers
//! hand it steps; between two passes it takes every step that has arrived, builds the next
//! pass from them, and answers each step as its pass ends. A pass's rows share every matmul
//! (`eagle_engine::session::run_batch`), so 16 sessions' next tokens cost about one pass,
//! not 16.
//!
//! Invariants:
//! - A pass holds at most one step per session, at most `max_rows` rows (a single larger step
//!   runs alone), and at most `prefill_chunk` rows of any prompt: a long prompt runs over
//!   several passes beside the other sessions' steps instead of stalling them.
//! - Steps join passes in arrival order; a prompt under way keeps its place at the front, so a
//!   long request is never starved and never starves the others.
//! - A step whose caller went away is dropped before it runs, and a prompt abandoned half-way
//!   frees its session; a released session's pending steps are refused.
//! - In a tensor-parallel group the pass is built and sent to the other ranks (a `Pass`: the
//!   prompts it begins, every part) under the group's lock, from sessions still in the table,
//!   so every rank runs the same pass on the same sessions.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;

use eagle_engine::models::TargetModel;
use eagle_engine::sampling::SamplingParams;
use eagle_engine::tree::DraftTree;
use eagle_proto::common::Tree;
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::unknown_session;
use eagle_proto::worker::group_op::Op;
use eagle_proto::worker::{pass_part, GroupOp, Pass, PassPart, PrefillRequest, PromptChunk, Step};
use tokio::sync::oneshot;
use tonic::Status;

use crate::metrics;
use crate::prefix_cache::PrefixCache;
use crate::sequence::{Part, Sequence};
use crate::{group, Group};

/// How big a pass may get.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rows (tokens) in one pass.
    pub max_rows: usize,
    /// Rows of one prompt in one pass.
    pub prefill_chunk: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rows: 256,
            prefill_chunk: 64,
        }
    }
}

/// A step a session asks for.
pub(crate) enum Task {
    /// A prompt: the request (with `reuse_cache` as this worker decided it), its sampling.
    Prefill {
        request: PrefillRequest,
        sampling: SamplingParams,
    },
    Decode(u32),
    /// A draft tree, and its wire form for the other ranks of a group.
    Verify(DraftTree, Tree),
}

impl Task {
    fn name(&self) -> &'static str {
        match self {
            Task::Prefill { .. } => "prefill",
            Task::Decode(_) => "decode",
            Task::Verify(..) => "verify",
        }
    }
}

struct Job {
    id: String,
    task: Task,
    reply: oneshot::Sender<Result<Step, Status>>,
    span: tracing::Span,
    arrived: Instant,
}

/// A job the scheduler holds, with its session and, for a prompt, where it stands.
struct Pending {
    job: Job,
    seq: Arc<Mutex<Sequence>>,
    /// A prompt under way: the cached tokens it kept, and how many of the rest have run.
    prompt: Option<(usize, usize)>,
}

impl Pending {
    /// The rows this job's next part takes (a prompt not yet begun counts all its tokens).
    fn rows(&self, chunk: usize) -> usize {
        match &self.job.task {
            Task::Prefill { request, .. } => {
                let (keep, done) = self.prompt.unwrap_or((0, 0));
                (request.tokens.len() - keep - done).min(chunk)
            }
            Task::Decode(_) => 1,
            Task::Verify(tree, _) => tree.len(),
        }
    }
}

/// The handle the RPC handlers submit steps through.
pub(crate) struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the scheduler's thread; it ends once the handle is dropped.
    pub(crate) fn start(
        target: Arc<TargetModel>,
        sessions: Arc<SessionTable<Sequence>>,
        group: Option<Arc<Group>>,
        limits: Limits,
        prefix: Option<Arc<Mutex<PrefixCache>>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler {
            target,
            sessions,
            group,
            prefix,
            limits: Limits {
                max_rows: limits.max_rows.max(1),
                prefill_chunk: limits.prefill_chunk.max(1),
            },
        };
        std::thread::Builder::new()
            .name("eagle-batcher".into())
            .spawn(move || scheduler.run(rx))
            .expect("spawning the scheduler thread");
        Batcher { tx }
    }

    /// Runs `task` on session `id` in a coming pass and returns its step.
    pub(crate) async fn submit(&self, id: &str, task: Task) -> Result<Step, Status> {
        let (reply, answer) = oneshot::channel();
        let name = task.name();
        let job = Job {
            id: id.to_string(),
            task,
            reply,
            span: tracing::Span::current(),
            arrived: Instant::now(),
        };
        self.tx
            .send(job)
            .map_err(|_| Status::unavailable("the worker is shutting down"))?;
        let r = answer
            .await
            .map_err(|_| Status::internal("the worker's scheduler dropped the step"))?;
        r.inspect(|_| tracing::trace!(op = name, "step done"))
    }
}

struct Scheduler {
    target: Arc<TargetModel>,
    sessions: Arc<SessionTable<Sequence>>,
    group: Option<Arc<Group>>,
    limits: Limits,
    /// The prefix cache (none in a tensor-parallel group: see [`crate::prefix_cache`]).
    prefix: Option<Arc<Mutex<PrefixCache>>>,
}

impl Scheduler {
    fn run(self, rx: mpsc::Receiver<Job>) {
        let mut queue: VecDeque<Pending> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv() {
                    Ok(job) => self.admit(job, &mut queue),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.admit(job, &mut queue);
            }
            self.drop_abandoned(&mut queue);
            let batch = self.pick(&mut queue);
            if batch.is_empty() {
                continue;
            }
            // Prompts under way go back to the front, in their order.
            for p in self.pass(batch).into_iter().rev() {
                queue.push_front(p);
            }
        }
    }

    fn admit(&self, job: Job, queue: &mut VecDeque<Pending>) {
        match self.sessions.get(&job.id) {
            Ok(seq) => queue.push_back(Pending {
                job,
                seq,
                prompt: None,
            }),
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
    }

    /// Drops steps nobody waits for (a half-run prompt's session goes too: its cache is of no
    /// use), and refuses those of released sessions.
    fn drop_abandoned(&self, queue: &mut VecDeque<Pending>) {
        queue.retain_mut(|p| {
            if p.job.reply.is_closed() {
                if p.prompt.is_some() {
                    self.sessions.remove(&p.job.id);
                }
                return false;
            }
            if !self.sessions.contains(&p.job.id) {
                let (tx, _) = oneshot::channel();
                let reply = std::mem::replace(&mut p.job.reply, tx);
                let _ = reply.send(Err(unknown_session(&p.job.id)));
                return false;
            }
            true
        });
    }

    /// Takes the next pass's jobs from the queue, in order, within the limits.
    fn pick(&self, queue: &mut VecDeque<Pending>) -> Vec<Pending> {
        let (mut batch, mut rest) = (Vec::new(), VecDeque::new());
        let mut ids = HashSet::new();
        let mut rows = 0;
        while let Some(p) = queue.pop_front() {
            let want = p.rows(self.limits.prefill_chunk);
            let fits = batch.is_empty() || rows + want <= self.limits.max_rows;
            if fits && !ids.contains(&p.job.id) {
                rows += want;
                ids.insert(p.job.id.clone());
                batch.push(p);
            } else {
                rest.push_back(p);
            }
        }
        *queue = rest;
        batch
    }

    /// Runs one pass, answers its finished jobs, and returns the prompts still under way.
    fn pass(&self, mut batch: Vec<Pending>) -> Vec<Pending> {
        let span = tracing::info_span!(
            "worker.pass",
            sessions = batch.len(),
            rows = tracing::field::Empty
        );
        for p in &batch {
            span.follows_from(&p.job.span);
        }
        let _in_span = span.enter();
        let results = match catch_unwind(AssertUnwindSafe(|| self.run_pass(&mut batch))) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => batch.iter().map(|_| Err(e.clone())).collect(),
            Err(_) => {
                // A session the pass panicked on may hold half-written state: drop them all.
                for p in &batch {
                    self.sessions.remove(&p.job.id);
                }
                let e = Status::internal(
                    "the worker's model pass failed; the sessions in it were dropped",
                );
                batch.iter().map(|_| Err(e.clone())).collect()
            }
        };
        let mut under_way = Vec::new();
        for (mut p, r) in batch.into_iter().zip(results) {
            match r {
                Ok(Progress::Done(step)) => answer(p.job, Ok(step)),
                Ok(Progress::Ran(keep, done)) => {
                    p.prompt = Some((keep, done));
                    under_way.push(p);
                }
                Err(e) => answer(p.job, Err(e)),
            }
        }
        under_way
    }

    /// Runs the batch's pass; in a group, under the group's lock, sent to the other ranks.
    fn run_pass(&self, batch: &mut [Pending]) -> Result<Vec<Result<Progress, Status>>, Status> {
        match &self.group {
            None => self.run_pass_with(batch, None),
            Some(g) => g.locked(|send| self.run_pass_with(batch, Some(send))),
        }
    }

    /// Begins the batch's new prompts, then runs every job's next part in one pass (after
    /// sending it with `send`, in a group).
    fn run_pass_with(
        &self,
        batch: &mut [Pending],
        send: Option<&group::Broadcast<'_>>,
    ) -> Result<Vec<Result<Progress, Status>>, Status> {
        let target = &*self.target;
        let seqs: Vec<Arc<Mutex<Sequence>>> = batch.iter().map(|p| p.seq.clone()).collect();
        let mut guards: Vec<MutexGuard<'_, Sequence>> = seqs
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut out: Vec<Option<Result<Progress, Status>>> = batch.iter().map(|_| None).collect();
        let mut begun = vec![false; batch.len()];
        for (i, (p, s)) in batch.iter_mut().zip(guards.iter_mut()).enumerate() {
            // Released since it was queued (in a group: checked under the group's lock, so
            // the pass sent holds only sessions every rank has).
            if !self.sessions.contains(&p.job.id) {
                out[i] = Some(Err(unknown_session(&p.job.id)));
                continue;
            }
            if let (Task::Prefill { .. }, None) = (&p.job.task, p.prompt) {
                match self.begin(&p.job, s) {
                    Ok(keep) => {
                        p.prompt = Some((keep, 0));
                        begun[i] = true;
                    }
                    Err(e) => out[i] = Some(Err(e)),
                }
            }
        }
        let chunk = self.limits.prefill_chunk;
        let mut parts = Vec::with_capacity(batch.len());
        let mut wire = Vec::new();
        let mut ran = Vec::with_capacity(batch.len());
        let mut ranges = Vec::with_capacity(batch.len());
        let mut rows = 0;
        for (i, (p, s)) in batch.iter().zip(guards.iter_mut()).enumerate() {
            if out[i].is_some() {
                continue;
            }
            let (part, range) = match &p.job.task {
                Task::Prefill { request, .. } => {
                    let tokens = &request.tokens;
                    let (keep, done) = p.prompt.expect("a begun prompt");
                    let from = keep + done;
                    let to = from + chunk.min(tokens.len() - from);
                    let part = Part::Prompt {
                        tokens: &tokens[from..to],
                        last: to == tokens.len(),
                        keep,
                    };
                    (part, (keep, to - keep))
                }
                Task::Decode(t) => (Part::Decode(*t), (0, 0)),
                Task::Verify(tree, _) => (Part::Verify(tree), (0, 0)),
            };
            if send.is_some() {
                wire.push(pass_part(&p.job, &part, begun[i]));
            }
            rows += match &part {
                Part::Prompt { tokens, .. } => tokens.len(),
                Part::Decode(_) => 1,
                Part::Verify(tree) => tree.len(),
            };
            parts.push((&mut **s, part));
            ranges.push(range);
            ran.push(i);
        }
        tracing::Span::current().record("rows", rows);
        if parts.is_empty() {
            return Ok(out.into_iter().map(|r| r.expect("refused")).collect());
        }
        metrics::observe_pass(parts.len(), rows);
        if let Some(send) = send {
            send(&GroupOp {
                op: Some(Op::Pass(Pass { parts: wire })),
            })?;
        }
        let results = Sequence::run_batch(target, parts)?;
        for ((i, r), (keep, ran_to)) in ran.into_iter().zip(results).zip(ranges) {
            out[i] = Some(r.map(|step| match step {
                Some(step) => Progress::Done(step),
                None => Progress::Ran(keep, ran_to),
            }));
            if let (Task::Prefill { .. }, Some(Ok(Progress::Done(_)))) =
                (&batch[i].job.task, &out[i])
            {
                if let Some(prefix) = &self.prefix {
                    offer(prefix, &self.target, &guards[i]);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every job has a result"))
            .collect())
    }

    /// Sets a new prompt up on its session, within the table's memory budget, from the longest
    /// prefix its own cache or the prefix cache holds.
    fn begin(&self, job: &Job, s: &mut Sequence) -> Result<usize, Status> {
        let Task::Prefill { request, sampling } = &job.task else {
            unreachable!("only prompts begin")
        };
        let capacity = request.capacity as usize;
        if capacity > s.sess.cache.capacity() {
            self.sessions.resize(&job.id, s.bytes_at(capacity))?;
        }
        let keep = s.begin_prefill(
            &self.target,
            &request.tokens,
            request.reuse_cache,
            capacity,
            sampling.clone(),
        )?;
        let Some(prefix) = &self.prefix else {
            return Ok(keep);
        };
        let mut prefix = prefix.lock().unwrap_or_else(|e| e.into_inner());
        let block = prefix.block_tokens();
        match prefix.lookup(&request.tokens, keep) {
            Some(hit) => s.restore(&self.target, hit, block),
            None => Ok(keep),
        }
    }
}

/// A part of the pass as the other ranks of a group receive it; a prompt's first chunk carries
/// the prefill it begins.
fn pass_part(job: &Job, part: &Part<'_>, begun: bool) -> PassPart {
    let part = match (part, &job.task) {
        (Part::Prompt { tokens, last, keep }, Task::Prefill { request, .. }) => {
            pass_part::Part::Prompt(PromptChunk {
                begin: begun.then(|| request.clone()),
                tokens: tokens.to_vec(),
                last: *last,
                keep: *keep as u32,
            })
        }
        (Part::Decode(t), _) => pass_part::Part::Decode(*t),
        (Part::Verify(_), Task::Verify(_, wire)) => pass_part::Part::Tree(wire.clone()),
        _ => unreachable!("a part is of its job's kind"),
    };
    PassPart {
        session_id: job.id.clone(),
        part: Some(part),
    }
}

/// Where a job stands after a pass.
enum Progress {
    Done(Step),
    /// A prompt chunk ran: the cached tokens kept, and how many of the rest have now run.
    Ran(usize, usize),
}

/// Offers a session's full blocks to the prefix cache. A block it cannot read is skipped
/// with a log line: the cache is an optimisation, never a reason to fail a request.
pub(crate) fn offer(prefix: &Mutex<PrefixCache>, target: &TargetModel, s: &Sequence) {
    let mut prefix = prefix.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = prefix.insert(s.cached(), |from, to| s.read_slots(target, from, to)) {
        tracing::warn!(error = %e, "prefix cache: a block could not be copied out");
    }
}

fn answer(job: Job, r: Result<Step, Status>) {
    metrics::STEPS.observe(job.task.name(), job.arrived);
    let _ = job.reply.send(r);
}
