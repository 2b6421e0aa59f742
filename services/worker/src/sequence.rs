//! One sequence on the worker, the same on every rank of a tensor-parallel group: its KV cache
//! (or this rank's shard of it), sampling state, last chosen token, and the tokens the cache
//! holds with their features. Every model call the worker makes goes through these methods, on
//! rank 0 and, mirrored, on the other ranks.
//!
//! Invariants:
//! - The last chosen token is known here, and every tree or decode must start from it, so a
//!   confused or malicious caller cannot desynchronise the cache.
//! - The session knows the tokens its cache holds (and their features), so a later turn of a
//!   multi-turn conversation (`reuse`) keeps only the prefix that matches its prompt token by
//!   token and runs the rest: the cache then holds exactly what a fresh prefill of the whole
//!   prompt would, and the kernels' batch invariance makes the logits the same bits.

use candle_core::{DType, Tensor};
use eagle_engine::kv_cache::KvRows;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{choose, Rng, SamplingParams};
use eagle_engine::session::{run_batch, Done, TargetSession, Work};
use eagle_engine::tree::DraftTree;
use eagle_engine::verify::Recursive;
use eagle_proto::common::Features;
use eagle_proto::status::from_engine;
use eagle_proto::wire::features_to_wire;
use eagle_proto::worker::Step;
use tonic::Status;

use crate::prefix_cache::Hit;

