//! Fixed-order dot products.
//!
//! Invariant: every (row, column) pair is reduced the same way whatever block it is computed
//! in: 8 lane accumulators filled with fused multiply-adds in index order (element i goes to
//! lane i mod 8), then summed by a fixed pairwise tree. `dot_block::<R, C>` computes R x C such
//! dot products at once, sharing loads (register blocking), and gives for each pair exactly the
//! bits `dot` gives. `mul_add` is exactly rounded with or without FMA hardware, so the SIMD and
//! portable paths agree bit for bit too.

use half::{bf16, f16};

pub const LANES: usize = 8;

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

/// The fixed pairwise tree over 8 lane sums: `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
#[inline(always)]
pub(crate) fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
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

/// Portable reference: the arithmetic every path must reproduce.
#[inline(always)]
fn dot_block_body<W: WeightElem, const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[W]; C],
    out: &mut [[f32; C]; R],
) {
    let k = ws[0].len();
    let mut acc = [[[0f32; LANES]; C]; R];
    let mut base = 0;
    while base + LANES <= k {
        for c in 0..C {
            let mut wc = [0f32; LANES];
            for l in 0..LANES {
                wc[l] = ws[c][base + l].to_f32();
            }
            for r in 0..R {
                for l in 0..LANES {
                    acc[r][c][l] = xs[r][base + l].mul_add(wc[l], acc[r][c][l]);
                }
            }
        }
        base += LANES;
    }
    for r in 0..R {
        for c in 0..C {
            for (l, i) in (base..k).enumerate() {
                acc[r][c][l] = xs[r][i].mul_add(ws[c][i].to_f32(), acc[r][c][l]);
            }
            out[r][c] = reduce_lanes(&acc[r][c]);
        }
    }
}

/// The same arithmetic with AVX2 registers: one 8-lane register per (row, column) pair.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_block_avx2<W: WeightElem, const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[W]; C],
    out: &mut [[f32; C]; R],
) {
    use std::arch::x86_64::*;
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
    let k = ws[0].len();
    let full = k / LANES * LANES;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut base = 0;
    while base < full {
        let mut w = [_mm256_setzero_ps(); C];
        for c in 0..C {
            w[c] = load8(ws[c].as_ptr().add(base));
        }
        for r in 0..R {
            let x = _mm256_loadu_ps(xs[r].as_ptr().add(base));
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(x, w[c], acc[r][c]);
            }
        }
        base += LANES;
    }
    // Eight accumulators at a time through the vector form of `reduce_lanes` (no tail to add).
    let mut done = 0;
    if full == k {
        while done + 8 <= R * C {
            let a: [__m256; 8] = std::array::from_fn(|j| acc[(done + j) / C][(done + j) % C]);
            let d = reduce8_avx(a);
            for (j, v) in d.into_iter().enumerate() {
                out[(done + j) / C][(done + j) % C] = v;
            }
            done += 8;
        }
    }
    for idx in done..R * C {
        let (r, c) = (idx / C, idx % C);
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
        for (l, i) in (full..k).enumerate() {
            lanes[l] = xs[r][i].mul_add(ws[c][i].to_f32(), lanes[l]);
        }
        out[r][c] = reduce_lanes(&lanes);
    }
}

/// `reduce_lanes` of eight registers at once, with the very same additions:
/// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))` for each, lanes moved by shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn reduce8_avx(a: [std::arch::x86_64::__m256; 8]) -> [f32; 8] {
    use std::arch::x86_64::*;
    // Width 4: lane l of each register plus its lane l + 4, two registers per result.
    let half = |x: __m256, y: __m256| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(x, y),
            _mm256_permute2f128_ps::<0x31>(x, y),
        )
    };
    let (s01, s23, s45, s67) = (
        half(a[0], a[1]),
        half(a[2], a[3]),
        half(a[4], a[5]),
        half(a[6], a[7]),
    );
    // Width 2: lanes 0, 1 plus lanes 2, 3 of each half: [a0 a0 a2 a2 | a1 a1 a3 a3].
    let quarter = |x: __m256, y: __m256| {
        _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(x, y),
            _mm256_shuffle_ps::<0xEE>(x, y),
        )
    };
    let (p0, p1) = (quarter(s01, s23), quarter(s45, s67));
    // Width 1: [a0 a2 a4 a6 | a1 a3 a5 a7].
    let d = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(p0, p1),
        _mm256_shuffle_ps::<0xDD>(p0, p1),
    );
    let mut v = [0f32; 8];
    _mm256_storeu_ps(v.as_mut_ptr(), d);
    [v[0], v[4], v[1], v[5], v[2], v[6], v[3], v[7]]
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

