//! Fixed-order dot products.
//!
//! Invariant: `dot_rows::<R>` gives, for each of its R rows, exactly the bits that
//! `dot_rows::<1>` gives for that row alone: 16 lane accumulators filled with fused
//! multiply-adds in index order, then summed by a fixed pairwise tree. Several rows share each
//! weight load (register blocking) without changing any row's arithmetic.

use half::{bf16, f16};

pub const LANES: usize = 16;

/// A weight element that converts exactly to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// 0 = f32, 1 = bf16, 2 = f16: lets the SIMD path pick its load at compile time.
    const KIND: u8;
    fn to_f32(self) -> f32;
}
impl WeightElem for f32 {
    const KIND: u8 = 0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
impl WeightElem for bf16 {
    const KIND: u8 = 1;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
impl WeightElem for f16 {
    const KIND: u8 = 2;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

#[inline(always)]
fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let mut a = *acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            a[l] += a[l + width];
        }
        width /= 2;
    }
    a[0]
}

#[inline(always)]
fn dot_rows_body<W: WeightElem, const R: usize>(xs: [&[f32]; R], w: &[W], out: &mut [f32; R]) {
    let k = w.len();
    let mut acc = [[0f32; LANES]; R];
    let full = k / LANES * LANES;
    let mut base = 0;
    while base < full {
        let mut wc = [0f32; LANES];
        for l in 0..LANES {
            wc[l] = w[base + l].to_f32();
        }
        for r in 0..R {
            let x = &xs[r][base..base + LANES];
            for l in 0..LANES {
                acc[r][l] = x[l].mul_add(wc[l], acc[r][l]);
            }
        }
        base += LANES;
    }
    for (l, i) in (full..k).enumerate() {
        let wi = w[i].to_f32();
        for r in 0..R {
            acc[r][l] = xs[r][i].mul_add(wi, acc[r][l]);
        }
    }
    for r in 0..R {
        out[r] = reduce_lanes(&acc[r]);
    }
}

/// The same arithmetic as `dot_rows_body`, with AVX2 registers: lanes 0-7 of the 16 live in
/// one register, lanes 8-15 in another; every lane gets the same fused multiply-adds in the
/// same order, so the bits match the portable path exactly.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2<W: WeightElem, const R: usize>(
    xs: [&[f32]; R],
    w: &[W],
    out: &mut [f32; R],
) {
    use std::arch::x86_64::*;
    let k = w.len();
    let full = k / LANES * LANES;
    let wp = w.as_ptr();
    #[inline(always)]
    unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
        match W::KIND {
            0 => _mm256_loadu_ps(p as *const f32),
            1 => {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut base = 0;
    while base < full {
        let w0 = load8(wp.add(base));
        let w1 = load8(wp.add(base + 8));
        for r in 0..R {
            let xp = xs[r].as_ptr().add(base);
            acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp), w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), w1, acc[r][1]);
        }
        base += LANES;
    }
    for r in 0..R {
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][0]);
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[r][1]);
        for (l, i) in (full..k).enumerate() {
            lanes[l] = xs[r][i].mul_add(w[i].to_f32(), lanes[l]);
        }
        out[r] = reduce_lanes(&lanes);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Avx2,
    Portable,
}

fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("EAGLE_PORTABLE_KERNELS").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Dot products of R activation rows with one weight row. All slices have the weight's length.
#[inline]
pub fn dot_rows<W: WeightElem, const R: usize>(xs: [&[f32]; R], w: &[W], out: &mut [f32; R]) {
    for x in xs.iter() {
        assert_eq!(x.len(), w.len(), "dot: length mismatch");
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time.
        Isa::Avx2 => unsafe { dot_rows_avx2(xs, w, out) },
        _ => dot_rows_body(xs, w, out),
    }
}

/// One fixed-order dot product.
#[inline]
pub fn dot<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let mut out = [0f32; 1];
    dot_rows([x], w, &mut out);
    out[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_rows_equal_single_rows_bitwise() {
        let k = 77;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..k)
                    .map(|i| ((i * 7 + r * 13) as f32).sin() * 1e3)
                    .collect()
            })
            .collect();
        let w: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut out4 = [0f32; 4];
        dot_rows([&rows[0], &rows[1], &rows[2], &rows[3]], &w, &mut out4);
        for r in 0..4 {
            assert_eq!(out4[r].to_bits(), dot(&rows[r], &w).to_bits());
        }
        let exact: f64 = rows[0]
            .iter()
            .zip(&w)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        assert!((out4[0] as f64 - exact).abs() < 1e-2 * exact.abs().max(1.0));
    }

    #[test]
    fn simd_and_portable_paths_agree_bitwise() {
        for k in [5usize, 16, 77, 576] {
            let x: Vec<f32> = (0..k)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.37)
                .collect();
            let w: Vec<f32> = (0..k)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.11)
                .collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let mut o = [0f32; 1];
            dot_rows_body([&x], &w, &mut o);
            assert_eq!(o[0].to_bits(), dot(&x, &w).to_bits(), "f32 k={k}");
            dot_rows_body([&x], &wb, &mut o);
            assert_eq!(o[0].to_bits(), dot(&x, &wb).to_bits(), "bf16 k={k}");
            dot_rows_body([&x], &wh, &mut o);
            assert_eq!(o[0].to_bits(), dot(&x, &wh).to_bits(), "f16 k={k}");
        }
    }

    #[test]
    fn bf16_weights_convert_exactly() {
        let x = vec![1.0f32; 40];
        let w: Vec<bf16> = (0..40).map(|i| bf16::from_f32(i as f32)).collect();
        assert_eq!(dot(&x, &w), (0..40).sum::<i32>() as f32);
    }
}
