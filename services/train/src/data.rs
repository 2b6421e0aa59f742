//! Training data generation: run the target over each conversation and store its features.
//!
//! Invariant: for every stored conversation, `features[j]` is what the serving engine computes
//! for token j of that exact id sequence (`TargetModel::forward` from an empty cache with causal
//! visibility, as `TargetSession::prefill` runs a prompt): the last decoder layer's output after
//! the final norm, i.e. the vector the LM head reads. This is the feature definition of the
//! engine's head and of published EAGLE heads (Hugging Face `LlamaModel`'s output, which the
//! EAGLE reference code trains on), so a head trained here drafts from the same numbers it
//! sees at serving time. (The text says "before the final norm"; the engine, the
//! published heads and this crate all use the post-norm state, and mixing the two would make a
//! trained head useless.)
//!
//! Generation is resumable: records are consumed in input order, shards are flushed whole, and
//! the manifest records the input record to continue from (see `shards.rs`). With `regen`, the
//! first assistant turn of each conversation is replaced by the target's own answer
//! (`regen.rs`), computed for `regen.batch` conversations at a time.

use std::path::Path;

use candle_core::{DType, Tensor};
use eagle_engine::kernels::attention::Visibility;
use eagle_engine::models::{Rows, States, TargetModel};

use crate::error::{Result, TrainError};
use crate::regen::{answer, Prompt, RegenConfig};
use crate::shards::{dtype_name, shard_name, Manifest, ShardInfo, ShardWriter, MANIFEST_FORMAT};
use crate::split::is_held_out;

/// A conversation ready for the target.
#[derive(Clone, Debug)]
pub struct Sample {
    pub id: String,
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
}

/// Settings of one data directory; a resumed run must use the same ones.
#[derive(Clone, Debug)]
pub struct DataConfig {
    /// The target's name, recorded in the manifest.
    pub model: String,
    /// Where the conversations come from, recorded in the manifest.
    pub input: String,
    pub max_len: usize,
    pub held_out_frac: f64,
    /// Feature dtype on disk: f16 or bf16.
    pub dtype: DType,
    /// Stop once this many tokens are stored (all splits).
    pub max_tokens: Option<usize>,
    /// Tokens per shard (a shard is flushed once it holds at least this many).
    pub shard_tokens: usize,
    /// Regenerate the answers with the target (and the end-of-turn ids that end them).
    pub regen: Option<(RegenConfig, Vec<u32>)>,
}

impl DataConfig {
    /// About 64 MiB of features per shard.
    pub fn default_shard_tokens(hidden: usize) -> usize {
        ((64usize << 20) / (hidden * 2)).max(1024)
    }
}

/// Progress of a generation run.
#[derive(Clone, Debug, Default)]
pub struct DataProgress {
    pub records: usize,
    pub conversations: usize,
    pub tokens: usize,
}

/// The target's features for `ids`: [T, H] f32 on the target's device.
pub fn features(target: &TargetModel, ids: &[u32]) -> Result<Tensor> {
    Ok(states(target, ids)?.last)
}

/// The target's features for `ids` and, when it has draft layers (EAGLE-3), those layers'
/// outputs side by side (`draft`), f32 on the target's device.
pub fn states(target: &TargetModel, ids: &[u32]) -> Result<States> {
    let mut cache = target.new_cache(ids.len())?;
    let positions: Vec<usize> = (0..ids.len()).collect();
    let vis = Visibility::causal(0, ids.len());
    Ok(target
        .forward_batch_states(&mut [Rows {
            cache: &mut cache,
            tokens: ids,
            positions: &positions,
            vis: &vis,
        }])?
        .remove(0))
}

