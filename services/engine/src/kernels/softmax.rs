//! The attention softmax of one query vector: `exp(s_i - max)`, their sum and its inverse, with
//! an exponential of our own so that SIMD code computes it.
//!
//! Invariant: every path gives the bits of the portable definition below. The exponential is a
//! fixed sequence of IEEE operations (multiplies, adds and fused multiply-adds, each exactly
//! rounded on any hardware), applied to each element alone; the sum keeps 8 lane sums, element
//! i going to lane i mod 8 in index order, then adds them by the fixed pairwise tree of
//! `dot.rs`. The maximum is exact in any order. So a query's weights never depend on the other
//! rows of the pass, nor on the ISA.
//!
//! Source: the exponential is the classic range reduction `x = n ln 2 + r` (ln 2 split in two
//! parts so that `r` is exact) with Cephes' degree-6 polynomial for `e^r` (S. Moshier, Cephes
//! Math Library, `expf.c`; the same scheme as the SIMD exponentials of SLEEF and of ggml's
//! `ggml_v_expf`), and `2^n` built in the exponent bits. Inputs here are `s_i - max <= 0`;
//! below -87 (where e^x leaves the normal floats) the input is clamped to -87.

use super::dot::{reduce_lanes, LANES};

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts: `LN2_HI` has few significant bits, so `n * LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (ties to even).
const ROUND: f32 = 12_582_912.0;
const LOW: f32 = -87.0;
const HIGH: f32 = 88.0;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// The exponential every path computes.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Clamped so that NaN stays NaN (as `max` with the constant first does in SIMD).
    let x = if x < LOW { LOW } else { x };
    let x = if x > HIGH { HIGH } else { x };
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let r2 = r * r;
    let y = p.mul_add(r2, r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Replaces `sc` by `exp(s - max)` and returns 1 / their sum: the portable definition.
pub fn softmax_portable(sc: &mut [f32]) -> f32 {
    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut lanes = [0f32; LANES];
    for (i, x) in sc.iter_mut().enumerate() {
        *x = exp(*x - max);
        lanes[i % LANES] += *x;
    }
    1.0 / reduce_lanes(&lanes)
}

/// [`softmax_portable`] on the best path this CPU has.
pub fn softmax(sc: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::dot::avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { softmax_avx2(sc) };
    }
    softmax_portable(sc)
}

/// [`softmax_portable`] eight elements at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(sc: &mut [f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = sc.len();
    let full = n / LANES * LANES;
    let p = sc.as_mut_ptr();
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..full).step_by(LANES) {
        m = _mm256_max_ps(m, _mm256_loadu_ps(p.add(i)));
    }
    let mut lanes_m = [0f32; LANES];
    _mm256_storeu_ps(lanes_m.as_mut_ptr(), m);
    let max = sc[full..]
        .iter()
        .chain(&lanes_m)
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let mx = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for i in (0..full).step_by(LANES) {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mx));
        _mm256_storeu_ps(p.add(i), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut lanes = [0f32; LANES];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    for (l, x) in sc[full..].iter_mut().enumerate() {
        *x = exp(*x - max);
        lanes[l] += *x;
    }
    1.0 / reduce_lanes(&lanes)
}

/// [`exp`] of eight lanes, operation for operation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(_mm256_set1_ps(LOW), x);
    let x = _mm256_min_ps(_mm256_set1_ps(HIGH), x);
    let round = _mm256_set1_ps(ROUND);
    let n = _mm256_sub_ps(
        _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), round),
        round,
    );
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_HI), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(-LN2_LO), r);
    let mut p = _mm256_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exponential_is_within_two_float_roundings_of_the_true_one() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let rel = ((got - want) / want).abs();
            worst = worst.max(rel);
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e30) > 0.0 && exp(-1e30) < 1e-37);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_softmax_equals_the_portable_definition_bitwise() {
        if !crate::kernels::dot::avx2() {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        for n in [1usize, 7, 8, 9, 64, 333] {
            let s: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 1.37).sin() * 9.0 - (i % 5) as f32)
                .collect();
            let (mut a, mut b) = (s.clone(), s.clone());
            let ia = softmax_portable(&mut a);
            // SAFETY: AVX2 was detected above.
            let ib = unsafe { softmax_avx2(&mut b) };
            assert_eq!(ia.to_bits(), ib.to_bits(), "n={n}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "n={n}");
            let total: f32 = a.iter().map(|x| x * ia).sum();
            assert!((total - 1.0).abs() < 1e-5, "n={n}: weights sum to {total}");
        }
    }
}
