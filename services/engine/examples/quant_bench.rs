//! Times the quantized kernels at SmolLM2 shapes, for 1 to 64 rows, on every ISA path this CPU
//! has: the cost of a draft tree of m tokens against one token, matrix by matrix.
//! `cargo run --release -p eagle-engine --example quant_bench [-- PATH]` (`PATH` runs only that
//! ISA: portable, avx2 or avx512vnni).

use std::time::Instant;

use eagle_engine::kernels::quant::{ggml, Isa, QMatrix};

fn matrix(ty: &'static str, n: usize, k: usize) -> QMatrix {
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i as u32).wrapping_mul(2654435761) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let rows = ggml::quantize_q8_0(&w, n, k).unwrap();
    let mut rows = match ty {
        "Q8_0" => rows,
        _ => {
            // A Q4_1-shaped matrix: 4-bit values, f16 scale and offset per block.
            let mut r = rows;
            r.family = eagle_engine::kernels::quant::Family::Q4;
            r.source = "Q4_1";
            r.q.iter_mut().for_each(|v| *v &= 15);
            r.m = r.d.iter().map(|d| -8.0 * d).collect();
            r
        }
    };
    rows.source = ty;
    QMatrix::new(rows.pack())
}

fn main() {
    let only = std::env::args().nth(1);
    let shapes = [
        ("qkv  [960, 576] Q4_1", matrix("Q4_1", 960, 576)),
        ("gate_up [3072, 576] Q4_1", matrix("Q4_1", 3072, 576)),
        ("down [576, 1536] Q4_1", matrix("Q4_1", 576, 1536)),
        ("lm head [49152, 576] Q8_0", matrix("Q8_0", 49152, 576)),
    ];
    for isa in Isa::ALL {
        if !isa.available() || only.as_deref().is_some_and(|o| o != isa.name()) {
            continue;
        }
        println!("{}:", isa.name());
        for (name, q) in &shapes {
            let mut line = format!("  {name:28}");
            let mut t1 = 0.0;
            for m in std::env::var("QB_M")
                .map(|v| {
                    v.split(",")
                        .map(|x| x.parse().unwrap())
                        .collect::<Vec<usize>>()
                })
                .unwrap_or(vec![1usize, 2, 4, 8, 16, 32, 64])
            {
                let x: Vec<f32> = (0..m * q.k)
                    .map(|i| ((i % 13) as f32 - 6.0) / 10.0)
                    .collect();
                q.matmul_with(isa, &x, m);
                let iters = (400 / m).max(8);
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(q.matmul_with(isa, &x, m));
                }
                let s = t.elapsed().as_secs_f64() / iters as f64;
                if m == 1 {
                    t1 = s;
                    line += &format!(
                        " m=1 {:.3} ms ({:.1} GB/s);",
                        s * 1e3,
                        q.bytes() as f64 / s / 1e9
                    );
                } else {
                    line += &format!(" {m}: {:.2}x", s / t1);
                }
            }
            println!("{line}");
        }
    }
}