/// What to do with one input record.
pub enum Prepared {
    Sample(Sample),
    /// Not stored, for the reason given (no assistant reply, a template error).
    Skip(SkipReason, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    NoAssistant,
    Template,
}

/// Runs `target` over the records and writes shards and the manifest to `out`, continuing a
/// previous run there if its manifest matches `cfg`. `records` yields every input record in
/// order (errors are malformed records, counted and skipped); `prepare` turns a record into a
/// sample. Returns the final manifest.
pub fn generate<R>(
    target: &TargetModel,
    records: impl Iterator<Item = Result<R>>,
    mut prepare: impl FnMut(R) -> Prepared,
    out: &Path,
    cfg: &DataConfig,
    progress: &mut dyn FnMut(&DataProgress),
) -> Result<Manifest> {
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let hidden = target.cfg.hidden_size;
    let layers = target.draft_layers.clone();
    let fresh = Manifest {
        format: MANIFEST_FORMAT.into(),
        model: cfg.model.clone(),
        hidden_size: hidden,
        vocab_size: target.cfg.vocab_size,
        dtype: dtype_name(cfg.dtype).into(),
        max_len: cfg.max_len,
        held_out_frac: cfg.held_out_frac,
        input: cfg.input.clone(),
        answers: match &cfg.regen {
            Some((r, _)) => r.describe(),
            None => "dataset".into(),
        },
        feature_layers: layers.clone(),
        shards: Vec::new(),
        conversations: 0,
        held_out_conversations: 0,
        tokens: 0,
        records_read: 0,
        skipped: Default::default(),
        skip_examples: Vec::new(),
        complete: false,
    };
    let mut man = match Manifest::load(out)? {
        None => fresh,
        Some(old) => {
            let same = old.model == fresh.model
                && old.hidden_size == fresh.hidden_size
                && old.vocab_size == fresh.vocab_size
                && old.dtype == fresh.dtype
                && old.max_len == fresh.max_len
                && old.held_out_frac == fresh.held_out_frac
                && old.input == fresh.input
                && old.answers == fresh.answers
                && old.feature_layers == fresh.feature_layers;
            if !same {
                return Err(TrainError::data(
                    out.join(crate::shards::MANIFEST),
                    format!(
                        "this directory holds data made with other settings (model {}, input {}, \
                         answers {}, dtype {}, max_len {}, held-out {}, feature layers {:?}); use \
                         another --out or the same settings",
                        old.model,
                        old.input,
                        old.answers,
                        old.dtype,
                        old.max_len,
                        old.held_out_frac,
                        old.feature_layers
                    ),
                ));
            }
            old
        }
    };
    // Whether `tokens` stored meet the budget.
    let over_budget = |tokens: usize| cfg.max_tokens.is_some_and(|b| tokens >= b);
    let mut prog = DataProgress {
        records: man.records_read,
        conversations: man.conversations,
        tokens: man.tokens,
    };
    progress(&prog);
    if man.complete || over_budget(man.tokens) {
        return Ok(man);
    }
    let mut shard = ShardWriter::with_layers(cfg.dtype, hidden, layers.len());
    let mut next = man.records_read;
    let mut records = records.skip(man.records_read);
    let chunk_len = cfg.regen.as_ref().map_or(1, |(r, _)| r.batch.max(1));
    let mut exhausted = false;
    'input: while !exhausted && !over_budget(man.tokens + shard.tokens()) {
        // Up to `chunk_len` samples (and the records skipped on the way), in input order,
        // each with its record number.
        let mut chunk: Vec<(usize, Result<Prepared>)> = Vec::new();
        let mut samples = 0;
        while samples < chunk_len {
            let Some(rec) = records.next() else {
                exhausted = true;
                break;
            };
            let item = match rec {
                Err(e @ TrainError::Record { .. }) => Err(e),
                Err(e) => return Err(e),
                Ok(r) => Ok(prepare(r)),
            };
            samples += matches!(item, Ok(Prepared::Sample(_))) as usize;
            chunk.push((next + chunk.len() + 1, item));
        }
        if let Some((rc, eos)) = &cfg.regen {
            regenerate(target, &mut chunk, eos, rc, cfg.max_len)?;
        }
        for (rec_no, item) in chunk {
            if over_budget(man.tokens + shard.tokens()) {
                // The rest of the chunk is read again by the next run.
                exhausted = false;
                break 'input;
            }
            next = rec_no;
            prog.records = next;
            let sample = match item {
                Err(e) => {
                    man.skipped.malformed += 1;
                    note(&mut man, e.to_string());
                    continue;
                }
                Ok(Prepared::Sample(s)) => s,
                Ok(Prepared::Skip(why, msg)) => {
                    match why {
                        SkipReason::NoAssistant => man.skipped.no_assistant += 1,
                        SkipReason::Template => man.skipped.template += 1,
                    }
                    note(&mut man, msg);
                    continue;
                }
            };
            let mut ids = sample.ids;
            let mut mask = sample.mask;
            ids.truncate(cfg.max_len);
            mask.truncate(cfg.max_len);
            if ids.len() < 2 || !mask.contains(&1) {
                man.skipped.no_assistant += 1;
                continue;
            }
            let st = states(target, &ids)?;
            shard.push(
                &sample.id,
                &ids,
                &mask,
                &st.last,
                (!layers.is_empty()).then_some(&st.draft),
                is_held_out(&sample.id, cfg.held_out_frac),
            )?;
            prog.conversations = man.conversations + shard.conversations();
            prog.tokens = man.tokens + shard.tokens();
            progress(&prog);
            if shard.tokens() >= cfg.shard_tokens {
                flush(&mut man, &mut shard, out, next, cfg, hidden)?;
            }
        }
    }
    flush(&mut man, &mut shard, out, next, cfg, hidden)?;
    man.records_read = next;
    man.complete = exhausted;
    man.save(out)?;
    prog.records = next;
    progress(&prog);
    Ok(man)
}