/// Whether the AVX2 path runs (other kernels compile their own AVX2 variants of code whose
/// arithmetic, elementwise and in a fixed order, is the same on every path).
pub(crate) fn avx2() -> bool {
    isa() == Isa::Avx2
}

/// R x C dot products: `out[r][c] = xs[r] . ws[c]`. All slices have the same length.
#[inline]
pub fn dot_block<W: WeightElem, const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[W]; C],
    out: &mut [[f32; C]; R],
) {
    let k = ws[0].len();
    for x in xs.iter() {
        assert_eq!(x.len(), k, "dot: length mismatch");
    }
    for w in ws.iter() {
        assert_eq!(w.len(), k, "dot: length mismatch");
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the features were detected at run time; lengths were checked above.
        Isa::Avx2 => unsafe { dot_block_avx2(xs, ws, out) },
        _ => dot_block_body(xs, ws, out),
    }
}

/// Whether the float kernels may use 512-bit registers: the quantized kernels' path is one of
/// the AVX-512 ones (so `EAGLE_KERNEL_ISA=avx2` and the tests' forced paths narrow this too).
#[cfg(target_arch = "x86_64")]
pub(crate) fn wide() -> bool {
    use super::quant::{isa, Isa};
    avx2() && matches!(isa(), Isa::Amx | Isa::Avx512Vnni) && is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn wide() -> bool {
    false
}

/// [`dot_block`] of R rows against eight f32 columns: on 512-bit registers when allowed (two
/// columns per register, each in its own 8 lanes), with the same bits.
#[inline]
pub fn dot_block_8<const R: usize>(xs: [&[f32]; R], ws: [&[f32]; 8], out: &mut [[f32; 8]; R]) {
    let k = ws[0].len();
    #[cfg(target_arch = "x86_64")]
    if k.is_multiple_of(LANES) && wide() {
        for x in xs.iter() {
            assert_eq!(x.len(), k, "dot: length mismatch");
        }
        for w in ws.iter() {
            assert_eq!(w.len(), k, "dot: length mismatch");
        }
        // SAFETY: AVX-512F was detected at run time; lengths were checked above.
        return unsafe { dot_8_avx512(xs, ws, out) };
    }
    dot_block(xs, ws, out)
}

/// The arithmetic of [`dot_block_body`] for eight columns, two per 512-bit register: lanes 0-7
/// hold one column's 8 lane sums and lanes 8-15 the next one's, the row's 8 inputs repeated in
/// both halves. `k` is a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn dot_8_avx512<const R: usize>(xs: [&[f32]; R], ws: [&[f32]; 8], out: &mut [[f32; 8]; R]) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn pair(lo: *const f32, hi: *const f32) -> __m512 {
        let l = _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(lo)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            l,
            _mm256_castps_pd(_mm256_loadu_ps(hi)),
        ))
    }
    let k = ws[0].len();
    let mut acc = [[_mm512_setzero_ps(); 4]; R];
    let mut i = 0;
    while i < k {
        let w: [__m512; 4] =
            std::array::from_fn(|p| pair(ws[2 * p].as_ptr().add(i), ws[2 * p + 1].as_ptr().add(i)));
        for r in 0..R {
            let x = xs[r].as_ptr().add(i);
            let x = pair(x, x);
            for p in 0..4 {
                acc[r][p] = _mm512_fmadd_ps(x, w[p], acc[r][p]);
            }
        }
        i += LANES;
    }
    for r in 0..R {
        let halves: [__m256; 8] = std::array::from_fn(|c| {
            let z = acc[r][c / 2];
            if c % 2 == 0 {
                _mm512_castps512_ps256(z)
            } else {
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z)))
            }
        });
        out[r] = reduce8_avx(halves);
    }
}

