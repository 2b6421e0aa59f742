//! Times the CPU tree attention at SmolLM2-135M's shape (9 query heads, 3 KV heads of 64) for
//! a decode row, draft trees and prompt chunks, and prints each as the milliseconds of one
//! whole forward pass (30 layers) and as multiply-adds per second.
//! `cargo run --release -p eagle-engine --example attention_bench [NAME-FILTER]`

use std::time::Instant;

use eagle_engine::kernels::attention::{attention, AttnShape, Visibility};

const LAYERS: usize = 30;

/// A chain-heavy draft tree of `n` nodes: node i hangs off node (i - 1) / 2.
fn tree_parents(n: usize) -> Vec<i32> {
    (0..n)
        .map(|i| if i == 0 { -1 } else { ((i - 1) / 2) as i32 })
        .collect()
}

fn main() {
    let shape = AttnShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let slot = shape.n_kv_heads * shape.head_dim;
    let f = |i: usize| ((i as f32) * 0.377).sin();
    let cases: Vec<(String, Visibility)> = vec![
        ("decode, 1 row after 500".into(), Visibility::causal(500, 1)),
        (
            "tree of 8 after 500".into(),
            Visibility::tree(500, &tree_parents(8)),
        ),
        (
            "tree of 16 after 500".into(),
            Visibility::tree(500, &tree_parents(16)),
        ),
        (
            "tree of 64 after 500".into(),
            Visibility::tree(500, &tree_parents(64)),
        ),
        (
            "decode, 1 row after 3000".into(),
            Visibility::causal(3000, 1),
        ),
        (
            "tree of 8 after 3000".into(),
            Visibility::tree(3000, &tree_parents(8)),
        ),
        (
            "prompt chunk of 256 from 0".into(),
            Visibility::causal(0, 256),
        ),
        (
            "prompt chunk of 256 after 1280".into(),
            Visibility::causal(1280, 256),
        ),
    ];
    // An argument keeps only the cases whose name contains it.
    let only = std::env::args().nth(1).unwrap_or_default();
    for (name, vis) in cases.into_iter().filter(|(n, _)| n.contains(&only)) {
        let m = vis.len();
        let slots = vis
            .extra
            .iter()
            .filter_map(|e| e.last())
            .max()
            .map_or(vis.prefix, |&s| s as usize + 1);
        let k: Vec<f32> = (0..slots * slot).map(f).collect();
        let v: Vec<f32> = (0..slots * slot).map(|i| f(i + 7)).collect();
        let q: Vec<f32> = (0..m * shape.n_heads * shape.head_dim)
            .map(|i| f(i + 3))
            .collect();
        let seen: usize = vis.extra.iter().map(|e| vis.prefix + e.len()).sum();
        // q.k and p.v: 2 * head_dim multiply-adds per (row, head, visible slot).
        let madds = (seen * shape.n_heads * shape.head_dim * 2) as f64;
        std::hint::black_box(attention(&q, &shape, &k, &v, &vis));
        let iters = ((1e9 / madds) as usize).clamp(5, 5000);
        let t = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(attention(&q, &shape, &k, &v, &vis));
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{name:>32}: {:8.3} ms a pass ({LAYERS} layers), {:6.1} G multiply-adds/s",
            s * 1e3 * LAYERS as f64,
            madds / s / 1e9
        );
    }
}