pub(crate) struct Sequence {
    pub(crate) sess: TargetSession,
    sampling: SamplingParams,
    rng: Rng,
    /// The last chosen token: not yet run through the target, the root of the next tree.
    last: u32,
    /// The tokens in the cache, in position order, and (on rank 0) their features in wire form.
    cached: Vec<u32>,
    features: Vec<u8>,
    /// The dtype features travel in; `None` on the other ranks of a tensor-parallel group,
    /// which send no features and so neither convert nor keep them.
    wire: Option<DType>,
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Sequence {
    pub(crate) fn new(
        target: &TargetModel,
        capacity: usize,
        sampling: SamplingParams,
        wire: Option<DType>,
    ) -> Result<Self, Status> {
        let sess = TargetSession::new(target, capacity).map_err(|e| from_engine(&e))?;
        Ok(Sequence {
            sess,
            rng: Rng::new(sampling.seed),
            sampling,
            last: 0,
            cached: Vec::new(),
            features: Vec::new(),
            wire,
        })
    }

    /// Bytes the cache would hold at `capacity` slots.
    pub(crate) fn bytes_at(&self, capacity: usize) -> u64 {
        (self.sess.cache.bytes() / self.sess.cache.capacity().max(1) * capacity) as u64
    }

    fn row_bytes(&self, target: &TargetModel) -> usize {
        self.wire
            .map_or(0, |w| target.draft_feature_width() * w.size_in_bytes())
    }

    /// Records tokens just run into the cache and, where features are sent, returns theirs in
    /// wire form and keeps a copy.
    fn commit(&mut self, tokens: &[u32], feats: &Tensor) -> Result<Option<Features>, Status> {
        self.cached.extend_from_slice(tokens);
        let Some(wire) = self.wire else {
            return Ok(None);
        };
        let f = features_to_wire(feats, wire)?;
        self.features.extend_from_slice(&f.data);
        Ok(Some(f))
    }

    /// Forgets everything after the first `n` cached tokens.
    fn truncate(&mut self, n: usize, row_bytes: usize) {
        self.cached.truncate(n);
        self.features.truncate(n * row_bytes);
        self.sess.cache.truncate(n);
    }

    /// The tokens the cache holds.
    pub(crate) fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// Copies out the KV rows and wire features of cached slots `from..to`, for the prefix
    /// cache.
    pub(crate) fn read_slots(
        &self,
        target: &TargetModel,
        from: usize,
        to: usize,
    ) -> Result<(KvRows, Vec<u8>), Status> {
        let kv = self
            .sess
            .cache
            .read_rows(from, to)
            .map_err(|e| from_engine(&e))?;
        let rb = self.row_bytes(target);
        let features = self
            .features
            .get(from * rb..to * rb)
            .unwrap_or(&[])
            .to_vec();
        Ok((kv, features))
    }

    /// Restores a prefix-cache hit: keeps the session's first `hit.from_block` blocks and
    /// appends the hit's blocks after them. Returns how many cached tokens the prompt now
    /// starts from.
    pub(crate) fn restore(
        &mut self,
        target: &TargetModel,
        hit: Hit<'_>,
        block: usize,
    ) -> Result<usize, Status> {
        self.truncate(hit.from_block * block, self.row_bytes(target));
        for (tokens, kv, features) in hit.blocks {
            self.sess
                .cache
                .append_rows(kv)
                .map_err(|e| from_engine(&e))?;
            self.cached.extend_from_slice(tokens);
            if self.wire.is_some() {
                self.features.extend_from_slice(features);
            }
        }
        Ok(self.cached.len())
    }

    /// Sets up a prompt's run: with `reuse`, keeps the longest cached prefix of it (leaving at
    /// least one token to run), makes room for `capacity` tokens, and restarts sampling.
    /// Returns how many cached tokens were kept: the prompt's tokens from there on then run as
    /// [`Part::Prompt`] chunks, in order.
    pub(crate) fn begin_prefill(
        &mut self,
        target: &TargetModel,
        tokens: &[u32],
        reuse: bool,
        capacity: usize,
        sampling: SamplingParams,
    ) -> Result<usize, Status> {
        let keep = if reuse {
            common_prefix(&self.cached, tokens).min(tokens.len() - 1)
        } else {
            0
        };
        self.truncate(keep, self.row_bytes(target));
        if capacity > self.sess.cache.capacity() {
            self.sess
                .cache
                .grow(capacity)
                .map_err(|e| from_engine(&e))?;
        }
        self.sampling = sampling;
        self.rng = Rng::new(self.sampling.seed);
        Ok(keep)
    }

    /// Checks that `part` may run on this session, before it joins a pass.
    pub(crate) fn check(&self, part: &Part<'_>) -> Result<(), Status> {
        match part {
            Part::Prompt { .. } => Ok(()),
            Part::Decode(token) => {
                if *token != self.last {
                    return Err(Status::failed_precondition(format!(
                        "decode: token {token} is not the session's last token {}",
                        self.last
                    )));
                }
                if self.sess.cache.len() >= self.sess.cache.capacity() {
                    return Err(Status::out_of_range("decode: the session's cache is full"));
                }
                Ok(())
            }
            Part::Verify(tree) => {
                if tree.tokens[0] != self.last {
                    return Err(Status::failed_precondition(format!(
                        "verify: the tree's root {} is not the session's last token {}",
                        tree.tokens[0], self.last
                    )));
                }
                let room = self.sess.cache.capacity() - self.sess.cache.len();
                if tree.len() > room {
                    return Err(Status::out_of_range(format!(
                        "verify: {} nodes but the session has room for {room}",
                        tree.len()
                    )));
                }
                Ok(())
            }
        }
    }

    /// Runs every session's part in one target pass (`eagle_engine::session::run_batch`); a
    /// part that fails its [`Sequence::check`] gets that error and stays out of the pass. Per
    /// part: the step to answer with, or `None` after a prompt chunk that is not the last. The
    /// outer error is the pass's own, shared by all.
    pub(crate) fn run_batch(
        target: &TargetModel,
        mut items: Vec<(&mut Sequence, Part<'_>)>,
    ) -> Result<Vec<Result<Option<Step>, Status>>, Status> {
        let mut out: Vec<Option<Result<Option<Step>, Status>>> = items
            .iter()
            .map(|(s, p)| s.check(p).err().map(Err))
            .collect();
        let mut ran = Vec::with_capacity(items.len());
        let mut jobs = Vec::with_capacity(items.len());
        for (i, (seq, part)) in items.iter_mut().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let Sequence {
                sess,
                sampling,
                rng,
                ..
            } = &mut **seq;
            let work = match part {
                Part::Prompt { tokens, last, .. } => Work::Extend {
                    tokens,
                    logits: *last,
                },
                Part::Decode(token) => Work::Extend {
                    tokens: std::slice::from_ref(token),
                    logits: true,
                },
                Part::Verify(tree) => Work::Verify {
                    tree,
                    sampling,
                    rng,
                    rule: &Recursive,
                },
            };
            jobs.push((sess, work));
            ran.push(i);
        }
        let done = run_batch(target, jobs).map_err(|e| from_engine(&e))?;
        for (i, d) in ran.into_iter().zip(done) {
            let (seq, part) = &mut items[i];
            out[i] = Some(
                d.map_err(|e| from_engine(&e))
                    .and_then(|d| seq.finish(target, part, d)),
            );
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every part has a result"))
            .collect())
    }

    /// Records a part's result: the tokens run and their features, the next chosen token.
    fn finish(
        &mut self,
        target: &TargetModel,
        part: &Part<'_>,
        done: Done,
    ) -> Result<Option<Step>, Status> {
        match (part, done) {
            (Part::Prompt { tokens, last, keep }, Done::Extended { features, logits }) => {
                let f = self.commit(tokens, &features)?;
                let (true, Some(logits)) = (*last, logits) else {
                    return Ok(None);
                };
                self.last = choose(&logits, &self.sampling, &mut self.rng);
                // The step's features cover every token the cache now holds.
                let all = f.map(|f| Features {
                    rows: self.cached.len() as u32,
                    hidden: target.draft_feature_width() as u32,
                    dtype: f.dtype,
                    data: self.features.clone(),
                });
                Ok(Some(Step {
                    tokens: vec![self.last],
                    features: all,
                    cached_tokens: *keep as u32,
                }))
            }
            (Part::Decode(token), Done::Extended { features, logits }) => {
                let logits = logits.expect("a decode asks for logits");
                self.last = choose(&logits, &self.sampling, &mut self.rng);
                let features = self.commit(&[*token], &features)?;
                Ok(Some(Step {
                    tokens: vec![self.last],
                    features,
                    cached_tokens: 0,
                }))
            }
            (Part::Verify(_), Done::Verified(v)) => {
                let root = self.last;
                let (bonus, path) = v
                    .verdict
                    .tokens
                    .split_last()
                    .expect("a verdict has a bonus token");
                let mut run = vec![root];
                run.extend_from_slice(path);
                let features = self.commit(&run, &v.features)?;
                self.last = *bonus;
                Ok(Some(Step {
                    tokens: v.verdict.tokens,
                    features,
                    cached_tokens: 0,
                }))
            }
            _ => unreachable!("a pass answers each part in kind"),
        }
    }
}

/// What one sequence runs in a pass.
pub(crate) enum Part<'a> {
    /// The next chunk of a prompt (the cache holds its first `keep` tokens from an earlier
    /// turn and the chunks before this one); the `last` chunk chooses the next token.
    Prompt {
        tokens: &'a [u32],
        last: bool,
        keep: usize,
    },
    /// The last chosen token, alone.
    Decode(u32),
    /// A draft tree rooted at the last chosen token.
    Verify(&'a DraftTree),
}
