//! `eagle head`: create and inspect EAGLE draft heads.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Subcommand;
use eagle_engine::head::EagleHead;
use eagle_engine::loader::open_model;

use crate::models;
use crate::runtime::parse_dtype;

#[derive(Subcommand, Debug)]
pub enum HeadCommand {
    /// Write a randomly initialised head shaped for a target (for tests and as a training start).
    Init {
        /// Target model (name, .gguf file or HF directory).
        #[arg(long, env = "EAGLE_MODEL", default_value = models::DEFAULT_MODEL)]
        model: String,
        /// Output directory (config.json + model.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// Seed for the initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// dtype of the saved weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Rewrite a head in another dtype (e.g. a training checkpoint in f32 to f16 for shipping);
    /// the weights are checked against the target on the way.
    Convert {
        /// Target model the head drafts for (name, .gguf file or HF directory).
        #[arg(long, env = "EAGLE_MODEL", default_value = models::DEFAULT_MODEL)]
        model: String,
        /// The head directory to read.
        #[arg(long = "in")]
        input: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights: f32, bf16 or f16.
        #[arg(long, default_value = "f16")]
        dtype: String,
    },
}

/// The target a head drafts for (fetched first if it is a registry name not yet installed).
fn open_target(model: &str) -> Result<eagle_engine::loader::OpenedModel> {
    let path = crate::runtime::resolve_or_fetch(model)?;
    open_model(&path).with_context(|| format!("opening {}", path.display()))
}

pub fn run(cmd: HeadCommand) -> Result<()> {
    match cmd {
        HeadCommand::Init {
            model,
            out,
            seed,
            dtype,
        } => {
            let opened = open_target(&model)?;
            let dtype = parse_dtype(&dtype)?;
            let head = EagleHead::init_random(
                &opened.config,
                seed,
                candle_core::DType::F32,
                &Device::Cpu,
            )?;
            head.save(&out, dtype)?;
            println!("{}", out.display());
            Ok(())
        }
        HeadCommand::Convert {
            model,
            input,
            out,
            dtype,
        } => {
            let opened = open_target(&model)?;
            let head = EagleHead::load(
                &input,
                &opened.config,
                candle_core::DType::F32,
                &Device::Cpu,
            )
            .with_context(|| format!("loading the head {}", input.display()))?;
            head.save(&out, parse_dtype(&dtype)?)?;
            println!("{}", out.display());
            Ok(())
        }
    }
}
