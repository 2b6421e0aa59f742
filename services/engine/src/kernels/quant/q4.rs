//! The 4-bit family: GGUF `Q4_0`, `Q4_1` and `Q4_K` weights, repacked with the same numbers.
//!
//! A weight is `d * q + m` with `q` in 0..=15 and one `(d, m)` pair per block of 32 inputs:
//! - `Q4_1`: d and m are the block's f16 fields;
//! - `Q4_0`: `d * (q - 8)`, so m = -8 d (exact);
//! - `Q4_K`: sub-block j of a 256-super-block has d = d_super * sc_j and m = -dmin * m_j; both
//!   products of an f16 and a 6-bit integer, so exact in f32 (llama.cpp `dequantize_row_q4_K`).
//!
//! Layout: 8 output rows ("lanes") are interleaved so that one 32-byte load holds 4
//! consecutive inputs of each lane (llama.cpp's `block_q4_0x8` repacking idea). A block's
//! quants cover 8 lanes x 32 inputs: 4 chunks of 32 bytes, byte `c * 4 + i` of chunk `s`
//! holding lane c's input `4s + i` in its low nibble and input `16 + 4s + i` in its high
//! nibble. Scales:
//! - `F16` (Q4_0, Q4_1): after the quants, the 8 lanes' `d`, then their `m`, as f16;
//! - `K4` (Q4_K): GGUF's own compact form, per super-block of 8 blocks: the lanes' f16 `d` and
//!   `dmin`, their 6-bit `sc` and `m` per block (one byte each), then the 8 blocks' quants
//!   (4.625 bits a weight, as Q4_K's 4.5); `d = d_super * sc` and `m = -(dmin * m)` are formed
//!   in f32, exactly, when the block is used.
//!
//! Definition (the portable path; every ISA path gives the same bits): for each lane and each
//! block b in order, with the activation block's scale `dx`, and `sx = dx * sum(qx)`:
//! `isum = sum(q * qx)` (exact integer), `acc = fma(d * dx, isum, acc)`, `acc = fma(m, sx, acc)`.
//! Each lane runs these scalar operations whatever the number of rows or lanes computed at
//! once, which is what makes the result batch-invariant.

use super::activation::ActRow;
use super::{ScaleKind, BLOCK, LANES};

/// Bytes of one packed block (8 lanes x 32 inputs); for `K4`, a super-block's share.
pub fn block_bytes(scale: ScaleKind) -> usize {
    match scale {
        ScaleKind::K4 => SUPER_BYTES / SUPER,
        _ => 128 + 2 * LANES * scale.bytes(),
    }
}

/// Blocks per `K4` super-block, and its bytes: d and dmin (8 f16 each), sc and m (8 blocks x
/// 8 lanes, a byte each), the quants.
const SUPER: usize = 8;
const SUPER_BYTES: usize = 32 + 2 * SUPER * LANES + SUPER * 128;

/// Where block `b`'s quants start in its group.
#[inline(always)]
pub fn quants_at(scale: ScaleKind, b: usize) -> usize {
    match scale {
        ScaleKind::K4 => (b / SUPER) * SUPER_BYTES + 32 + 2 * SUPER * LANES + (b % SUPER) * 128,
        _ => b * block_bytes(scale),
    }
}

/// Lane `c`'s `(d, m)` of block `b` of a group.
#[inline(always)]
pub fn scales(blocks: &[u8], scale: ScaleKind, b: usize, c: usize) -> (f32, f32) {
    match scale {
        ScaleKind::K4 => {
            let base = (b / SUPER) * SUPER_BYTES;
            let h = |at: usize| half::f16::from_le_bytes([blocks[at], blocks[at + 1]]).to_f32();
            let (d, dmin) = (h(base + 2 * c), h(base + 16 + 2 * c));
            let j = b % SUPER;
            let sc = blocks[base + 32 + j * LANES + c] as f32;
            let m = blocks[base + 32 + SUPER * LANES + j * LANES + c] as f32;
            (d * sc, -(dmin * m))
        }
        _ => {
            let at = b * block_bytes(scale) + 128;
            (
                scale.read(&blocks[at..], c),
                scale.read(&blocks[at + LANES * scale.bytes()..], c),
            )
        }
    }
}

/// `K4` only: lanes' super-block scales `sup` ([d, dmin] per super-block) and the 6-bit
/// integers behind each block's `d` and `m` (exact quotients: `d` and `m` are exact products).
fn push_k4_header(
    sup: [&[f32]; LANES],
    d: [&[f32]; LANES],
    m: [&[f32]; LANES],
    sb: usize,
    out: &mut Vec<u8>,
) {
    for which in 0..2 {
        for s in sup.iter() {
            out.extend_from_slice(&half::f16::from_f32(s[2 * sb + which]).to_le_bytes());
        }
    }
    for (which, v) in [d, m].iter().enumerate() {
        for j in 0..SUPER {
            for (c, row) in v.iter().enumerate() {
                let unit = sup[c][2 * sb + which];
                let x = if which == 0 {
                    row[sb * SUPER + j]
                } else {
                    -row[sb * SUPER + j]
                };
                let int = if unit == 0.0 { 0.0 } else { x / unit };
                debug_assert!(int.fract() == 0.0 && (0.0..64.0).contains(&int), "{int}");
                out.push(int as u8);
            }
        }
    }
}

