//! `eagle generate`: one prompt, streamed to stdout, or one JSON object with `--json`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use eagle_engine::chat::Message;
use eagle_engine::spec::{SpecConfig, TreeShape};
use eagle_engine::tokenizer::IncrementalDecoder;
use eagle_engine::tree::StaticShape;
use eagle_engine::{Engine, GenerateRequest, Mode, SamplingParams};

use crate::runtime::{load_engine, HeadPolicy};
use crate::ModelArgs;

/// Sampling settings.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily; above 0 samples.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Sample from the k most likely tokens only (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}

/// Speculation settings.
#[derive(Args, Clone, Debug)]
pub struct SpecArgs {
    /// Draft-tree size in tokens, root included; -1 picks it at every step from the measured
    /// cost of verifying n tokens on this machine and the draft's confidence.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub total_token: i32,
    /// Maximum draft depth.
    #[arg(long, default_value_t = 6)]
    pub depth: usize,
    /// Draft candidates per expansion (EAGLE-2's top_k).
    #[arg(long, default_value_t = 8)]
    pub draft_top_k: usize,
    /// dynamic (EAGLE-2) or static (EAGLE-1 tree of total_token nodes).
    #[arg(long, default_value = "dynamic")]
    pub tree: String,
}

impl SpecArgs {
    pub fn config(&self) -> Result<SpecConfig> {
        let shape = match self.tree.as_str() {
            "dynamic" => TreeShape::Dynamic,
            "static" => {
                let n = if self.total_token > 1 {
                    self.total_token as usize - 1
                } else {
                    25
                };
                TreeShape::Static(StaticShape::default_with(
                    n,
                    self.depth,
                    self.draft_top_k.min(4),
                ))
            }
            o => anyhow::bail!("unknown tree {o:?}: dynamic or static"),
        };
        let c = SpecConfig {
            total_token: self.total_token,
            depth: self.depth,
            top_k: self.draft_top_k,
            sample_branch: 2,
            shape,
        };
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_file",
        required_unless_present = "prompt_file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// eagle (speculative) or vanilla (one target pass per token).
    #[arg(long, default_value = "eagle")]
    pub mode: String,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Tokenizes a prompt: through the chat template unless `raw`.
pub fn prompt_ids(engine: &Engine, text: &str, raw: bool) -> Result<Vec<u32>> {
    Ok(if raw {
        engine.tokenizer.encode(text, engine.tokenizer.add_bos())?
    } else {
        engine.chat_prompt(&[Message {
            role: "user".into(),
            content: text.into(),
        }])?
    })
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let mut mode: Mode = a.mode.parse().map_err(anyhow::Error::msg)?;
    let text = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        _ => unreachable!("clap requires one"),
    };
    let spec = a.spec.config()?;
    let policy = if mode == Mode::Eagle {
        HeadPolicy::Prefer
    } else {
        HeadPolicy::None
    };
    let engine = load_engine(&a.model, policy)?;
    if engine.drafter.is_none() {
        mode = Mode::Vanilla;
    }
    let req = GenerateRequest {
        prompt: prompt_ids(&engine, &text, a.raw)?,
        max_new_tokens: a.sampling.max_new_tokens,
        sampling: a.sampling.params(),
        mode,
        spec,
    };
    let out = if a.json {
        engine.generate(&req)?
    } else {
        let mut dec = IncrementalDecoder::new(&engine.tokenizer);
        let mut stdout = std::io::stdout();
        let mut failed = None;
        let out = engine.generate_stream(&req, &mut |toks| {
            for &t in toks {
                match dec.push(t) {
                    Ok(s) => {
                        let _ = stdout.write_all(s.as_bytes());
                    }
                    Err(e) => failed = Some(e),
                }
            }
            let _ = stdout.flush();
            true
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let tail = dec.finish()?;
        println!("{tail}");
        let _ = std::io::stdout().flush();
        out
    };
    let decode_s = (out.wall_s - out.prefill_s).max(1e-9);
    let tps = out.tokens.len() as f64 / out.wall_s.max(1e-9);
    if a.json {
        let text = engine.tokenizer.decode(&out.tokens)?;
        let v = serde_json::json!({
            "text": text,
            "token_ids": out.tokens,
            "new_tokens": out.tokens.len(),
            "steps": out.steps,
            "mean_accepted": out.mean_accepted(),
            "wall_s": out.wall_s,
            "tokens_per_s": tps,
            "prefill_s": out.prefill_s,
            "finish_reason": out.finish,
            "mode": if mode == Mode::Eagle { "eagle" } else { "vanilla" },
            "fallback_steps": out.fallback_steps,
        });
        println!("{v}");
    } else {
        eprintln!(
            "[{} tokens in {:.2} s: {:.1} tokens/s, {:.2} tokens per target pass, prefill {:.2} s, decode {:.1} tokens/s]",
            out.tokens.len(),
            out.wall_s,
            tps,
            out.mean_accepted(),
            out.prefill_s,
            (out.tokens.len().saturating_sub(1)) as f64 / decode_s
        );
    }
    Ok(())
}
