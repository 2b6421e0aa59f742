//! Tree attention on the CPU, batch-invariant by construction.
//!
//! Invariant: a query attends to exactly the slots in its visibility list, in that order: the
//! committed prefix `0..prefix`, then its own extra slots (its tree ancestors root-first, then
//! itself). A draft-tree node whose ancestors are the tokens a sequential decoder would have
//! produced therefore computes the very same scores, softmax and weighted sum, bit for bit, as
//! that decoder; masked slots are skipped, not multiplied by zero. This is the tree attention
//! of SpecInfer (Miao et al., 2023) and EAGLE (Li et al., 2024) without a dense mask.

use super::dot::{dot, dot_block, dot_block_8, wide};
use super::softmax::softmax;

/// Which cache slots each new query may see.
#[derive(Clone, Debug, Default)]
pub struct Visibility {
    /// Every query sees slots `0..prefix`.
    pub prefix: usize,
    /// Per query, the further slots it sees, in order (its ancestors, then itself).
    pub extra: Vec<Vec<u32>>,
    /// The device path's dense mask over `total` slots, built once per pass and shared by every
    /// layer (uploading it per layer would synchronise the GPU each time).
    pub(crate) dense: std::sync::OnceLock<(usize, candle_core::Tensor)>,
}

impl PartialEq for Visibility {
    fn eq(&self, o: &Self) -> bool {
        self.prefix == o.prefix && self.extra == o.extra
    }
}

impl Eq for Visibility {}

impl Visibility {
    /// Plain causal attention for `m` new tokens written at slots `start..start + m`.
    pub fn causal(start: usize, m: usize) -> Self {
        Visibility {
            dense: Default::default(),
            prefix: start,
            extra: (0..m)
                .map(|i| (start as u32..=(start + i) as u32).collect())
                .collect(),
        }
    }

    /// Tree attention for `parents.len()` new tokens written at `start..`: `parents[i]` is the
    /// index (among the new tokens) of node i's parent, or -1 when it hangs off the prefix.
    /// Parents must precede their children.
    pub fn tree(start: usize, parents: &[i32]) -> Self {
        let mut extra: Vec<Vec<u32>> = Vec::with_capacity(parents.len());
        for (i, &p) in parents.iter().enumerate() {
            let mut v = if p >= 0 {
                assert!((p as usize) < i, "tree parents must precede children");
                extra[p as usize].clone()
            } else {
                Vec::new()
            };
            v.push((start + i) as u32);
            extra.push(v);
        }
        Visibility {
            dense: Default::default(),
            prefix: start,
            extra,
        }
    }

    pub fn len(&self) -> usize {
        self.extra.len()
    }

    pub fn is_empty(&self) -> bool {
        self.extra.is_empty()
    }
}

pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// One task's share of attention: some consecutive rows of one sequence and the query heads of
/// one KV head (grouped-query attention), over their visible slots.
struct Block<'a> {
    /// The query vectors, row by row: row j's head h is `qs[j * group + h]`.
    qs: &'a [&'a [f32]],
    group: usize,
    hd: usize,
    kv_stride: usize,
    /// Offset of this KV head in a cache row.
    g_off: usize,
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    prefix: usize,
    /// Per row, its further slots (`Visibility::extra`).
    extra: &'a [&'a [u32]],
    scale: f32,
}

/// Scratch a task reuses: the scores of each query vector, end to end, and where each starts.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    off: Vec<usize>,
    inv: Vec<f32>,
}

