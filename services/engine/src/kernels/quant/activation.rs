//! Activations quantized per block of 32 to int8 (llama.cpp's `Q8_0` / `block_q8_0` idea, with
//! the scale kept in f32 and the block's sum precomputed).
//!
//! Invariant: a row's blocks depend on that row alone, and are computed by the same scalar
//! code on every ISA, so a token's quantized activations are the same bits whatever else rides
//! in the batch and whatever the CPU. Values lie in [-127, 127] (never -128), which the SIMD
//! dot products rely on to stay clear of 16-bit saturation.

use super::BLOCK;

/// `m` rows of `k` activations, `k / 32` blocks per row.
pub struct QActs {
    pub m: usize,
    pub k: usize,
    /// [m * k] int8 values.
    pub q: Vec<i8>,
    /// [m * nb] block scales: x ~ d * q.
    pub d: Vec<f32>,
    /// [m * nb] `d * sum(q)` of each block, for formats with a per-block offset.
    pub s: Vec<f32>,
}

/// One row's view.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

impl QActs {
    /// Quantizes `x` [m, k] row-major; `k` must be a multiple of 32.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "activations are not [m, k]");
        assert_eq!(
            k % BLOCK,
            0,
            "activation width {k} is not a multiple of {BLOCK}"
        );
        let nb = k / BLOCK;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; m * nb];
        let mut s = vec![0f32; m * nb];
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let (db, sum) = quantize_block(xb, qb);
            d[b] = db;
            s[b] = db * sum as f32;
        }
        QActs { m, k, q, d, s }
    }

    pub fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.k / BLOCK;
        ActRow {
            q: &self.q[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            s: &self.s[i * nb..(i + 1) * nb],
        }
    }
}

/// Scale `amax / 127`; values rounded to nearest (ties away from zero) and clamped to ±127.
/// Returns the scale and the sum of the quantized values.
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    if d == 0.0 || !d.is_finite() {
        q.fill(0);
        return (if d.is_finite() { 0.0 } else { d }, 0);
    }
    let id = 1.0 / d;
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        let v = (xi * id).round().clamp(-127.0, 127.0) as i8;
        sum += v as i32;
        *qi = v;
    }
    (d, sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 29) as f32 - 14.0) * 0.3)
            .collect();
        let a = QActs::quantize(&x, 2, 32);
        for (i, (&xi, &qi)) in x.iter().zip(&a.q).enumerate() {
            let d = a.d[i / 32];
            assert!((d * qi as f32 - xi).abs() <= d * 0.5 + 1e-6, "{i}");
            assert!(qi != -128);
        }
        let zero = QActs::quantize(&[0.0; 32], 1, 32);
        assert!(zero.q.iter().all(|&v| v == 0) && zero.d[0] == 0.0);
    }
}
