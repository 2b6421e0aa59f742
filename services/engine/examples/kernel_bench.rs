//! Times the batch-invariant linear kernel at SmolLM2 shapes and reports GFLOP/s and GB/s.
//! `cargo run --release -p eagle-engine --example kernel_bench`

use std::time::Instant;

use eagle_engine::kernels::linear::linear;
use half::bf16;

fn main() {
    // A weight set larger than the caches, read once per call: the memory-bandwidth ceiling
    // of one decode step (SmolLM2's tied LM head, [49152, 576]).
    let (k, n) = (576usize, 49152usize);
    let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32((i % 7) as f32)).collect();
    let x = vec![0.5f32; k];
    linear(&x, 1, k, &w, n, None);
    let t = Instant::now();
    for _ in 0..20 {
        std::hint::black_box(linear(&x, 1, k, &w, n, None));
    }
    let s = t.elapsed().as_secs_f64() / 20.0;
    println!(
        "lm head [49152, 576] bf16, m=1: {:.3} ms, {:.1} GB/s streamed",
        s * 1e3,
        (n * k * 2) as f64 / s / 1e9
    );

    let (k, n) = (576usize, 1536 * 2);
    let w32: Vec<f32> = (0..n * k)
        .map(|i| ((i % 97) as f32 - 48.0) / 100.0)
        .collect();
    let wbf: Vec<bf16> = w32.iter().map(|&x| bf16::from_f32(x)).collect();
    for m in [1usize, 4, 16, 64] {
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) / 10.0).collect();
        for (name, bytes) in [("f32", 4usize), ("bf16", 2)] {
            let iters = 200 / m.max(1) + 5;
            let t = Instant::now();
            for _ in 0..iters {
                let y = if bytes == 4 {
                    linear(&x, m, k, &w32, n, None)
                } else {
                    linear(&x, m, k, &wbf, n, None)
                };
                std::hint::black_box(y);
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
            let gbs = (n * k * bytes) as f64 / s / 1e9;
            println!(
                "m={m:3} {name:5} {:8.3} ms  {gflops:6.1} GFLOP/s  {gbs:6.1} GB/s weights",
                s * 1e3
            );
        }
    }
}