/// Scores, softmax and weighted sum of values for every query vector of `b`, into `out`
/// (`qs.len()` vectors of `hd`). Each query vector's arithmetic is exactly that of attending
/// alone: its scores are `dot`s, its softmax and weighted sum run in its slot order. The rows
/// share the key and value rows of the slots they all see (the committed prefix and their
/// common ancestors, or the common part of a prompt chunk), which are read once for all.
#[inline(always)]
fn block_body(b: &Block<'_>, out: &mut [f32], s: &mut Scratch) {
    let (hd, group) = (b.hd, b.group);
    let nq = b.qs.len();
    let rows = b.extra.len();
    debug_assert_eq!(nq, rows * group);
    // Slots every row sees, in the same order: the prefix, then their common first extras.
    let first = b.extra[0];
    let common = b.extra[1..].iter().fold(first.len(), |n, e| {
        n.min(e.iter().zip(first).take_while(|(a, b)| a == b).count())
    });
    let shared = b.prefix + common;
    let slot = |i: usize| {
        if i < b.prefix {
            i
        } else {
            first[i - b.prefix] as usize
        }
    };
    let row_len = |j: usize| b.prefix + b.extra[j].len();
    s.off.clear();
    let mut total = 0;
    for q in 0..nq {
        s.off.push(total);
        total += row_len(q / group);
    }
    s.scores.clear();
    s.scores.resize(total, 0.0);
    let key = |sl: usize| &b.k_cache[sl * b.kv_stride + b.g_off..sl * b.kv_stride + b.g_off + hd];
    let value = |sl: usize| &b.v_cache[sl * b.kv_stride + b.g_off..sl * b.kv_stride + b.g_off + hd];
    // The shared slots: eight keys at a time against two query vectors (two blocks of 2 x 4)
    // or one (1 x 8), eight sums per block so that their lane reductions run as one; the same
    // bits as one `dot` each.
    let (scores, off) = (&mut s.scores, &s.off);
    let wide = wide();
    let mut i = 0;
    while i + 8 <= shared {
        let ks: [&[f32]; 8] = std::array::from_fn(|c| key(slot(i + c)));
        let mut q = 0;
        while q + 2 <= nq {
            if wide {
                let mut o = [[0f32; 8]; 2];
                dot_block_8([b.qs[q], b.qs[q + 1]], ks, &mut o);
                for (r, row) in o.iter().enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        scores[off[q + r] + i + c] = v * b.scale;
                    }
                }
            } else {
                for half in 0..2 {
                    let mut o = [[0f32; 4]; 2];
                    let k4: [&[f32]; 4] = std::array::from_fn(|c| ks[4 * half + c]);
                    dot_block([b.qs[q], b.qs[q + 1]], k4, &mut o);
                    for (r, row) in o.iter().enumerate() {
                        for (c, v) in row.iter().enumerate() {
                            scores[off[q + r] + i + 4 * half + c] = v * b.scale;
                        }
                    }
                }
            }
            q += 2;
        }
        if q < nq {
            let mut o = [[0f32; 8]; 1];
            dot_block_8([b.qs[q]], ks, &mut o);
            for (c, v) in o[0].iter().enumerate() {
                scores[off[q] + i + c] = v * b.scale;
            }
        }
        i += 8;
    }
    for i in i..shared {
        let k = key(slot(i));
        for q in 0..nq {
            scores[off[q] + i] = dot(b.qs[q], k) * b.scale;
        }
    }
    // Each row's own slots.
    for j in 0..rows {
        for i in shared..row_len(j) {
            let k = key(b.extra[j][i - b.prefix] as usize);
            for q in j * group..(j + 1) * group {
                scores[off[q] + i] = dot(b.qs[q], k) * b.scale;
            }
        }
    }
    s.inv.clear();
    for q in 0..nq {
        s.inv
            .push(softmax(&mut scores[off[q]..off[q] + row_len(q / group)]));
    }
    // Weighted sums in slot order: the shared slots for every query vector at once, then each
    // row's own. Plain multiply-then-add (not `mul_add`, which is a library call without FMA
    // hardware): the order is fixed either way, which is all batch invariance needs, and
    // elementwise, so 8-lane AVX2 and scalar code give the same bits.
    out.fill(0.0);
    if hd % PV_WIDTH == 0 {
        // A few query vectors and PV_WIDTH dimensions at a time, their sums kept in registers
        // over every shared slot (the same operations, in the same order, as below).
        let step = if wide { 4 } else { 2 };
        let mut ps: [&[f32]; 4] = [&[]; 4];
        let mut q = 0;
        while q < nq {
            let t = (nq - q).min(step);
            for (j, p) in ps.iter_mut().take(t).enumerate() {
                *p = &scores[off[q + j]..off[q + j] + shared];
            }
            for d0 in (0..hd).step_by(PV_WIDTH) {
                let mut acc = [[0f32; PV_WIDTH]; 4];
                pv_tile(
                    &ps[..t],
                    b.v_cache,
                    b.kv_stride,
                    b.g_off + d0,
                    b.prefix,
                    first,
                    &mut acc[..t],
                );
                for (j, a) in acc.iter().enumerate().take(t) {
                    out[(q + j) * hd + d0..][..PV_WIDTH].copy_from_slice(a);
                }
            }
            q += t;
        }
    } else {
        for i in 0..shared {
            let v = value(slot(i));
            for (q, o) in out.chunks_exact_mut(hd).enumerate() {
                let p = scores[off[q] + i];
                for (o, vi) in o.iter_mut().zip(v) {
                    *o += p * vi;
                }
            }
        }
    }
    for j in 0..rows {
        for i in shared..row_len(j) {
            let v = value(b.extra[j][i - b.prefix] as usize);
            for q in j * group..(j + 1) * group {
                let p = scores[off[q] + i];
                for (o, vi) in out[q * hd..(q + 1) * hd].iter_mut().zip(v) {
                    *o += p * vi;
                }
            }
        }
    }
    for (o, inv) in out.chunks_exact_mut(hd).zip(&s.inv) {
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}

