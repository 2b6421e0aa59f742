//! Batch-invariant `y = x W^T + b` on the CPU.
//!
//! Invariant: row i of the output is bit-identical whatever the other rows of `x` are and
//! however many there are (see `dot.rs`). Work is split over output columns only, so no
//! reduction is ever split across threads.

use rayon::prelude::*;

use super::dot::{dot_rows, WeightElem};

/// Columns per parallel task; large enough to amortise scheduling, small enough to balance.
const COLS_PER_TASK: usize = 64;

fn column_block<W: WeightElem>(x: &[f32], m: usize, k: usize, w_rows: &[W], out_t: &mut [f32]) {
    // out_t is [cols][m]: column-major within this block.
    for (c, w) in w_rows.chunks_exact(k).enumerate() {
        let out_col = &mut out_t[c * m..(c + 1) * m];
        let mut i = 0;
        while i + 4 <= m {
            let mut o = [0f32; 4];
            dot_rows(
                [
                    &x[i * k..(i + 1) * k],
                    &x[(i + 1) * k..(i + 2) * k],
                    &x[(i + 2) * k..(i + 3) * k],
                    &x[(i + 3) * k..(i + 4) * k],
                ],
                w,
                &mut o,
            );
            out_col[i..i + 4].copy_from_slice(&o);
            i += 4;
        }
        while i < m {
            let mut o = [0f32; 1];
            dot_rows([&x[i * k..(i + 1) * k]], w, &mut o);
            out_col[i] = o[0];
            i += 1;
        }
    }
}

/// `x` is [m, k] row-major, `w` is [n, k] row-major, `bias` is [n]. Returns [m, n].
pub fn linear<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "linear: input is not [m, k]");
    assert_eq!(w.len(), n * k, "linear: weight is not [n, k]");
    let mut out_t = vec![0f32; n * m];
    let work = m * n * k;
    if work < 1 << 16 {
        column_block(x, m, k, w, &mut out_t);
    } else {
        out_t
            .par_chunks_mut(COLS_PER_TASK * m)
            .zip(w.par_chunks(COLS_PER_TASK * k))
            .for_each(|(o, wb)| column_block(x, m, k, wb, o));
    }
    if let Some(b) = bias {
        for (j, col) in out_t.chunks_exact_mut(m).enumerate() {
            for v in col.iter_mut() {
                *v += b[j];
            }
        }
    }
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in col.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_naive_and_is_batch_invariant() {
        let (m, k, n) = (7, 90, 300);
        let x = data(m * k, 1);
        let w = data(n * k, 2);
        let b = data(n, 3);
        let y = linear(&x, m, k, &w, n, Some(&b));
        for i in 0..m {
            let yi = linear(&x[i * k..(i + 1) * k], 1, k, &w, n, Some(&b));
            for j in 0..n {
                assert_eq!(y[i * n + j].to_bits(), yi[j].to_bits(), "row {i} col {j}");
                let naive: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum::<f32>() + b[j];
                assert!((naive - y[i * n + j]).abs() < 1e-3);
            }
        }
    }
}
