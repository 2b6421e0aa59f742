//! Times one target pass over the next token of n sessions at once against n passes of one
//! token each: what continuous batching saves on this machine, before any networking.
//! `cargo run --release -p eagle-engine --example batch_bench -- MODEL.gguf [CONTEXT]`

use std::time::Instant;

use candle_core::Device;
use eagle_engine::device::parse_precision;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_engine::session::{run_batch, TargetSession, Work};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(args.get(1).expect("usage: batch_bench MODEL [CONTEXT]"));
    let context: usize = args.get(2).map_or(Ok(200), |s| s.parse())?;
    let opened = open_model(&path)?;
    let p = parse_precision("auto")?;
    let target = TargetModel::load_with(
        opened.source.as_ref(),
        opened.config,
        p.dtype,
        p.quant,
        &Device::Cpu,
        eagle_engine::parallel::Shard::single(),
        &mut |_, _| {},
    )?;
    let prompt: Vec<u32> = (0..context as u32).map(|i| 100 + i % 5000).collect();
    println!("context {context} tokens; per-token times");
    for n in [1usize, 2, 4, 8, 16, 32] {
        let mut sessions: Vec<TargetSession> = (0..n)
            .map(|_| TargetSession::new(&target, context + 64))
            .collect::<Result<_, _>>()?;
        let t = Instant::now();
        for s in sessions.iter_mut() {
            s.prefill(&target, &prompt)?;
        }
        if n == 1 {
            println!(
                "prefill of {context} tokens: {:.2} s",
                t.elapsed().as_secs_f64()
            );
        }
        let steps = 8;
        let t = Instant::now();
        for i in 0..steps {
            for s in sessions.iter_mut() {
                s.decode(&target, 200 + i)?;
            }
        }
        let alone = t.elapsed().as_secs_f64() / (steps as usize * n) as f64;
        let tok = [7u32];
        let t = Instant::now();
        for _ in 0..steps {
            let jobs = sessions
                .iter_mut()
                .map(|s| {
                    (
                        s,
                        Work::Extend {
                            tokens: &tok,
                            logits: true,
                        },
                    )
                })
                .collect();
            run_batch(&target, jobs)?;
        }
        let batched = t.elapsed().as_secs_f64() / (steps as usize * n) as f64;
        println!(
            "n={n:3}: alone {:6.2} ms/token, batched {:6.2} ms/token ({:.2}x), one batched pass {:6.1} ms",
            alone * 1e3,
            batched * 1e3,
            alone / batched,
            batched * n as f64 * 1e3
        );
    }
    Ok(())
}