/// `acc[t][d] += ps[t][i] * v[slot(i)][d0 + d]` for the slots `i` of `ps` in order, `slot(i)`
/// being `i` within the prefix and `extra[i - prefix]` after it: the weighted sums of values
/// of up to four query vectors over PV_WIDTH dimensions, in registers. Elementwise, one
/// multiply and one add per term in slot order, so every path gives the same bits.
#[inline(always)]
fn pv_tile(
    ps: &[&[f32]],
    v: &[f32],
    stride: usize,
    d0: usize,
    prefix: usize,
    extra: &[u32],
    acc: &mut [[f32; PV_WIDTH]],
) {
    let n = ps[0].len();
    assert!(ps.len() == acc.len() && ps.len() <= 4 && ps.iter().all(|p| p.len() == n));
    assert!(n <= prefix + extra.len());
    let last = extra[..n.saturating_sub(prefix)]
        .iter()
        .map(|&s| s as usize)
        .chain((n.min(prefix) > 0).then(|| n.min(prefix) - 1))
        .max();
    if let Some(last) = last {
        assert!(
            last * stride + d0 + PV_WIDTH <= v.len(),
            "attention: slot out of the cache"
        );
    }
    let slot = |i: usize| {
        if i < prefix {
            i
        } else {
            extra[i - prefix] as usize
        }
    };
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (all three): the features were detected at run time; every row read was
        // bounds-checked above, and every score index is below n.
        if wide() {
            macro_rules! wide {
                ($t:literal) => {
                    unsafe {
                        pv_avx512::<$t>(
                            ps.try_into().unwrap(),
                            v,
                            stride,
                            d0,
                            n,
                            slot,
                            acc.try_into().unwrap(),
                        )
                    }
                };
            }
            return match ps.len() {
                1 => wide!(1),
                2 => wide!(2),
                3 => wide!(3),
                _ => wide!(4),
            };
        }
        if super::dot::avx2() {
            for (p, a) in ps.chunks(2).zip(acc.chunks_mut(2)) {
                match p.len() {
                    2 => unsafe {
                        pv_avx2::<2>(
                            p.try_into().unwrap(),
                            v,
                            stride,
                            d0,
                            n,
                            slot,
                            a.try_into().unwrap(),
                        )
                    },
                    _ => unsafe {
                        pv_avx2::<1>(
                            p.try_into().unwrap(),
                            v,
                            stride,
                            d0,
                            n,
                            slot,
                            a.try_into().unwrap(),
                        )
                    },
                }
            }
            return;
        }
    }
    pv_portable(ps, v, stride, d0, n, slot, acc)
}

/// The definition of [`pv_tile`]'s arithmetic.
fn pv_portable(
    ps: &[&[f32]],
    v: &[f32],
    stride: usize,
    d0: usize,
    n: usize,
    slot: impl Fn(usize) -> usize,
    acc: &mut [[f32; PV_WIDTH]],
) {
    for i in 0..n {
        let row = &v[slot(i) * stride + d0..][..PV_WIDTH];
        for (a, p) in acc.iter_mut().zip(ps) {
            for (a, vi) in a.iter_mut().zip(row) {
                *a += p[i] * vi;
            }
        }
    }
}

