//! Times the quantized kernels at SmolLM2 shapes, for 1 to 64 rows, on every ISA path this CPU
//! has: the cost of a draft tree of m tokens against one token, matrix by matrix, and how far
//! each kernel is from this machine's own limits. First it measures them: the int8
//! multiply-add peak of a `vpdpbusd` loop (256- and 512-bit registers) and of an AMX
//! `tdpbssd` loop where the CPU has one, on 1 thread and on all, and the memory bandwidth of a
//! streaming read. Then each kernel's multiply-adds per second are printed as a share of the
//! best peak, and its one-row time against the bandwidth roofline (bytes read / bandwidth).
//!
//! `cargo run --release -p eagle-engine --example quant_bench [-- PATH]` (`PATH` runs only that
//! ISA: portable, avx2, avx512vnni or amx). `QB_M=1,8,16` chooses the row counts; `QB_JSON=1`
//! adds one JSON line with every figure; `QB_HEAD=1` times the draft head's shapes instead.

use std::time::Instant;

use eagle_engine::kernels::quant::{amx, ggml, Isa, QMatrix};

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

/// Work per second of `f(thread)` (which returns how much it did: multiply-adds, bytes) on
/// `threads` threads at once, best of 3.
fn rate(threads: usize, f: &(dyn Fn(usize) -> f64 + Sync)) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let done: f64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads).map(|i| s.spawn(move || f(i))).collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            done / t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    const ITERS: usize = 20_000_000;

    /// 12 independent `vpdpbusd` chains on 256-bit registers: 32 multiply-adds each.
    #[target_feature(enable = "avx512vnni,avx512vl,avx512f")]
    pub unsafe fn vnni256() -> f64 {
        let (a, b) = (_mm256_set1_epi8(3), _mm256_set1_epi8(5));
        let mut acc = [_mm256_setzero_si256(); 12];
        for _ in 0..ITERS / 12 {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_epi32(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (ITERS / 12 * 12 * 32) as f64
    }

    /// The same on 512-bit registers: 64 multiply-adds each.
    #[target_feature(enable = "avx512vnni,avx512f")]
    pub unsafe fn vnni512() -> f64 {
        let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(5));
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..ITERS / 12 {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (ITERS / 12 * 12 * 64) as f64
    }
}

/// Bytes per second of a streaming read of 512 MiB split over `threads`.
fn bandwidth(threads: usize) -> f64 {
    let buf: Vec<u64> = (0..64u64 << 20).collect();
    let part = buf.len() / threads;
    rate(threads, &|i| {
        let s: u64 = buf[i * part..(i + 1) * part]
            .iter()
            .fold(0u64, |a, &v| a.wrapping_add(v));
        std::hint::black_box(s);
        (part * 8) as f64
    })
}

fn main() {
    let only = std::env::args().nth(1);
    let threads = eagle_engine::kernels::pool::threads();
    let mut peaks: Vec<(String, f64)> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512Vnni.available() {
        for t in [1, threads] {
            // SAFETY: the CPU has AVX-512 VNNI (checked above).
            peaks.push((
                format!("vpdpbusd ymm, {t} thr"),
                rate(t, &|_| unsafe { peak::vnni256() }),
            ));
            peaks.push((
                format!("vpdpbusd zmm, {t} thr"),
                rate(t, &|_| unsafe { peak::vnni512() }),
            ));
        }
    }
    if amx::available() {
        for t in [1, threads] {
            peaks.push((
                format!("tdpbssd, {t} thr"),
                rate(t, &|_| amx::spin_products(2_000_000)),
            ));
        }
    }
    let bw = bandwidth(threads);
    println!("machine limits ({threads} threads for the kernels):");
    for (name, r) in &peaks {
        println!("  int8 peak {name:22} {:8.1} G multiply-adds/s", r / 1e9);
    }
    println!(
        "  memory bandwidth ({threads} thr)         {:8.1} GB/s",
        bw / 1e9
    );
    // Shares are of the best all-thread peak of the vector units (what the VNNI and AVX2 paths
    // can reach) and, for the AMX path, of the tile peak.
    let best = |pat: &str| {
        peaks
            .iter()
            .filter(|(n, _)| n.contains(pat) && n.ends_with(&format!("{threads} thr")))
            .map(|p| p.1)
            .fold(0.0, f64::max)
    };
    let vector_peak = best("vpdpbusd");
    let tile_peak = best("tdpbssd");

    // `QB_HEAD=1`: the draft head's shapes instead (Q8_0, as a quantized target loads it).
    let shapes = if std::env::var_os("QB_HEAD").is_some() {
        vec![
            ("head fc [576, 1152] Q8_0", matrix("Q8_0", 576, 1152)),
            ("head qkv [960, 576] Q8_0", matrix("Q8_0", 960, 576)),
            ("head o [576, 576] Q8_0", matrix("Q8_0", 576, 576)),
            ("head gate_up [3072, 576] Q8_0", matrix("Q8_0", 3072, 576)),
            ("head down [576, 1536] Q8_0", matrix("Q8_0", 576, 1536)),
            ("draft lm [4096, 576] Q8_0", matrix("Q8_0", 4096, 576)),
        ]
    } else {
        vec![
            ("qkv  [960, 576] Q4_1", matrix("Q4_1", 960, 576)),
            ("gate_up [3072, 576] Q4_1", matrix("Q4_1", 3072, 576)),
            ("down [576, 1536] Q4_1", matrix("Q4_1", 576, 1536)),
            ("lm head [49152, 576] Q8_0", matrix("Q8_0", 49152, 576)),
        ]
    };
    let ms: Vec<usize> = std::env::var("QB_M")
        .map(|v| v.split(',').map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![1, 2, 4, 8, 16, 32, 64]);
    let mut json = Vec::new();
    for isa in Isa::ALL {
        if !isa.available() || only.as_deref().is_some_and(|o| o != isa.name()) {
            continue;
        }
        let peak = if isa == Isa::Amx {
            tile_peak
        } else {
            vector_peak
        };
        println!(
            "{} (time at m rows / time at 1 row; [share of the {:.0} G/s peak]):",
            isa.name(),
            peak / 1e9
        );
        for (name, q) in &shapes {
            let mut line = format!("  {name:28}");
            let mut t1 = 0.0;
            for &m in &ms {
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
                let macs = (m * q.n * q.k) as f64 / s;
                let share = if peak > 0.0 { macs / peak } else { 0.0 };
                if m == 1 {
                    t1 = s;
                    let roofline = q.bytes() as f64 / bw;
                    line += &format!(
                        " m=1 {:.3} ms ({:.1} GB/s, {:.2}x roofline);",
                        s * 1e3,
                        q.bytes() as f64 / s / 1e9,
                        s / roofline
                    );
                } else {
                    line += &format!(" {m}: {:.2}x [{:.0}%]", s / t1, share * 100.0);
                }
                json.push(serde_json::json!({
                    "isa": isa.name(), "matrix": name, "rows": m, "ms": s * 1e3,
                    "gmacs": macs / 1e9, "share_of_peak": share,
                }));
            }
            println!("{line}");
        }
    }
    if std::env::var_os("QB_JSON").is_some() {
        let peaks: serde_json::Map<String, serde_json::Value> = peaks
            .iter()
            .map(|(n, r)| (n.clone(), serde_json::json!(r / 1e9)))
            .collect();
        println!(
            "{}",
            serde_json::json!({"peaks_gmacs": peaks, "bandwidth_gbs": bw / 1e9, "kernels": json})
        );
    }
}
