//! The draft service's scheduler: the trees of every session that asks at the same time are
//! drafted together, one head pass per tree level over all of them
//! (`eagle_engine::draft::Drafter::draft_batch`), the way the worker verifies them together.
//! With 16 streams a level costs about one head pass instead of 16.
//!
//! Invariants:
//! - A batch holds at most one draft per session and at most `max_sessions` sessions; a
//!   session's later request waits for the next batch, in arrival order.
//! - A session's tree does not depend on the batch (the engine's rows are independent), so
//!   seeded sampling gives the same tokens alone or under load.
//! - A request whose caller went away is dropped before it runs; one that fails (a bad commit,
//!   a full cache) fails alone; a panic drops the batch's sessions, whose state may be half
//!   written, and answers `INTERNAL`.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

use eagle_engine::draft::{DraftJob, Drafter};
use eagle_engine::spec::BatchLoad;
use eagle_engine::tree::DraftTree;
use eagle_proto::common::Features;
use eagle_proto::sessions::SessionTable;
use eagle_proto::status::from_engine;
use tokio::sync::oneshot;
use tonic::Status;

use crate::Sequence;

/// One session's draft request: the pairs to commit first, and the tree's root.
pub(crate) struct Job {
    pub id: String,
    pub commit_tokens: Vec<u32>,
    pub commit_features: Option<Features>,
    pub root: u32,
    pub load: BatchLoad,
    reply: oneshot::Sender<Result<DraftTree, Status>>,
    span: tracing::Span,
}

/// The handle the RPC handlers submit drafts through.
pub(crate) struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the scheduler's thread; it ends once the handle is dropped.
    pub(crate) fn start(
        drafter: Arc<Drafter>,
        sessions: Arc<SessionTable<Sequence>>,
        max_sessions: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let scheduler = Scheduler {
            drafter,
            sessions,
            max_sessions: max_sessions.max(1),
        };
        std::thread::Builder::new()
            .name("eagle-draft-batcher".into())
            .spawn(move || scheduler.run(rx))
            .expect("spawning the draft scheduler thread");
        Batcher { tx }
    }

    /// Commits the pairs and drafts a tree for session `id` in a coming batch.
    pub(crate) async fn submit(
        &self,
        id: String,
        commit_tokens: Vec<u32>,
        commit_features: Option<Features>,
        root: u32,
        load: BatchLoad,
    ) -> Result<DraftTree, Status> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id,
            commit_tokens,
            commit_features,
            root,
            load,
            reply,
            span: tracing::Span::current(),
        };
        self.tx
            .send(job)
            .map_err(|_| Status::unavailable("the draft service is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::internal("the draft scheduler dropped the request"))?
    }
}

struct Scheduler {
    drafter: Arc<Drafter>,
    sessions: Arc<SessionTable<Sequence>>,
    max_sessions: usize,
}

impl Scheduler {
    fn run(self, rx: mpsc::Receiver<Job>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        loop {
            if queue.is_empty() {
                match rx.recv() {
                    Ok(job) => queue.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                queue.push_back(job);
            }
            queue.retain(|j| !j.reply.is_closed());
            let batch = self.pick(&mut queue);
            if !batch.is_empty() {
                self.batch(batch);
            }
        }
    }

    /// The next batch: queued requests in order, one per session, within `max_sessions`.
    fn pick(&self, queue: &mut VecDeque<Job>) -> Vec<Job> {
        let (mut batch, mut rest) = (Vec::new(), VecDeque::new());
        let mut ids = HashSet::new();
        while let Some(j) = queue.pop_front() {
            if batch.len() < self.max_sessions && ids.insert(j.id.clone()) {
                batch.push(j);
            } else {
                rest.push_back(j);
            }
        }
        *queue = rest;
        batch
    }

    /// Drafts the batch's trees and answers every request.
    fn batch(&self, jobs: Vec<Job>) {
        let span = tracing::info_span!("draft.batch", sessions = jobs.len());
        for j in &jobs {
            span.follows_from(&j.span);
        }
        let _in_span = span.enter();
        crate::observe_batch(jobs.len());
        let mut ready = Vec::with_capacity(jobs.len());
        for j in jobs {
            match self.sessions.get(&j.id) {
                Ok(seq) => ready.push((j, seq)),
                Err(e) => {
                    let _ = j.reply.send(Err(e));
                }
            }
        }
        let seqs: Vec<Arc<Mutex<Sequence>>> = ready.iter().map(|(_, s)| s.clone()).collect();
        let results = catch_unwind(AssertUnwindSafe(|| self.draft(&ready, &seqs)));
        match results {
            Ok(results) => {
                for ((j, _), r) in ready.into_iter().zip(results) {
                    let _ = j.reply.send(r);
                }
            }
            Err(_) => {
                for (j, _) in ready {
                    self.sessions.remove(&j.id);
                    let _ = j.reply.send(Err(Status::internal(
                        "the draft pass failed; the sessions in it were dropped",
                    )));
                }
            }
        }
    }

    /// Commits each request's pairs, then drafts every tree whose commit succeeded together.
    fn draft(
        &self,
        ready: &[(Job, Arc<Mutex<Sequence>>)],
        seqs: &[Arc<Mutex<Sequence>>],
    ) -> Vec<Result<DraftTree, Status>> {
        let d = &*self.drafter;
        let mut guards: Vec<MutexGuard<'_, Sequence>> = seqs
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut out: Vec<Option<Result<DraftTree, Status>>> = ready.iter().map(|_| None).collect();
        let mut jobs = Vec::with_capacity(ready.len());
        let mut which = Vec::with_capacity(ready.len());
        for (i, ((j, _), s)) in ready.iter().zip(guards.iter_mut()).enumerate() {
            let s = &mut **s;
            if let Err(e) =
                crate::DraftService::commit(d, s, &j.commit_tokens, j.commit_features.as_ref())
            {
                out[i] = Some(Err(e));
                continue;
            }
            jobs.push(DraftJob {
                sess: &mut s.ds,
                root: j.root,
                cfg: &s.spec,
                sampling: &s.sampling,
                rng: &mut s.rng,
                budget: &s.budget,
                load: j.load,
            });
            which.push(i);
        }
        for (i, r) in which.into_iter().zip(d.draft_batch(jobs)) {
            out[i] = Some(r.map(|(tree, _)| tree).map_err(|e| from_engine(&e)));
        }
        out.into_iter()
            .map(|r| r.expect("every request has a result"))
            .collect()
    }
}