/// [`pv_tile`] with AVX2 registers: per slot, four loads of the value row, then per query
/// vector one broadcast and four multiplies and adds.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pv_avx2<const T: usize>(
    ps: &[&[f32]; T],
    v: &[f32],
    stride: usize,
    d0: usize,
    n: usize,
    slot: impl Fn(usize) -> usize,
    acc: &mut [[f32; PV_WIDTH]; T],
) {
    use std::arch::x86_64::*;
    const R: usize = PV_WIDTH / 8;
    let mut a = [[_mm256_setzero_ps(); R]; T];
    for t in 0..T {
        for (j, r) in a[t].iter_mut().enumerate() {
            *r = _mm256_loadu_ps(acc[t].as_ptr().add(8 * j));
        }
    }
    let base = v.as_ptr().add(d0);
    for i in 0..n {
        let row = base.add(slot(i) * stride);
        let w: [__m256; R] = std::array::from_fn(|j| _mm256_loadu_ps(row.add(8 * j)));
        for t in 0..T {
            let p = _mm256_broadcast_ss(ps[t].get_unchecked(i));
            for j in 0..R {
                a[t][j] = _mm256_add_ps(a[t][j], _mm256_mul_ps(p, w[j]));
            }
        }
    }
    for t in 0..T {
        for (j, r) in a[t].iter().enumerate() {
            _mm256_storeu_ps(acc[t].as_mut_ptr().add(8 * j), *r);
        }
    }
}

/// [`pv_tile`] with 512-bit registers: the same operations on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pv_avx512<const T: usize>(
    ps: &[&[f32]; T],
    v: &[f32],
    stride: usize,
    d0: usize,
    n: usize,
    slot: impl Fn(usize) -> usize,
    acc: &mut [[f32; PV_WIDTH]; T],
) {
    use std::arch::x86_64::*;
    const R: usize = PV_WIDTH / 16;
    let mut a = [[_mm512_setzero_ps(); R]; T];
    for t in 0..T {
        for (j, r) in a[t].iter_mut().enumerate() {
            *r = _mm512_loadu_ps(acc[t].as_ptr().add(16 * j));
        }
    }
    let base = v.as_ptr().add(d0);
    for i in 0..n {
        let row = base.add(slot(i) * stride);
        let w: [__m512; R] = std::array::from_fn(|j| _mm512_loadu_ps(row.add(16 * j)));
        for t in 0..T {
            let p = _mm512_set1_ps(*ps[t].get_unchecked(i));
            for j in 0..R {
                a[t][j] = _mm512_add_ps(a[t][j], _mm512_mul_ps(p, w[j]));
            }
        }
    }
    for t in 0..T {
        for (j, r) in a[t].iter().enumerate() {
            _mm512_storeu_ps(acc[t].as_mut_ptr().add(16 * j), *r);
        }
    }
}

/// [`block_body`] compiled for AVX2 (its loops vectorize 8 lanes wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2(b: &Block<'_>, out: &mut [f32], s: &mut Scratch) {
    block_body(b, out, s)
}

fn one_block(b: &Block<'_>, out: &mut [f32], s: &mut Scratch) {
    #[cfg(target_arch = "x86_64")]
    if super::dot::avx2() {
        // SAFETY: the dot kernels detected AVX2, FMA and F16C at run time.
        return unsafe { block_avx2(b, out, s) };
    }
    block_body(b, out, s)
}

/// `q` is [m, n_heads, head_dim]; the caches are [slots, n_kv_heads, head_dim] and already hold
/// the new tokens' keys and values. Returns [m, n_heads * head_dim].
pub fn attention(
    q: &[f32],
    shape: &AttnShape,
    k_cache: &[f32],
    v_cache: &[f32],
    vis: &Visibility,
) -> Vec<f32> {
    attention_batch(
        q,
        shape,
        &[Seq {
            k_cache,
            v_cache,
            vis,
        }],
    )
}

/// Dimensions of a value row whose weighted sums one pass keeps in registers.
const PV_WIDTH: usize = 32;

/// Most rows one task attends for together.
const MAX_BLOCK_ROWS: usize = 8;

/// One sequence of a batched attention call: its caches and its rows' visibility.
pub struct Seq<'a> {
    pub k_cache: &'a [f32],
    pub v_cache: &'a [f32],
    pub vis: &'a Visibility,
}

