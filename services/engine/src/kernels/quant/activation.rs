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
    /// [m * nb] `sum(q)` of each block, exact: the correction for weights offset by 128 (the
    /// 8-bit family on `vpdpbusd`, which multiplies unsigned by signed bytes).
    pub sum: Vec<i32>,
}

/// One row's view.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sum: &'a [i32],
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
        let mut sums = vec![0i32; m * nb];
        let block = best_block_quantizer();
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let (db, sum) = block(xb, qb);
            d[b] = db;
            s[b] = db * sum as f32;
            sums[b] = sum;
        }
        QActs {
            m,
            k,
            q,
            d,
            s,
            sum: sums,
        }
    }

    pub fn row(&self, i: usize) -> ActRow<'_> {
        let nb = self.k / BLOCK;
        ActRow {
            q: &self.q[i * self.k..(i + 1) * self.k],
            d: &self.d[i * nb..(i + 1) * nb],
            s: &self.s[i * nb..(i + 1) * nb],
            sum: &self.sum[i * nb..(i + 1) * nb],
        }
    }
}

type BlockQuantizer = fn(&[f32], &mut [i8]) -> (f32, i32);

/// The vector quantizer where the CPU has AVX2 (the same bits as [`quantize_block`]), else the
/// portable one.
fn best_block_quantizer() -> BlockQuantizer {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        return |x, q| {
            // SAFETY: the CPU has AVX2 (checked above); blocks are 32 values.
            unsafe { x86::quantize_block_avx2(x, q) }
        };
    }
    quantize_block
}

/// Portable definition: scale `amax / 127`; values rounded to nearest (ties away from zero)
/// and clamped to ±127. Returns the scale and the sum of the quantized values.
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{quantize_block, BLOCK};

    /// [`quantize_block`] on AVX2, bit for bit: the same `amax`, `d = amax / 127`, `id = 1 / d`
    /// and products `x * id` (IEEE operations, the same in every lane); Rust's `round` (ties
    /// away from zero) rebuilt as `trunc(p)` plus `sign(p)` where `|p - trunc(p)| >= 0.5` (the
    /// difference is exact: |p| <= 127.x); the clamp; the integer sum. Blocks holding a NaN, or
    /// whose scale is 0 or not finite, take the portable code.
    ///
    /// # Safety
    /// The CPU must have AVX2; `x` and `q` hold 32 values.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        assert!(x.len() == BLOCK && q.len() == BLOCK);
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(x.as_ptr().add(8 * i)));
        let mut amax = _mm256_setzero_ps();
        let mut nan = _mm256_setzero_ps();
        for &vi in &v {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, vi));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(vi, vi));
        }
        if _mm256_movemask_ps(nan) != 0 {
            return quantize_block(x, q);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), amax);
        let amax = lanes.iter().fold(0f32, |a, &l| a.max(l));
        let d = amax / 127.0;
        if d == 0.0 || !d.is_finite() {
            return quantize_block(x, q);
        }
        let id = _mm256_set1_ps(1.0 / d);
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let p = _mm256_mul_ps(v[i], id);
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
            let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(p, t));
            let away = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
            let step = _mm256_or_ps(_mm256_and_ps(p, sign), one);
            let r = _mm256_add_ps(t, _mm256_and_ps(away, step));
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        let words = [
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        ];
        // packs work within 128-bit halves: dword j of the result holds 4 values of input
        // vector j % 4 (first half) or j % 4 again (second half); put them back in order.
        let bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(words[0], words[1]),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
        );
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
        let sum = _mm256_add_epi32(
            _mm256_add_epi32(ints[0], ints[1]),
            _mm256_add_epi32(ints[2], ints[3]),
        );
        let mut s = [0i32; 8];
        _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, sum);
        (d, s.iter().sum())
    }
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

    /// The vector quantizer gives the portable one's bits on blocks built to hit its edges:
    /// exact ties after scaling, values at ±amax, zeros and negative zeros, tiny and huge
    /// scales, infinities and NaNs.
    #[test]
    fn the_vector_quantizer_gives_the_portable_bits() {
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        let mut state = 0x9e3779b9u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for i in 0..20000 {
            let scale = [1e-30f32, 1e-3, 1.0, 7.5, 1e20][i % 5];
            let mut b = [0f32; 32];
            for (j, v) in b.iter_mut().enumerate() {
                let r = next();
                *v = match r % 7 {
                    // Exact halves of the step amax / 127 with amax = 127 * scale below.
                    0 => ((r >> 8) % 255) as f32 * 0.5 * scale - 63.5 * scale,
                    1 => -0.0,
                    2 => 0.0,
                    _ => ((r >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * 127.0 * scale,
                };
                if j == 0 {
                    *v = 127.0 * scale;
                }
            }
            match i % 97 {
                0 => b[5] = f32::INFINITY,
                1 => b[9] = f32::NAN,
                2 => b = [0.0; 32],
                3 => b = [-0.0; 32],
                _ => {}
            }
            blocks.push(b);
        }
        let quantizer = best_block_quantizer();
        for b in &blocks {
            let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
            let (d1, s1) = quantize_block(b, &mut q1);
            let (d2, s2) = quantizer(b, &mut q2);
            assert_eq!(
                (d1.to_bits(), s1, q1),
                (d2.to_bits(), s2, q2),
                "block {b:?}"
            );
        }
    }
}