/// One fixed-order dot product.
#[inline]
pub fn dot<W: WeightElem>(x: &[f32], w: &[W]) -> f32 {
    let mut out = [[0f32; 1]; 1];
    dot_block([x], [w], &mut out);
    out[0][0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_equal_single_products_bitwise() {
        let k = 77;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..k)
                    .map(|i| ((i * 7 + r * 13) as f32).sin() * 1e3)
                    .collect()
            })
            .collect();
        let cols: Vec<Vec<f32>> = (0..3)
            .map(|c| (0..k).map(|i| ((i + c * 5) as f32 * 0.37).cos()).collect())
            .collect();
        let mut out = [[0f32; 3]; 4];
        dot_block(
            [&rows[0], &rows[1], &rows[2], &rows[3]],
            [&cols[0], &cols[1], &cols[2]],
            &mut out,
        );
        for r in 0..4 {
            for c in 0..3 {
                assert_eq!(out[r][c].to_bits(), dot(&rows[r], &cols[c]).to_bits());
            }
        }
        let exact: f64 = rows[0]
            .iter()
            .zip(&cols[0])
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        assert!((out[0][0] as f64 - exact).abs() < 1e-2 * exact.abs().max(1.0));
    }

    #[test]
    fn eight_accumulator_blocks_equal_single_products_bitwise() {
        for k in [8usize, 64, 72] {
            let x: Vec<Vec<f32>> = (0..2)
                .map(|r| {
                    (0..k)
                        .map(|i| ((i * 13 + r * 7) as f32 * 0.71).sin() * 3.0)
                        .collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = (0..4)
                .map(|c| {
                    (0..k)
                        .map(|i| ((i * 5 + c * 11) as f32 * 0.29).cos())
                        .collect()
                })
                .collect();
            let mut o = [[0f32; 4]; 2];
            dot_block([&x[0], &x[1]], [&w[0], &w[1], &w[2], &w[3]], &mut o);
            let mut p = [[0f32; 4]; 2];
            dot_block_body([&x[0], &x[1]], [&w[0], &w[1], &w[2], &w[3]], &mut p);
            for r in 0..2 {
                for c in 0..4 {
                    assert_eq!(o[r][c].to_bits(), p[r][c].to_bits(), "k={k} ({r}, {c})");
                    assert_eq!(o[r][c].to_bits(), dot(&x[r], &w[c]).to_bits());
                }
            }
        }
    }

    #[test]
    fn eight_column_blocks_equal_single_products_on_every_path() {
        for k in [8usize, 64, 128] {
            let x: Vec<Vec<f32>> = (0..2)
                .map(|r| {
                    (0..k)
                        .map(|i| ((i * 17 + r * 5) as f32 * 0.53).sin() * 2.0)
                        .collect()
                })
                .collect();
            let w: Vec<Vec<f32>> = (0..8)
                .map(|c| {
                    (0..k)
                        .map(|i| ((i * 3 + c * 13) as f32 * 0.41).cos())
                        .collect()
                })
                .collect();
            let ws: [&[f32]; 8] = std::array::from_fn(|c| w[c].as_slice());
            let mut two = [[0f32; 8]; 2];
            dot_block_8([&x[0], &x[1]], ws, &mut two);
            let mut one = [[0f32; 8]; 1];
            dot_block_8([&x[1]], ws, &mut one);
            let mut p = [[0f32; 8]; 2];
            dot_block_body([&x[0], &x[1]], ws, &mut p);
            for c in 0..8 {
                for r in 0..2 {
                    assert_eq!(two[r][c].to_bits(), p[r][c].to_bits(), "k={k} ({r}, {c})");
                }
                assert_eq!(one[0][c].to_bits(), p[1][c].to_bits(), "k={k} (alone, {c})");
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                let mut z = [[0f32; 8]; 2];
                // SAFETY: AVX-512F was detected; every slice has length k, a multiple of 8.
                unsafe { dot_8_avx512([&x[0], &x[1]], ws, &mut z) };
                for r in 0..2 {
                    for c in 0..8 {
                        assert_eq!(z[r][c].to_bits(), p[r][c].to_bits(), "avx512 k={k}");
                    }
                }
            }
        }
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
            let mut o = [[0f32; 1]; 1];
            dot_block_body([&x], [&w], &mut o);
            assert_eq!(o[0][0].to_bits(), dot(&x, &w).to_bits(), "f32 k={k}");
            dot_block_body([&x], [&wb], &mut o);
            assert_eq!(o[0][0].to_bits(), dot(&x, &wb).to_bits(), "bf16 k={k}");
            dot_block_body([&x], [&wh], &mut o);
            assert_eq!(o[0][0].to_bits(), dot(&x, &wh).to_bits(), "f16 k={k}");
        }
    }

    #[test]
    fn bf16_weights_convert_exactly() {
        let x = vec![1.0f32; 40];
        let w: Vec<bf16> = (0..40).map(|i| bf16::from_f32(i as f32)).collect();
        assert_eq!(dot(&x, &w), (0..40).sum::<i32>() as f32);
    }
}