/// Packs lanes `q` (8 rows of `k` values in 0..=15), `d` and `m` (8 rows of `k / 32`) into
/// blocks appended to `out`.
pub fn pack_group(
    q: [&[u8]; LANES],
    d: [&[f32]; LANES],
    m: [&[f32]; LANES],
    sup: [&[f32]; LANES],
    scale: ScaleKind,
    out: &mut Vec<u8>,
) {
    let nb = d[0].len();
    for b in 0..nb {
        if scale == ScaleKind::K4 && b % SUPER == 0 {
            push_k4_header(sup, d, m, b / SUPER, out);
        }
        for s in 0..4 {
            for qc in q.iter() {
                for i in 0..4 {
                    let lo = qc[b * BLOCK + 4 * s + i];
                    let hi = qc[b * BLOCK + 16 + 4 * s + i];
                    debug_assert!(lo < 16 && hi < 16);
                    out.push(lo | (hi << 4));
                }
            }
        }
        if scale != ScaleKind::K4 {
            for v in [&d, &m] {
                for row in v.iter() {
                    scale.push(row[b], out);
                }
            }
        }
    }
}

/// Lane `c`'s weights of block `b` of a group, as f32 (`d * q + m`, fused).
pub fn dequantize_lane(blocks: &[u8], b: usize, c: usize, scale: ScaleKind, out: &mut [f32]) {
    let (d, m) = scales(blocks, scale, b, c);
    let blk = &blocks[quants_at(scale, b)..];
    for s in 0..4 {
        for i in 0..4 {
            let byte = blk[s * 32 + c * 4 + i];
            out[4 * s + i] = d.mul_add((byte & 15) as f32, m);
            out[16 + 4 * s + i] = d.mul_add((byte >> 4) as f32, m);
        }
    }
}

