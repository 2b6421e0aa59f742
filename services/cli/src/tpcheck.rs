//! `eagle tp-check`: runs the tensor-parallel code path on this machine as a group of one (NCCL
//! on CUDA when built with `--features nccl`; the identity collective elsewhere), next to the
//! unsharded model, and checks they choose the same tokens; then times the collectives at a
//! real model's width. On a single GPU this is how the NCCL path is exercised.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_engine::parallel::{Collective, Shard, Single};
use eagle_engine::sampling::argmax;
use eagle_engine::session::TargetSession;

use crate::runtime::{parse_device, parse_precision, resolve_or_fetch};
use crate::ModelArgs;

#[derive(Args)]
pub struct TpCheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokens to decode greedily on both paths.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Width of the timed collectives (8192 is LLaMA-70B's hidden size).
    #[arg(long, default_value_t = 8192)]
    pub width: usize,
    /// Rows of the timed collectives (tokens in one verification pass).
    #[arg(long, default_value_t = 64)]
    pub rows: usize,
}

fn group_of_one(device: &Device) -> Result<(Arc<dyn Collective>, &'static str)> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        use eagle_engine::parallel::nccl::{unique_id, Nccl};
        return Ok((Arc::new(Nccl::new(device, 0, 1, &unique_id()?)?), "NCCL"));
    }
    let _ = device;
    Ok((
        Arc::new(Single),
        "identity (no NCCL in this build or not on CUDA)",
    ))
}

/// Greedy tokens from `prompt` and the mean seconds per decoded token.
fn greedy(target: &TargetModel, prompt: &[u32], n: usize) -> Result<(Vec<u32>, f64)> {
    let mut s = TargetSession::new(target, prompt.len() + n + 1)?;
    let (_, logits) = s.prefill(target, prompt)?;
    let mut out = vec![argmax(&logits)];
    let t = Instant::now();
    while out.len() < n {
        let (_, logits) = s.decode(target, *out.last().unwrap())?;
        out.push(argmax(&logits));
    }
    Ok((out, t.elapsed().as_secs_f64() / (n - 1).max(1) as f64))
}

pub fn run(a: TpCheckArgs) -> Result<()> {
    let path = resolve_or_fetch(&a.model.model)?;
    // Tensor-parallel ranks run dense: `auto` and `q8_0` mean bf16 here.
    let dtype = parse_precision(&a.model.dtype)?.dtype;
    let device = parse_device(&a.model.device)?;
    let opened = open_model(&path)?;
    let prompt = opened
        .tokenizer
        .encode("The three laws of thermodynamics are", true)?;
    let load = |shard: Shard| {
        TargetModel::load_shard(
            opened.source.as_ref(),
            opened.config.clone(),
            dtype,
            &device,
            shard,
            &mut |_, _| {},
        )
    };
    let (comm, kind) = group_of_one(&device)?;
    println!(
        "device {:?}, dtype {dtype:?}, collective: {kind}",
        device.location()
    );
    let whole = load(Shard::single())?;
    let (want, t_whole) = greedy(&whole, &prompt, a.tokens)?;
    drop(whole);
    let sharded = load(Shard::of(comm.clone()))?;
    let (got, t_sharded) = greedy(&sharded, &prompt, a.tokens)?;
    println!(
        "greedy {} tokens: unsharded {:.2} ms/token, TP path (group of one) {:.2} ms/token",
        a.tokens,
        t_whole * 1e3,
        t_sharded * 1e3
    );
    let x = Tensor::ones((a.rows, a.width), DType::F32, &device)?;
    let reps = 50;
    let time = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        f()?.flatten_all()?.to_vec1::<f32>()?; // warm up, and wait for the device
        let t = Instant::now();
        let mut last = None;
        for _ in 0..reps {
            last = Some(f()?);
        }
        last.unwrap()
            .flatten_all()?
            .narrow(0, 0, 1)?
            .to_vec1::<f32>()?;
        Ok(t.elapsed().as_secs_f64() / reps as f64)
    };
    let ar = time(&|| Ok(comm.all_reduce_tensor(&x)?))?;
    let ag = time(&|| Ok(comm.all_gather_tensor(&x)?))?;
    let sum = comm.all_reduce_tensor(&x)?.sum_all()?.to_scalar::<f32>()?;
    println!(
        "collectives on [{}, {}] f32 ({} KiB): all-reduce {:.1} us, all-gather {:.1} us",
        a.rows,
        a.width,
        a.rows * a.width * 4 / 1024,
        ar * 1e6,
        ag * 1e6
    );
    if sum != (a.rows * a.width) as f32 {
        bail!("all-reduce of ones over a group of one summed to {sum}");
    }
    if got != want {
        bail!("the TP path chose other tokens than the unsharded model:\n  {want:?}\n  {got:?}");
    }
    println!(
        "ok: the TP path chose the unsharded model's {} tokens",
        want.len()
    );
    Ok(())
}
