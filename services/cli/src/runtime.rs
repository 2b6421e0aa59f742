//! Loading an engine from the command line's options, with a progress bar.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use eagle_engine::chat::ChatTemplate;
use eagle_engine::{Engine, LoadOptions};
use indicatif::{ProgressBar, ProgressStyle};

use crate::models;
use crate::ModelArgs;

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        o => bail!("unknown dtype {o:?}: use f32, bf16 or f16"),
    })
}

/// The default head for a model: `$EAGLE_HOME/heads/<name>` when it holds a config.json.
pub fn default_head(model: &str) -> Option<PathBuf> {
    let dir = models::eagle_home().join("heads").join(model);
    dir.join("config.json").exists().then_some(dir)
}

/// Loads the model (and head, when `want_head`). Errors if a head is wanted and none exists.
pub fn load_engine(args: &ModelArgs, want_head: bool) -> Result<Engine> {
    let model = models::resolve_model(&args.model)?;
    let head = match (&args.head, want_head) {
        (Some(h), _) => Some(h.clone()),
        (None, true) => Some(default_head(&args.model).ok_or_else(|| {
            anyhow::anyhow!(
                "no EAGLE head is installed for {:?} (looked in {}). Pass --head DIR, or write a \
                 random one with `eagle head init --model {} --out DIR` (it accepts almost nothing; \
                 it is for testing), or use --mode vanilla",
                args.model,
                models::eagle_home().join("heads").join(&args.model).display(),
                args.model
            )
        })?),
        (None, false) => None,
    };
    let opts = LoadOptions {
        model: model.clone(),
        head,
        dtype: parse_dtype(&args.dtype)?,
        device: Device::Cpu,
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