/// Portable definition: `R` rows by the 8 lanes of one group of `nb` packed blocks.
pub fn group_portable<const R: usize>(
    blocks: &[u8],
    nb: usize,
    scale: ScaleKind,
    xs: &[ActRow; R],
    out: &mut [[f32; LANES]; R],
) {
    let mut acc = [[0f32; LANES]; R];
    for b in 0..nb {
        let blk = &blocks[quants_at(scale, b)..];
        for (r, x) in xs.iter().enumerate() {
            let qx = &x.q[b * BLOCK..(b + 1) * BLOCK];
            for c in 0..LANES {
                let mut isum = 0i32;
                for s in 0..4 {
                    for i in 0..4 {
                        let byte = blk[s * 32 + c * 4 + i];
                        isum += (byte & 15) as i32 * qx[4 * s + i] as i32;
                        isum += (byte >> 4) as i32 * qx[16 + 4 * s + i] as i32;
                    }
                }
                let (d, m) = scales(blocks, scale, b, c);
                acc[r][c] = (d * x.d[b]).mul_add(isum as f32, acc[r][c]);
                acc[r][c] = m.mul_add(x.s[b], acc[r][c]);
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
    use super::{block_bytes, quants_at, SUPER, SUPER_BYTES};

    /// The 8 lanes' `(d, m)` of block `b` (for `K4`, formed from the super-block's f16 scales
    /// and the block's 6-bit integers: exact products, as the portable path forms them).
    #[inline(always)]
    unsafe fn load_dm(blocks: *const u8, scale: ScaleKind, b: usize) -> (__m256, __m256) {
        match scale {
            ScaleKind::K4 => {
                let base = blocks.add((b / SUPER) * SUPER_BYTES);
                let d = load_scales(base, ScaleKind::F16);
                let dmin = load_scales(base.add(16), ScaleKind::F16);
                let j = b % SUPER;
                let ints = |p: *const u8| {
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
                };
                let sc = ints(base.add(32 + j * LANES));
                let m = ints(base.add(32 + SUPER * LANES + j * LANES));
                let neg = _mm256_set1_ps(-0.0);
                (
                    _mm256_mul_ps(d, sc),
                    _mm256_xor_ps(_mm256_mul_ps(dmin, m), neg),
                )
            }
            _ => {
                let at = blocks.add(b * block_bytes(scale) + 128);
                (
                    load_scales(at, scale),
                    load_scales(at.add(LANES * scale.bytes()), scale),
                )
            }
        }
    }

    #[inline(always)]
    unsafe fn bcast4(q: &[i8], at: usize) -> __m256i {
        _mm256_set1_epi32((q.as_ptr().add(at) as *const i32).read_unaligned())
    }

    #[inline(always)]
    unsafe fn finish<const R: usize>(
        blocks: *const u8,
        scale: ScaleKind,
        b: usize,
        xs: &[ActRow; R],
        isum: &[__m256i; R],
        acc: &mut [__m256; R],
    ) {
        let (d, m) = load_dm(blocks, scale, b);
        for r in 0..R {
            let t = _mm256_mul_ps(d, _mm256_set1_ps(xs[r].d[b]));
            acc[r] = _mm256_fmadd_ps(t, _mm256_cvtepi32_ps(isum[r]), acc[r]);
            acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[r].s[b]), acc[r]);
        }
    }

    /// AVX2: `maddubs` products summed in 16 bits across the block (at most 8 x 2 x 15 x 127
    /// = 30,480, clear of saturation), widened once per block.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `blocks` must hold `nb` packed blocks; rows hold `nb`
    /// activation blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2<const R: usize>(
        blocks: &[u8],
        nb: usize,
        scale: ScaleKind,
        xs: &[ActRow; R],
        out: &mut [[f32; LANES]; R],
    ) {
        let bb = block_bytes(scale);
        assert!(blocks.len() >= nb * bb);
        let mask = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let blk = blocks.as_ptr().add(quants_at(scale, b));
            let mut s16 = [_mm256_setzero_si256(); R];
            for s in 0..4 {
                let w = _mm256_loadu_si256(blk.add(32 * s) as *const __m256i);
                let lo = _mm256_and_si256(w, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                for r in 0..R {
                    let base = b * BLOCK + 4 * s;
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast4(xs[r].q, base)),
                        _mm256_maddubs_epi16(hi, bcast4(xs[r].q, base + 16)),
                    );
                    s16[r] = _mm256_add_epi16(s16[r], p);
                }
            }
            let mut isum = [_mm256_setzero_si256(); R];
            for r in 0..R {
                isum[r] = _mm256_madd_epi16(s16[r], ones);
            }
            finish(blocks.as_ptr(), scale, b, xs, &isum, &mut acc);
        }
        for r in 0..R {
            _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// AVX-512 VNNI over two groups at once on 512-bit registers (16 lanes: `pair[0]`'s then
    /// `pair[1]`'s; a lone group is passed twice): one load serves 16 lanes, each `vpdpbusd`
    /// does 64 multiply-adds, and the f32 finish costs the same instructions for twice the
    /// lanes. Each lane runs [`super::group_portable`]'s sequence, so the bits are the same.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VNNI, FMA and F16C; each group must hold `nb`
    /// packed blocks and each row `nb` activation blocks.
    #[target_feature(enable = "avx512vnni,avx512bw,avx512vl,avx512f,avx2,fma,f16c")]
    pub unsafe fn group_pair_vnni<const R: usize>(
        pair: [&[u8]; 2],
        nb: usize,
        scale: ScaleKind,
        xs: &[ActRow; R],
        out: &mut [[f32; 2 * LANES]; R],
    ) {
        let bb = block_bytes(scale);
        assert!(pair.iter().all(|g| g.len() >= nb * bb));
        assert!(xs
            .iter()
            .all(|x| x.q.len() >= nb * BLOCK && x.d.len() >= nb));
        let mask = _mm512_set1_epi8(15);
        let base = [pair[0].as_ptr(), pair[1].as_ptr()];
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let (q0, q1) = (
                base[0].add(quants_at(scale, b)),
                base[1].add(quants_at(scale, b)),
            );
            for q in [q0, q1] {
                prefetch_block(q.wrapping_add(VNNI_PREFETCH_BLOCKS * bb), bb);
            }
            let mut lo_sum = [_mm512_setzero_si512(); R];
            let mut hi_sum = [_mm512_setzero_si512(); R];
            for s in 0..4 {
                let w = load_pair(q0.add(32 * s), q1.add(32 * s));
                let lo = _mm512_and_si512(w, mask);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask);
                for r in 0..R {
                    let at = xs[r].q.as_ptr().add(b * BLOCK + 4 * s) as *const i32;
                    let (xlo, xhi) = (at.read_unaligned(), at.add(4).read_unaligned());
                    lo_sum[r] = _mm512_dpbusd_epi32(lo_sum[r], lo, _mm512_set1_epi32(xlo));
                    hi_sum[r] = _mm512_dpbusd_epi32(hi_sum[r], hi, _mm512_set1_epi32(xhi));
                }
            }
            let (d0, m0) = load_dm(base[0], scale, b);
            let (d1, m1) = load_dm(base[1], scale, b);
            let (d, m) = (wide(d0, d1), wide(m0, m1));
            for r in 0..R {
                let isum = _mm512_add_epi32(lo_sum[r], hi_sum[r]);
                let t = _mm512_mul_ps(d, _mm512_set1_ps(*xs[r].d.get_unchecked(b)));
                acc[r] = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(isum), acc[r]);
                let sx = _mm512_set1_ps(*xs[r].s.get_unchecked(b));
                acc[r] = _mm512_fmadd_ps(m, sx, acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }

    /// Two groups' block as a tile's B operand: 8 rows of 64 bytes, row `s` (inputs 4s..4s+3
    /// of each lane, the first group's 8 lanes then the second's) the low nibbles of chunk
    /// `s`, row `4 + s` (inputs 16+4s..) its high nibbles.
    #[repr(C, align(64))]
    struct Unpacked([u8; 512]);

    /// AMX over two groups at once (16 lanes: `pair[0]`'s then `pair[1]`'s; a lone group is
    /// passed twice): each block's int32 sums for `R` rows (rows `r0..r0 + R` of `acts`) come
    /// from one tile product (`tdpbsud`: signed activations, unsigned nibbles), then the
    /// family's f32 finish on 16 lanes at a time, each lane running [`super::group_portable`]'s sequence.
    /// Blocks are unpacked a few blocks before their tile product (a tile load of memory still
    /// in the store buffer waits for those stores to retire), the next block's tile product is
    /// issued before this block's finish, and the weights further ahead are prefetched.
    ///
    /// # Safety
    /// [`amx::available`] must be true and tiles configured on this thread for `R` rows,
    /// 32-byte products and 16 lanes; each group must hold `nb` packed blocks and `acts` rows
    /// `r0..r0 + R`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub unsafe fn group_pair_amx<const R: usize>(
        pair: [&[u8]; 2],
        nb: usize,
        scale: ScaleKind,
        acts: &QActs,
        r0: usize,
        out: &mut [[f32; 2 * LANES]; R],
    ) {
        let bb = block_bytes(scale);
        assert!(pair.iter().all(|g| g.len() >= nb * bb));
        assert!(acts.m >= r0 + R && acts.k == nb * BLOCK);
        let mask = _mm256_set1_epi8(15);
        let a0 = acts.q.as_ptr().add(r0 * acts.k);
        let (xd, xs) = (acts.d.as_ptr().add(r0 * nb), acts.s.as_ptr().add(r0 * nb));
        const RING: usize = 8;
        const UNPACK_AHEAD: usize = 4;
        let mut unpacked: [Unpacked; RING] = std::array::from_fn(|_| Unpacked([0; 512]));
        let mut sums = [Sums::new(), Sums::new()];
        let base = [pair[0].as_ptr(), pair[1].as_ptr()];
        macro_rules! unpack {
            ($b:expr) => {{
                let b: usize = $b;
                let up = unpacked[b % RING].0.as_mut_ptr();
                for (half, g) in base.iter().enumerate() {
                    let blk = g.add(quants_at(scale, b));
                    prefetch_block(blk.wrapping_add(amx::PREFETCH_BLOCKS * bb), bb);
                    let up = up.add(32 * half);
                    for s in 0..4 {
                        let w = _mm256_loadu_si256(blk.add(32 * s) as *const __m256i);
                        let lo = _mm256_and_si256(w, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
                        _mm256_store_si256(up.add(64 * s) as *mut __m256i, lo);
                        _mm256_store_si256(up.add(64 * (s + 4)) as *mut __m256i, hi);
                    }
                }
            }};
        }
        macro_rules! issue {
            ($b:expr) => {{
                let b: usize = $b;
                let (a, up) = (a0.add(b * BLOCK), unpacked[b % RING].0.as_ptr());
                amx::product(b, Weights::Unsigned, a, acts.k, up, 64, &mut sums[b & 1]);
            }};
        }
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..UNPACK_AHEAD.min(nb) {
            unpack!(b);
        }
        issue!(0);
        for b in 0..nb {
            if b + UNPACK_AHEAD < nb {
                unpack!(b + UNPACK_AHEAD);
            }
            if b + 1 < nb {
                issue!(b + 1);
            }
            let (d0, m0) = load_dm(base[0], scale, b);
            let (d1, m1) = load_dm(base[1], scale, b);
            let (d, m) = (wide(d0, d1), wide(m0, m1));
            let isums = &sums[b & 1].0;
            for r in 0..R {
                let isum = _mm512_load_si512(isums[r].as_ptr() as *const _);
                let t = _mm512_mul_ps(d, _mm512_set1_ps(*xd.add(r * nb + b)));
                acc[r] = _mm512_fmadd_ps(t, _mm512_cvtepi32_ps(isum), acc[r]);
                acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(*xs.add(r * nb + b)), acc[r]);
            }
        }
        for r in 0..R {
            _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]);
        }
    }
}
