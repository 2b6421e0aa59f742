//! The 8-bit family: GGUF `Q8_0`, `Q5_0` and `Q6_K` weights (and `--dtype q8_0`), repacked with
//! the same numbers.
//!
//! A weight is `d * q` with `q` a signed integer and one scale `d` per sub-block of
//! `32 / sub` inputs:
//! - `Q8_0`: q in -128..=127, the block's f16 d, one sub-block;
//! - `Q5_0`: q = (5-bit value) - 16, the block's f16 d, one sub-block;
//! - `Q6_K`: q = (6-bit value) - 32, sub-blocks of 16 with d = d_super * sc_j: an f16 times an
//!   int8, exact in f32 (llama.cpp `dequantize_row_q6_K`); two sub-blocks per block.
//!
//! Layout: 8 output rows ("lanes") interleaved, 4 inputs of each lane per 32 bytes (see `q4.rs`):
//! a packed block is 8 chunks of 32 bytes, byte `c * 4 + i` of chunk `s` holding lane c's input
//! `4s + i`; then, for each sub-block, the 8 lanes' scales (f16 when exact, else f32).
//!
//! Definition (the portable path; every ISA path gives the same bits): for each lane, each
//! block b in order and each of its sub-blocks h in order, with the activation block's scale
//! `dx`: `isum = sum(q * qx)` over the sub-block (exact), `acc = fma(d_h * dx, isum, acc)`.

use super::activation::ActRow;
use super::{ScaleKind, BLOCK, LANES};

/// Bytes of one packed block (8 lanes x 32 inputs) with `sub` scales per lane.
pub fn block_bytes(scale: ScaleKind, sub: usize) -> usize {
    256 + sub * LANES * scale.bytes()
}

/// Packs lanes `q` (8 rows of `k` signed values) and `d` (8 rows of `k / 32 * sub` scales).
pub fn pack_group(
    q: [&[i8]; LANES],
    d: [&[f32]; LANES],
    sub: usize,
    scale: ScaleKind,
    out: &mut Vec<u8>,
) {
    let nb = q[0].len() / BLOCK;
    for b in 0..nb {
        for s in 0..8 {
            for qc in q.iter() {
                for i in 0..4 {
                    out.push(qc[b * BLOCK + 4 * s + i] as u8);
                }
            }
        }
        for h in 0..sub {
            for row in d.iter() {
                scale.push(row[b * sub + h], out);
            }
        }
    }
}

/// Lane `c`'s weights of packed block `blk`, as f32 (`d * q`).
pub fn dequantize_lane(blk: &[u8], c: usize, sub: usize, scale: ScaleKind, out: &mut [f32]) {
    let per = BLOCK / sub;
    for e in 0..BLOCK {
        let q = blk[(e / 4) * 32 + c * 4 + e % 4] as i8;
        let d = scale.read(&blk[256 + (e / per) * LANES * scale.bytes()..], c);
        out[e] = d * q as f32;
    }
}

