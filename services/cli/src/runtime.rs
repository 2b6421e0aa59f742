//! Loading an engine from the command line's options, with a progress bar.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use eagle_engine::chat::ChatTemplate;
use eagle_engine::{Engine, LoadOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models;
use crate::ModelArgs;

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(eagle_engine::device::parse_dtype(s)?)
}

/// `--dtype` of the model flags: a dense dtype or a quantized mode (`auto`, `q8_0`).
pub fn parse_precision(s: &str) -> Result<eagle_engine::device::Precision> {
    Ok(eagle_engine::device::parse_precision(s)?)
}

pub fn parse_device(s: &str) -> Result<Device> {
    eagle_engine::device::parse_device(s).with_context(|| format!("opening device {s}"))
}

/// The default head for a model: `$EAGLE_HOME/heads/<name>` when it holds a config.json,
/// else the head shipped in this repository's `heads/<name>`, if any.
pub fn default_head(model: &str) -> Option<PathBuf> {
    let installed = models::eagle_home().join("heads").join(model);
    let shipped = shipped_heads().join(model);
    [installed, shipped]
        .into_iter()
        .find(|d| d.join("config.json").exists())
}

/// The repository's `heads/` folder (trained heads that ship with the project).
pub fn shipped_heads() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../heads")
}

/// What to do when EAGLE mode finds no head.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum HeadPolicy {
    /// Vanilla decoding: load no head.
    None,
    /// Load the head; without one, warn and decode without speculation.
    Prefer,
    /// Load the head or fail.
    Require,
}

fn no_head_message(model: &str) -> String {
    format!(
        "no EAGLE head is installed for {model:?} (looked in {}). Pass --head DIR, or write a \
         random one with `eagle head init --model {model} --out DIR` (it accepts almost nothing; \
         it is for testing)",
        models::eagle_home().join("heads").join(model).display(),
    )
}

/// A registry name that is not installed yet is fetched first.
pub fn resolve_or_fetch(model: &str) -> Result<PathBuf> {
    if let Some(spec) = models::find(model) {
        let home = models::eagle_home();
        if !spec.path_in(&home).exists() && !std::path::Path::new(model).exists() {
            eprintln!("{} is not installed yet: fetching it", spec.name);
            return crate::fetch::fetch(spec, &home, false);
        }
    }
    models::resolve_model(model)
}

/// The head directory `args` and `policy` call for, if any.
pub fn resolve_head(args: &ModelArgs, policy: HeadPolicy) -> Result<Option<PathBuf>> {
    Ok(match (&args.head, policy) {
        (_, HeadPolicy::None) => None,
        (Some(h), _) => Some(h.clone()),
        (None, HeadPolicy::Require) => Some(
            default_head(&args.model)
                .ok_or_else(|| anyhow::anyhow!(no_head_message(&args.model)))?,
        ),
        (None, HeadPolicy::Prefer) => {
            let h = default_head(&args.model);
            if h.is_none() {
                eprintln!(
                    "warning: {}. Decoding without speculation (same output, no speed-up).",
                    no_head_message(&args.model)
                );
            }
            h
        }
    })
}

/// Loads the model, and the head as `policy` says. Returns the engine and whether a head is
/// loaded.
pub fn load_engine(args: &ModelArgs, policy: HeadPolicy) -> Result<Engine> {
    let model = resolve_or_fetch(&args.model)?;
    let head = resolve_head(args, policy)?;
    let precision = parse_precision(&args.dtype)?;
    let opts = LoadOptions {
        model: model.clone(),
        head,
        dtype: precision.dtype,
        quant: precision.quant,
        device: parse_device(&args.device)?,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
            .expect("progress template")
            .progress_chars("=> "),
    );
    bar.set_message(
        model
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    let mut engine = Engine::load(&opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("loading {}", model.display()))?;
    bar.finish_and_clear();
    if let Some(t) = &args.chat_template {
        engine
            .tokenizer
            .set_chat_template(ChatTemplate::by_name(t)?);
    }
    Ok(engine)
}