/// Attention for the rows of several sequences at once: `q` holds the rows of `seqs[0]`, then
/// those of `seqs[1]`, and so on, and each row attends only within its own sequence's cache.
/// Every (block of rows, KV head) pair is one independent task of a single parallel job, so a
/// batch of short decode rows costs one fork-join, not one per sequence; the rows of a block
/// (a draft tree's nodes, a prompt chunk's tokens) read each shared key and value row once.
pub fn attention_batch(q: &[f32], shape: &AttnShape, seqs: &[Seq<'_>]) -> Vec<f32> {
    let (nh, nkv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let m: usize = seqs.iter().map(|s| s.vis.len()).sum();
    assert_eq!(
        q.len(),
        m * nh * hd,
        "attention: q is not [m, heads, head_dim]"
    );
    let group = nh / nkv;
    let kv_stride = nkv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let threads = super::pool::threads();
    // Blocks of consecutive rows of one sequence: (sequence, its first row, rows, first row
    // overall). A block shares the reads of its common slots; enough blocks keep every thread
    // busy.
    let mut blocks: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut row0 = 0;
    for (si, seq) in seqs.iter().enumerate() {
        let rows = seq.vis.len();
        let per = rows
            .div_ceil((2 * threads).div_ceil(nkv))
            .clamp(1, MAX_BLOCK_ROWS);
        for r in (0..rows).step_by(per) {
            blocks.push((si, r, per.min(rows - r), row0 + r));
        }
        row0 += rows;
    }
    let most = blocks.iter().map(|b| b.2).max().unwrap_or(1);
    // One task per (block, KV head). The query heads of a KV head share its key and value
    // reads, so they stay together (split, each part streams the keys and values again: that
    // measured slower at long contexts, where they leave L2).
    let width = group * hd;
    let task = |t: usize| (blocks[t / nkv], t % nkv);
    let tasks = blocks.len() * nkv;
    let mut staged = vec![0f32; tasks * most * width];
    let run = |t: usize, o: &mut [f32], s: &mut Scratch| {
        let ((si, r, rows, first), g) = task(t);
        let seq = &seqs[si];
        let mut qs: [&[f32]; MAX_BLOCK_ROWS * 8] = [&[]; MAX_BLOCK_ROWS * 8];
        let mut qs_heap = Vec::new();
        let qs: &mut [&[f32]] = if rows * group <= qs.len() {
            &mut qs[..rows * group]
        } else {
            qs_heap.resize(rows * group, &[][..]);
            &mut qs_heap
        };
        for j in 0..rows {
            for h in 0..group {
                let at = ((first + j) * nh + g * group + h) * hd;
                qs[j * group + h] = &q[at..at + hd];
            }
        }
        let mut extra: [&[u32]; MAX_BLOCK_ROWS] = [&[]; MAX_BLOCK_ROWS];
        for (j, e) in extra.iter_mut().take(rows).enumerate() {
            *e = &seq.vis.extra[r + j];
        }
        let b = Block {
            qs,
            group,
            hd,
            kv_stride,
            g_off: g * hd,
            k_cache: seq.k_cache,
            v_cache: seq.v_cache,
            prefix: seq.vis.prefix,
            extra: &extra[..rows],
            scale,
        };
        one_block(&b, &mut o[..rows * width], s);
    };
    let work: usize = seqs
        .iter()
        .map(|s| s.vis.len() * nh * (s.vis.prefix + s.vis.extra.last().map_or(0, |e| e.len())))
        .sum();
    if work * hd < 1 << 16 {
        let mut s = Scratch::default();
        for (t, o) in staged.chunks_exact_mut(most * width).enumerate() {
            run(t, o, &mut s);
        }
    } else {
        super::pool::for_each_chunk(&mut staged, most * width, &|t, o| {
            run(t, o, &mut Scratch::default());
        });
    }
    // From (block, KV head, row, head) to (row, KV head, head).
    let mut out = vec![0f32; m * nh * hd];
    for (t, o) in staged.chunks_exact(most * width).enumerate() {
        let ((_, _, rows, first), g) = task(t);
        for j in 0..rows {
            let at = ((first + j) * nh + g * group) * hd;
            out[at..at + width].copy_from_slice(&o[j * width..(j + 1) * width]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_and_portable_blocks_agree_bitwise_and_equal_each_head_alone() {
        if !crate::kernels::dot::avx2() {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        let (hd, stride, slots, group) = (64, 3 * 64, 41, 3);
        let f = |i: usize| ((i as f32) * 0.377).sin() * 2.0;
        let k: Vec<f32> = (0..slots * stride).map(f).collect();
        let v: Vec<f32> = (0..slots * stride).map(|i| f(i + 5)).collect();
        // Three rows: two share the ancestors 30 and 33, the third only 30.
        let extras: [&[u32]; 3] = [&[30, 33, 36], &[30, 33, 37, 38], &[30, 40]];
        let q: Vec<f32> = (0..3 * group * hd).map(|i| f(i + 11)).collect();
        let qs: Vec<&[f32]> = q.chunks_exact(hd).collect();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let mut s = Scratch::default();
        for prefix in [0, 3, 4, 29] {
            let b = Block {
                qs: &qs,
                group,
                hd,
                kv_stride: stride,
                g_off: 64,
                k_cache: &k,
                v_cache: &v,
                prefix,
                extra: &extras,
                scale: 0.125,
            };
            let (mut a, mut c) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            block_body(&b, &mut a, &mut s);
            // SAFETY: AVX2 was detected above.
            unsafe { block_avx2(&b, &mut c, &mut s) };
            assert_eq!(bits(&a), bits(&c), "prefix {prefix}");
            // Each head of each row as if alone (a block of one row and one head).
            for (qi, qv) in qs.iter().enumerate() {
                let mut alone = vec![0f32; hd];
                let one = Block {
                    qs: &[qv],
                    group: 1,
                    extra: &extras[qi / group..qi / group + 1],
                    ..b
                };
                block_body(&one, &mut alone, &mut s);
                assert_eq!(
                    bits(&alone),
                    bits(&a[qi * hd..(qi + 1) * hd]),
                    "prefix {prefix}, query {qi}"
                );
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn weighted_sums_of_values_equal_the_portable_definition_on_every_path() {
        let (stride, slots) = (96, 40);
        let f = |i: usize| ((i as f32) * 0.917).sin() * 1.7;
        let v: Vec<f32> = (0..slots * stride).map(f).collect();
        let p: Vec<Vec<f32>> = (0..4)
            .map(|t| (0..20).map(|i| f(i * 3 + t + 1000).abs()).collect())
            .collect();
        let ps: Vec<&[f32]> = p.iter().map(|x| x.as_slice()).collect();
        let slot = |i: usize| if i < 12 { i } else { 2 * i - 2 };
        let start: [[f32; PV_WIDTH]; 4] =
            std::array::from_fn(|t| std::array::from_fn(|d| f(t * 100 + d + 7)));
        let bits = |a: &[[f32; PV_WIDTH]]| {
            a.iter()
                .flat_map(|r| r.iter().map(|x| x.to_bits()))
                .collect::<Vec<_>>()
        };
        let mut want = start;
        pv_portable(&ps, &v, stride, 64, 20, slot, &mut want);
        if crate::kernels::dot::avx2() {
            let mut got = start;
            let (a, b) = got.split_at_mut(2);
            // SAFETY: AVX2 was detected; the slots stay inside `v`.
            unsafe {
                pv_avx2::<2>(
                    ps[..2].try_into().unwrap(),
                    &v,
                    stride,
                    64,
                    20,
                    slot,
                    a.try_into().unwrap(),
                );
                pv_avx2::<1>(
                    ps[2..3].try_into().unwrap(),
                    &v,
                    stride,
                    64,
                    20,
                    slot,
                    (&mut b[..1]).try_into().unwrap(),
                );
                pv_avx2::<1>(
                    ps[3..].try_into().unwrap(),
                    &v,
                    stride,
                    64,
                    20,
                    slot,
                    (&mut b[1..]).try_into().unwrap(),
                );
            }
            assert_eq!(bits(&got), bits(&want), "avx2");
        } else {
            eprintln!("skipping the AVX2 path: this CPU lacks it");
        }
        if is_x86_feature_detected!("avx512f") {
            let mut got = start;
            // SAFETY: AVX-512F was detected; the slots stay inside `v`.
            unsafe {
                pv_avx512::<4>(
                    ps[..].try_into().unwrap(),
                    &v,
                    stride,
                    64,
                    20,
                    slot,
                    &mut got,
                )
            };
            assert_eq!(bits(&got), bits(&want), "avx512");
        } else {
            eprintln!("skipping the AVX-512 path: this CPU lacks it");
        }
    }

    #[test]
    fn every_row_of_a_batch_equals_that_row_alone() {
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 16,
        };
        let stride = 2 * 16;
        let f = |i: usize| ((i as f32) * 0.613).sin();
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        // A prompt chunk (causal), a draft tree, and a decode row, in one call.
        let (ka, va): (Vec<f32>, Vec<f32>) = (
            (0..90 * stride).map(f).collect(),
            (0..90 * stride).map(|i| f(i + 3)).collect(),
        );
        let (kb, vb): (Vec<f32>, Vec<f32>) = (
            (0..50 * stride).map(|i| f(i + 17)).collect(),
            (0..50 * stride).map(|i| f(i + 29)).collect(),
        );
        let causal = Visibility::causal(40, 50);
        let tree = Visibility::tree(37, &[-1, 0, 0, 1, 1, 2, 3, 3, 6, -1, 9, 10]);
        let decode = Visibility::causal(20, 1);
        let seqs = [
            Seq {
                k_cache: &ka,
                v_cache: &va,
                vis: &causal,
            },
            Seq {
                k_cache: &kb,
                v_cache: &vb,
                vis: &tree,
            },
            Seq {
                k_cache: &ka,
                v_cache: &va,
                vis: &decode,
            },
        ];
        let m = 50 + 12 + 1;
        let row = shape.n_heads * shape.head_dim;
        let q: Vec<f32> = (0..m * row).map(|i| f(i + 101)).collect();
        let all = attention_batch(&q, &shape, &seqs);
        let mut r = 0;
        for seq in &seqs {
            for e in &seq.vis.extra {
                let alone = Visibility {
                    prefix: seq.vis.prefix,
                    extra: vec![e.clone()],
                    dense: Default::default(),
                };
                let one = attention(
                    &q[r * row..(r + 1) * row],
                    &shape,
                    seq.k_cache,
                    seq.v_cache,
                    &alone,
                );
                assert_eq!(bits(&one), bits(&all[r * row..(r + 1) * row]), "row {r}");
                r += 1;
            }
        }
    }

    #[test]
    fn tree_visibility_lists_ancestors_root_first() {
        // 0 is the root, 1 and 2 its children, 3 a child of 2.
        let v = Visibility::tree(10, &[-1, 0, 0, 2]);
        assert_eq!(v.prefix, 10);
        assert_eq!(
            v.extra,
            vec![vec![10], vec![10, 11], vec![10, 12], vec![10, 12, 13]]
        );
        let c = Visibility::causal(5, 3);
        assert_eq!(c.extra, vec![vec![5], vec![5, 6], vec![5, 6, 7]]);
    }

    #[test]
    fn tree_node_equals_sequential_decode_bitwise() {
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let slot = 2 * 8;
        let f = |i: usize| ((i as f32) * 0.731).sin();
        // Sequential: slots 0..6 hold tokens a0..a5; query for a5 sees 0..=5.
        let k_seq: Vec<f32> = (0..6 * slot).map(f).collect();
        let v_seq: Vec<f32> = (0..6 * slot).map(|i| f(i + 99)).collect();
        let q: Vec<f32> = (0..4 * 8).map(|i| f(i + 7)).collect();
        let seq = attention(&q, &shape, &k_seq, &v_seq, &Visibility::causal(5, 1));
        // Tree: prefix 0..3, then new slots 3.. = [a3, x, a4, y, a5] with parents
        // [-1, 0, 0, 1, 2]: a5's ancestors are a3, a4.
        let mut k_tree = k_seq[..3 * slot].to_vec();
        let mut v_tree = v_seq[..3 * slot].to_vec();
        let junk: Vec<f32> = (0..slot).map(|i| f(i + 1234)).collect();
        for src in [Some(3), None, Some(4), None, Some(5)] {
            match src {
                Some(s) => {
                    k_tree.extend_from_slice(&k_seq[s * slot..(s + 1) * slot]);
                    v_tree.extend_from_slice(&v_seq[s * slot..(s + 1) * slot]);
                }
                None => {
                    k_tree.extend_from_slice(&junk);
                    v_tree.extend_from_slice(&junk);
                }
            }
        }
        let vis = Visibility::tree(3, &[-1, 0, 0, 1, 2]);
        let mut q_tree = vec![0f32; 5 * 4 * 8];
        q_tree[4 * 32..].copy_from_slice(&q);
        let tree = attention(&q_tree, &shape, &k_tree, &v_tree, &vis);
        for (a, b) in seq.iter().zip(&tree[4 * 32..]) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
    }
}