/// Portable definition: `R` rows by the 8 lanes of one group of `nb` packed blocks.
pub fn group_portable<const R: usize>(
    blocks: &[u8],
    nb: usize,
    sub: usize,
    scale: ScaleKind,
    xs: &[ActRow; R],
    out: &mut [[f32; LANES]; R],
) {
    let bb = block_bytes(scale, sub);
    let per = BLOCK / sub;
    let mut acc = [[0f32; LANES]; R];
    for b in 0..nb {
        let blk = &blocks[b * bb..(b + 1) * bb];
        for (r, x) in xs.iter().enumerate() {
            let qx = &x.q[b * BLOCK..(b + 1) * BLOCK];
            for c in 0..LANES {
                for h in 0..sub {
                    let mut isum = 0i32;
                    for e in h * per..(h + 1) * per {
                        let q = blk[(e / 4) * 32 + c * 4 + e % 4] as i8;
                        isum += q as i32 * qx[e] as i32;
                    }
                    let d = scale.read(&blk[256 + h * LANES * scale.bytes()..], c);
                    acc[r][c] = (d * x.d[b]).mul_add(isum as f32, acc[r][c]);
                }
            }
        }
    }
    *out = acc;
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    use super::super::activation::{ActRow, QActs};
    use super::super::amx::{self, Sums, Weights};
    use super::super::x86::{load_pair, load_scales, prefetch_block, wide, VNNI_PREFETCH_BLOCKS};
    use super::super::{ScaleKind, BLOCK, LANES};
    use super::block_bytes;

    #[inline(always)]
    unsafe fn bcast4(q: &[i8], at: usize) -> __m256i {
        _mm256_set1_epi32((q.as_ptr().add(at) as *const i32).read_unaligned())
    }

    /// Signed x signed through the unsigned x signed instructions: |w| times x with w's sign
    /// (`vpsignb`). |w| <= 128 and |x| <= 127 keep `maddubs` pairs under 32,767.
    #[inline(always)]
    unsafe fn run<const R: usize>(
        blocks: &[u8],
        nb: usize,
        sub: usize,
        scale: ScaleKind,
        xs: &[ActRow; R],
        out: &mut [[f32; LANES]; R],
        dot: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let bb = block_bytes(scale, sub);
        assert!(blocks.len() >= nb * bb);
        let chunks = 8 / sub;
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = blocks.as_ptr().add(b * bb);
            for h in 0..sub {
                // Even and odd chunks in two accumulators: two short dependency chains.
                let mut even = [_mm256_setzero_si256(); R];
                let mut odd = [_mm256_setzero_si256(); R];
                for s in (h * chunks..(h + 1) * chunks).step_by(2) {
                    let w0 = _mm256_loadu_si256(blk.add(32 * s) as *const __m256i);
                    let w1 = _mm256_loadu_si256(blk.add(32 * s + 32) as *const __m256i);
                    let (a0, a1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
                    for r in 0..R {
                        let x0 = _mm256_sign_epi8(bcast4(xs[r].q, b * BLOCK + 4 * s), w0);
                        let x1 = _mm256_sign_epi8(bcast4(xs[r].q, b * BLOCK + 4 * s + 4), w1);
                        even[r] = dot(even[r], a0, x0);
                        odd[r] = dot(odd[r], a1, x1);
                    }
                }
                let mut isum = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    isum[r] = _mm256_add_epi32(even[r], odd[r]);
                }
                let d = load_scales(blk.add(256 + h * LANES * scale.bytes()), scale);
                for r in 0..R {
                    let t = _mm256_mul_ps(d, _mm256_set1_ps(xs[r].d[b]));
                    acc[r] = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(isum[r]), acc[r]);
                }
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// AVX2 path.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `blocks` must hold `nb` packed blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2<const R: usize>(
        blocks: &[u8],
        nb: usize,
        sub: usize,
        scale: ScaleKind,
        xs: &[ActRow; R],
        out: &mut [[f32; LANES]; R],
    ) {
        let ones = _mm256_set1_epi16(1);
        run::<R>(blocks, nb, sub, scale, xs, out, |acc, a, b| {
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones))
        })
    }

    /// AVX-512 VNNI over two groups at once on 512-bit registers (16 lanes: `pair[0]`'s then
    /// `pair[1]`'s; a lone group is passed twice). Signed weights through the unsigned x signed
    /// `vpdpbusd`, each lane running the family's sequence:
    /// - one scale per block (`sub == 1`: Q8_0, Q5_0): the weights offset by 128 (`w ^ 0x80`,
    ///   one instruction per load, shared by every row) times x, minus 128 times the block's
    ///   sum of x (precomputed with the activations). The integers are exact, so `isum` is the
    ///   same, and each `vpdpbusd` reads its x straight from memory as a broadcast;
    /// - two (Q6_K): |w| times x negated where w < 0 (512-bit registers have no `vpsignb`;
    ///   where w = 0 the product is 0 either way).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI, FMA and F16C; each group must hold `nb`
    /// packed blocks with `sub` scales each, and each row `nb` activation blocks.
    #[target_feature(enable = "avx512vnni,avx512bw,avx512vl,avx512f,avx2,fma,f16c")]
    pub unsafe fn group_pair_vnni<const R: usize>(
        pair: [&[u8]; 2],
        nb: usize,
        sub: usize,
        scale: ScaleKind,
        xs: &[ActRow; R],
        out: &mut [[f32; 2 * LANES]; R],
    ) {
        let bb = block_bytes(scale, sub);
        assert!(pair.iter().all(|g| g.len() >= nb * bb));
        assert!(xs
            .iter()
            .all(|x| x.q.len() >= nb * BLOCK && x.d.len() >= nb && x.sum.len() >= nb));
        if sub == 1 {
            return offset_pair_vnni(pair, nb, scale, xs, out);
        }
        let chunks = 8 / sub;
        let zero = _mm512_setzero_si512();
        let base = [pair[0].as_ptr(), pair[1].as_ptr()];
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let (p0, p1) = (base[0].add(b * bb), base[1].add(b * bb));
            for p in [p0, p1] {
                prefetch_block(p.wrapping_add(VNNI_PREFETCH_BLOCKS * bb), bb);
            }
            for h in 0..sub {
                let mut even = [_mm512_setzero_si512(); R];
                let mut odd = [_mm512_setzero_si512(); R];
                for s in (h * chunks..(h + 1) * chunks).step_by(2) {
                    let w0 = load_pair(p0.add(32 * s), p1.add(32 * s));
                    let w1 = load_pair(p0.add(32 * s + 32), p1.add(32 * s + 32));
                    let (a0, a1) = (_mm512_abs_epi8(w0), _mm512_abs_epi8(w1));
                    let (n0, n1) = (_mm512_movepi8_mask(w0), _mm512_movepi8_mask(w1));
                    for r in 0..R {
                        let at = xs[r].q.as_ptr().add(b * BLOCK + 4 * s) as *const i32;
                        let x0 = _mm512_set1_epi32(at.read_unaligned());
                        let x1 = _mm512_set1_epi32(at.add(1).read_unaligned());
                        let x0 = _mm512_mask_sub_epi8(x0, n0, zero, x0);
                        let x1 = _mm512_mask_sub_epi8(x1, n1, zero, x1);
                        even[r] = _mm512_dpbusd_epi32(even[r], a0, x0);
                        odd[r] = _mm512_dpbusd_epi32(odd[r], a1, x1);
                    }
                }
                let at = 256 + h * LANES * scale.bytes();
                let d = wide(
                    load_scales(p0.add(at), scale),
                    load_scales(p1.add(at), scale),
                );
                for r in 0..R {
                    let isum = _mm512_add_epi32(even[r], odd[r]);
                    let t = _mm512_mul_ps(d, _mm512_set1_ps(*xs[r].d.get_unchecked(b)));
                    acc[r] = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(isum), acc[r]);
                }
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// [`group_pair_vnni`] for one scale per block: `isum = sum((w + 128) * x) - 128 * sum(x)`,
    /// with `w + 128 = w ^ 0x80` as an unsigned byte. Both sums are exact in 32 bits (at most
    /// 32 x 255 x 127), so `isum` is the signed product's.
    #[target_feature(enable = "avx512vnni,avx512bw,avx512vl,avx512f,avx2,fma,f16c")]
    unsafe fn offset_pair_vnni<const R: usize>(
        pair: [&[u8]; 2],
        nb: usize,
        scale: ScaleKind,
        xs: &[ActRow; R],
        out: &mut [[f32; 2 * LANES]; R],
    ) {
        let bb = block_bytes(scale, 1);
        let flip = _mm512_set1_epi8(-128);
        let base = [pair[0].as_ptr(), pair[1].as_ptr()];
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let (p0, p1) = (base[0].add(b * bb), base[1].add(b * bb));
            for p in [p0, p1] {
                prefetch_block(p.wrapping_add(VNNI_PREFETCH_BLOCKS * bb), bb);
            }
            let mut even = [_mm512_setzero_si512(); R];
            let mut odd = [_mm512_setzero_si512(); R];
            for s in (0..8).step_by(2) {
                let w0 = _mm512_xor_si512(load_pair(p0.add(32 * s), p1.add(32 * s)), flip);
                let w1 =
                    _mm512_xor_si512(load_pair(p0.add(32 * s + 32), p1.add(32 * s + 32)), flip);
                for r in 0..R {
                    let at = xs[r].q.as_ptr().add(b * BLOCK + 4 * s) as *const i32;
                    let x0 = _mm512_set1_epi32(at.read_unaligned());
                    let x1 = _mm512_set1_epi32(at.add(1).read_unaligned());
                    even[r] = _mm512_dpbusd_epi32(even[r], w0, x0);
                    odd[r] = _mm512_dpbusd_epi32(odd[r], w1, x1);
                }
            }
            let d = wide(
                load_scales(p0.add(256), scale),
                load_scales(p1.add(256), scale),
            );
            for r in 0..R {
                let offset = _mm512_set1_epi32(128 * *xs[r].sum.get_unchecked(b));
                let isum = _mm512_sub_epi32(_mm512_add_epi32(even[r], odd[r]), offset);
                let t = _mm512_mul_ps(d, _mm512_set1_ps(*xs[r].d.get_unchecked(b)));
                acc[r] = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(isum), acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// AMX: each sub-block's int32 sums for `R` rows (rows `r0..r0 + R` of `acts`) by the 8
    /// lanes come from one tile product (`tdpbssd`), B read straight from the packed block (its
    /// layout is the tile's), then the family's f32 finish. The next sub-block's tile product
    /// is issued before this one's finish; weights a few blocks ahead are prefetched.
    ///
    /// # Safety
    /// [`amx::available`] must be true and tiles configured on this thread for `R` rows and
    /// `32 / SUB`-byte products; `blocks` must hold `nb` packed blocks with `SUB` scales each,
    /// and `acts` rows `r0..r0 + R`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub unsafe fn group_amx<const R: usize, const SUB: usize>(
        blocks: &[u8],
        nb: usize,
        scale: ScaleKind,
        acts: &QActs,
        r0: usize,
        out: &mut [[f32; LANES]; R],
    ) {
        let bb = block_bytes(scale, SUB);
        assert!(blocks.len() >= nb * bb && acts.m >= r0 + R && acts.k == nb * BLOCK);
        let kb = BLOCK / SUB;
        let a0 = acts.q.as_ptr().add(r0 * acts.k);
        let xd = acts.d.as_ptr().add(r0 * nb);
        let base = blocks.as_ptr();
        let mut sums = [Sums::new(), Sums::new()];
        // Sub-block h of block b: its activation bytes, and its kb / 4 chunks of 32 bytes.
        macro_rules! issue {
            ($j:expr) => {{
                let j: usize = $j;
                let (b, h) = (j / SUB, j % SUB);
                let blk = base.add(b * bb);
                if h == 0 {
                    prefetch_block(blk.wrapping_add(amx::PREFETCH_BLOCKS * bb), bb);
                }
                let a = a0.add(b * BLOCK + h * kb);
                let w = blk.add(h * (kb / 4) * 32);
                amx::product(j, Weights::Signed, a, acts.k, w, 32, &mut sums[j & 1]);
            }};
        }
        let mut acc = [_mm256_setzero_ps(); R];
        issue!(0);
        for j in 0..nb * SUB {
            if j + 1 < nb * SUB {
                issue!(j + 1);
            }
            let (b, h) = (j / SUB, j % SUB);
            let d = load_scales(base.add(b * bb + 256 + h * LANES * scale.bytes()), scale);
            let isums = &sums[j & 1].0;
            for r in 0..R {
                let isum = _mm256_load_si256(isums[r].as_ptr() as *const __m256i);
                let t = _mm256_mul_ps(d, _mm256_set1_ps(*xd.add(r * nb + b)));
                acc[r] = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(isum), acc[r]);
            }
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}
