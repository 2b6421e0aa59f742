//! Answers written by the target itself: a head learns the distribution it meets when serving
//! (EAGLE-3, HASS and Medusa-2 train on the target's own answers rather than the dataset's).
//!
//! Invariant: for each prompt, the reply is exactly what the target decodes from it alone:
//! greedy, the argmax at every step (what `Engine::generate` gives in vanilla greedy mode), or
//! at a temperature, drawn with a generator seeded from (seed, conversation id), so a resumed
//! run writes the same reply. The reply ends with the end-of-turn token the target produced
//! (it is an assistant token the head must learn), or at the token budget. Many prompts run
//! together through `session::run_batch`, whose rows equal a session run alone (the engine's
//! batch-invariance tests), so batching changes speed, not tokens.
//!
//! Only the first assistant turn is regenerated: a conversation becomes its prompt up to that
//! turn (as the chat template renders it, generation prompt included) and the target's reply.

use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{choose, Rng, SamplingParams};
use eagle_engine::session::{run_batch, Done, TargetSession, Work};

use crate::error::{Result, TrainError};

/// How answers are regenerated.
#[derive(Clone, Debug, PartialEq)]
pub struct RegenConfig {
    /// 0: greedy.
    pub temperature: f32,
    pub seed: u64,
    /// Prompts decoded together.
    pub batch: usize,
    /// Prompt rows per prefill pass (prompts are prefilled in groups up to it).
    pub prefill_rows: usize,
}

impl Default for RegenConfig {
    fn default() -> Self {
        RegenConfig {
            temperature: 0.0,
            seed: 0,
            batch: 16,
            prefill_rows: 2048,
        }
    }
}

impl RegenConfig {
    /// What the manifest records, so a resumed run cannot mix answers of two settings.
    pub fn describe(&self) -> String {
        if self.temperature == 0.0 {
            "target greedy".into()
        } else {
            format!("target T={} seed {}", self.temperature, self.seed)
        }
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            ..SamplingParams::greedy()
        }
    }
}

/// A seed for conversation `id`'s reply.
fn reply_seed(seed: u64, id: &str) -> u64 {
    // FNV-1a over the id, mixed with the run's seed.
    let h = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    h ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One prompt to answer: its id, its tokens and how many reply tokens it may get.
pub struct Prompt<'a> {
    pub id: &'a str,
    pub ids: &'a [u32],
    pub max_new: usize,
}

struct Running {
    sess: TargetSession,
    rng: Rng,
    reply: Vec<u32>,
    max_new: usize,
    done: bool,
}

/// The target's replies to `prompts` (each ends with a token of `eos` or at its budget),
/// decoded together.
pub fn answer(
    target: &TargetModel,
    prompts: &[Prompt<'_>],
    eos: &[u32],
    cfg: &RegenConfig,
) -> Result<Vec<Vec<u32>>> {
    let sampling = cfg.sampling();
    let mut runs = Vec::with_capacity(prompts.len());
    for p in prompts {
        if p.ids.is_empty() {
            return Err(TrainError::Config(format!("{}: an empty prompt", p.id)));
        }
        runs.push(Running {
            sess: TargetSession::new(target, p.ids.len() + p.max_new + 1)?,
            rng: Rng::new(reply_seed(cfg.seed, p.id)),
            reply: Vec::new(),
            max_new: p.max_new,
            done: p.max_new == 0,
        });
    }
    // Prefill in groups of at most `prefill_rows` prompt tokens (one prompt at least).
    let mut next = 0;
    while next < runs.len() {
        let mut end = next;
        let mut rows = 0;
        while end < runs.len() && (end == next || rows + prompts[end].ids.len() <= cfg.prefill_rows)
        {
            rows += prompts[end].ids.len();
            end += 1;
        }
        let jobs = runs[next..end]
            .iter_mut()
            .zip(&prompts[next..end])
            .filter(|(r, _)| !r.done)
            .map(|(r, p)| {
                (
                    r,
                    Work::Extend {
                        tokens: p.ids,
                        logits: true,
                    },
                )
            });
        step(target, jobs.collect(), eos, &sampling)?;
        next = end;
    }
    // Decode every unfinished reply one token per pass, `batch` replies at a time.
    loop {
        let mut active: Vec<&mut Running> = runs.iter_mut().filter(|r| !r.done).collect();
        if active.is_empty() {
            break;
        }
        while !active.is_empty() {
            let rest = active.split_off(active.len().min(cfg.batch.max(1)));
            let last: Vec<u32> = active
                .iter()
                .map(|r| *r.reply.last().expect("a prefilled reply has a token"))
                .collect();
            let jobs = active
                .into_iter()
                .zip(&last)
                .map(|(r, t)| {
                    let work = Work::Extend {
                        tokens: std::slice::from_ref(t),
                        logits: true,
                    };
                    (r, work)
                })
                .collect();
            step(target, jobs, eos, &sampling)?;
            active = rest;
        }
    }
    Ok(runs.into_iter().map(|r| r.reply).collect())
}

/// One pass for `jobs`; each appends the token its logits choose and ends at EOS or budget.
fn step(
    target: &TargetModel,
    jobs: Vec<(&mut Running, Work<'_>)>,
    eos: &[u32],
    sampling: &SamplingParams,
) -> Result<()> {
    let (runs, work): (Vec<&mut Running>, Vec<Work<'_>>) = jobs.into_iter().unzip();
    let mut runs = runs;
    let results = {
        let batch = runs
            .iter_mut()
            .map(|r| &mut r.sess)
            .zip(work)
            .collect::<Vec<_>>();
        run_batch(target, batch)?
    };
    for (r, done) in runs.into_iter().zip(results) {
        let Done::Extended {
            logits: Some(logits),
            ..
        } = done?
        else {
            unreachable!("an extend asked for logits")
        };
        let t = choose(&logits, sampling, &mut r.rng);
        r.reply.push(t);
        r.done = eos.contains(&t) || r.reply.len() >= r.max_new;
    }
    Ok(())
}
