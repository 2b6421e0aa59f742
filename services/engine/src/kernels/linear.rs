//! Batch-invariant `y = x W^T + b` on the CPU.
//!
//! Invariant: row i of the output is bit-identical whatever the other rows of `x` are and
//! however many there are (see `dot.rs`). Work is split over output columns only, so no
//! reduction is ever split across threads.

use super::dot::{dot_block, WeightElem};

/// Columns per parallel task; large enough to amortise scheduling, small enough to balance.
const COLS_PER_TASK: usize = 24;

/// Rows per register block, and columns per register block (4 x 3 accumulators + 3 weight
/// registers fit AVX2's 16).
const ROWS: usize = 4;
const COLS: usize = 3;

#[inline]
fn block<W: WeightElem, const R: usize, const C: usize>(
    x: &[f32],
    k: usize,
    i: usize,
    w: &[W],
    c: usize,
    m: usize,
    out_t: &mut [f32],
) {
    let xs: [&[f32]; R] = std::array::from_fn(|r| &x[(i + r) * k..(i + r + 1) * k]);
    let ws: [&[W]; C] = std::array::from_fn(|j| &w[(c + j) * k..(c + j + 1) * k]);
    let mut o = [[0f32; C]; R];
    dot_block(xs, ws, &mut o);
    for (r, row) in o.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            out_t[(c + j) * m + i + r] = *v;
        }
    }
}

/// Dispatches a block of `r` (1..=4) rows by `cc` (1..=3) columns to its monomorphised kernel.
#[allow(clippy::too_many_arguments)]
fn block_dyn<W: WeightElem>(
    x: &[f32],
    k: usize,
    i: usize,
    r: usize,
    w: &[W],
    c: usize,
    cc: usize,
    m: usize,
    out_t: &mut [f32],
) {
    match (r, cc) {
        (4, 3) => block::<W, 4, 3>(x, k, i, w, c, m, out_t),
        (4, 2) => block::<W, 4, 2>(x, k, i, w, c, m, out_t),
        (4, 1) => block::<W, 4, 1>(x, k, i, w, c, m, out_t),
        (3, 3) => block::<W, 3, 3>(x, k, i, w, c, m, out_t),
        (3, 2) => block::<W, 3, 2>(x, k, i, w, c, m, out_t),
        (3, 1) => block::<W, 3, 1>(x, k, i, w, c, m, out_t),
        (2, 3) => block::<W, 2, 3>(x, k, i, w, c, m, out_t),
        (2, 2) => block::<W, 2, 2>(x, k, i, w, c, m, out_t),
        (2, 1) => block::<W, 2, 1>(x, k, i, w, c, m, out_t),
        (1, 3) => block::<W, 1, 3>(x, k, i, w, c, m, out_t),
        (1, 2) => block::<W, 1, 2>(x, k, i, w, c, m, out_t),
        _ => block::<W, 1, 1>(x, k, i, w, c, m, out_t),
    }
}

fn column_block<W: WeightElem>(x: &[f32], m: usize, k: usize, w_rows: &[W], out_t: &mut [f32]) {
    // out_t is [cols][m]: column-major within this block.
    let n = w_rows.len() / k;
    let mut i = 0;
    while i < m {
        let r = ROWS.min(m - i);
        let mut c = 0;
        while c < n {
            let cc = COLS.min(n - c);
            block_dyn(x, k, i, r, w_rows, c, cc, m, out_t);
            c += cc;
        }
        i += r;
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
        super::pool::for_each_chunk(&mut out_t, COLS_PER_TASK * m, &|t, o| {
            let c0 = t * COLS_PER_TASK;
            let wb = &w[c0 * k..(c0 + o.len() / m) * k];
            column_block(x, m, k, wb, o)
        });
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