/// Replaces the first assistant turn of every sample in `chunk` by the target's answer to the
/// prompt before it (all of them decoded together), within `max_len` tokens in all.
fn regenerate(
    target: &TargetModel,
    chunk: &mut [(usize, Result<Prepared>)],
    eos: &[u32],
    rc: &RegenConfig,
    max_len: usize,
) -> Result<()> {
    let mut samples: Vec<&mut Sample> = chunk
        .iter_mut()
        .filter_map(|(_, item)| match item {
            Ok(Prepared::Sample(s)) => Some(s),
            _ => None,
        })
        .collect();
    // The prompt: every token before the first assistant token.
    let cut: Vec<usize> = samples
        .iter()
        .map(|s| s.mask.iter().position(|&m| m == 1).unwrap_or(s.ids.len()))
        .collect();
    let prompts: Vec<Prompt<'_>> = samples
        .iter()
        .zip(&cut)
        .map(|(s, &c)| Prompt {
            id: &s.id,
            ids: &s.ids[..c],
            max_new: max_len.saturating_sub(c),
        })
        .collect();
    let replies = answer(target, &prompts, eos, rc)?;
    for ((s, c), reply) in samples.iter_mut().zip(cut).zip(replies) {
        s.ids.truncate(c);
        s.mask.truncate(c);
        s.mask.resize(c + reply.len(), 1);
        s.ids.extend(reply);
    }
    Ok(())
}

fn note(man: &mut Manifest, msg: String) {
    if man.skip_examples.len() < 20 {
        man.skip_examples.push(msg);
    }
}

fn flush(
    man: &mut Manifest,
    shard: &mut ShardWriter,
    out: &Path,
    next_record: usize,
    cfg: &DataConfig,
    hidden: usize,
) -> Result<()> {
    if shard.conversations() == 0 {
        return Ok(());
    }
    let file = shard_name(man.shards.len());
    shard.write(&out.join(&file))?;
    man.shards.push(ShardInfo {
        file,
        conversations: shard.conversations(),
        held_out: shard.held_out(),
        tokens: shard.tokens(),
        next_record,
    });
    man.conversations += shard.conversations();
    man.held_out_conversations += shard.held_out();
    man.tokens += shard.tokens();
    man.records_read = next_record;
    man.save(out)?;
    *shard = ShardWriter::with_layers(cfg.dtype, hidden, man.feature_layers.len());
    Ok(())
}
