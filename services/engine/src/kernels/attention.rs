//! Tree attention on the CPU, batch-invariant by construction.
//!
//! Invariant: a query attends to exactly the slots in its visibility list, in that order: the
//! committed prefix `0..prefix`, then its own extra slots (its tree ancestors root-first, then
//! itself). A draft-tree node whose ancestors are the tokens a sequential decoder would have
//! produced therefore computes the very same scores, softmax and weighted sum, bit for bit, as
//! that decoder; masked slots are skipped, not multiplied by zero. This is the tree attention
//! of SpecInfer (Miao et al., 2023) and EAGLE (Li et al., 2024) without a dense mask.

use super::dot::{dot, dot_block};

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

/// One query head over its visible slots: scores, softmax, weighted sum of values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn one_head_body(
    q: &[f32],
    kv_stride: usize,
    g_off: usize,
    hd: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    prefix: usize,
    extra: &[u32],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    scores.clear();
    let key = |s: usize| &k_cache[s * kv_stride + g_off..s * kv_stride + g_off + hd];
    // The prefix's keys four at a time: the same bits as one `dot` each, fewer calls.
    let mut s = 0;
    while s + 4 <= prefix {
        let mut o = [[0f32; 4]; 1];
        dot_block([q], [key(s), key(s + 1), key(s + 2), key(s + 3)], &mut o);
        scores.extend(o[0].iter().map(|v| v * scale));
        s += 4;
    }
    let slots = (0..prefix).chain(extra.iter().map(|&s| s as usize));
    scores.extend(slots.clone().skip(s).map(|s| dot(q, key(s)) * scale));
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for sc in scores.iter_mut() {
        *sc = (*sc - max).exp();
        sum += *sc;
    }
    out.fill(0.0);
    for (p, s) in scores.iter().zip(slots) {
        let v = &v_cache[s * kv_stride + g_off..s * kv_stride + g_off + hd];
        // Plain multiply-then-add (not `mul_add`, which is a library call without FMA
        // hardware): the order is fixed either way, which is all batch invariance needs, and
        // elementwise, so 8-lane AVX2 and scalar code give the same bits.
        for (o, vi) in out.iter_mut().zip(v) {
            *o += p * vi;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// [`one_head_body`] compiled for AVX2 (its loops vectorize 8 lanes wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn one_head_avx2(
    q: &[f32],
    kv_stride: usize,
    g_off: usize,
    hd: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    prefix: usize,
    extra: &[u32],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    one_head_body(
        q, kv_stride, g_off, hd, k_cache, v_cache, prefix, extra, scale, out, scores,
    )
}

#[allow(clippy::too_many_arguments)]
fn one_head(
    q: &[f32],
    kv_stride: usize,
    g_off: usize,
    hd: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    prefix: usize,
    extra: &[u32],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    if super::dot::avx2() {
        // SAFETY: the dot kernels detected AVX2, FMA and F16C at run time.
        return unsafe {
            one_head_avx2(
                q, kv_stride, g_off, hd, k_cache, v_cache, prefix, extra, scale, out, scores,
            )
        };
    }
    one_head_body(
        q, kv_stride, g_off, hd, k_cache, v_cache, prefix, extra, scale, out, scores,
    )
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

/// One sequence of a batched attention call: its caches and its rows' visibility.
pub struct Seq<'a> {
    pub k_cache: &'a [f32],
    pub v_cache: &'a [f32],
    pub vis: &'a Visibility,
}

/// Attention for the rows of several sequences at once: `q` holds the rows of `seqs[0]`, then
/// those of `seqs[1]`, and so on, and each row attends only within its own sequence's cache.
/// Every (row, head) pair is one independent task of a single parallel job, so a batch of
/// short decode rows costs one fork-join, not one per sequence.
pub fn attention_batch(q: &[f32], shape: &AttnShape, seqs: &[Seq<'_>]) -> Vec<f32> {
    let (nh, nkv, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    // Per row: its sequence and its index there.
    let rows: Vec<(usize, usize)> = seqs
        .iter()
        .enumerate()
        .flat_map(|(s, seq)| (0..seq.vis.len()).map(move |i| (s, i)))
        .collect();
    let m = rows.len();
    assert_eq!(
        q.len(),
        m * nh * hd,
        "attention: q is not [m, heads, head_dim]"
    );
    let group = nh / nkv;
    let kv_stride = nkv * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; m * nh * hd];
    let run = |(idx, o): (usize, &mut [f32]), scores: &mut Vec<f32>| {
        let (r, h) = (idx / nh, idx % nh);
        let (s, i) = rows[r];
        let seq = &seqs[s];
        let g = h / group;
        one_head(
            &q[idx * hd..(idx + 1) * hd],
            kv_stride,
            g * hd,
            hd,
            seq.k_cache,
            seq.v_cache,
            seq.vis.prefix,
            &seq.vis.extra[i],
            scale,
            o,
            scores,
        );
    };
    let work: usize = seqs
        .iter()
        .map(|s| s.vis.len() * nh * (s.vis.prefix + s.vis.extra.last().map_or(0, |e| e.len())))
        .sum();
    if work * hd < 1 << 16 {
        let mut scores = Vec::new();
        out.chunks_exact_mut(hd)
            .enumerate()
            .for_each(|x| run(x, &mut scores));
    } else {
        // A few heads per task: each task keeps one score buffer.
        let per = (m * nh).div_ceil(4 * super::pool::threads()).max(1);
        super::pool::for_each_chunk(&mut out, per * hd, &|t, o| {
            let mut scores = Vec::new();
            for (j, oh) in o.chunks_exact_mut(hd).enumerate() {
                run((t * per + j, oh), &mut scores);
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_and_portable_heads_agree_bitwise() {
        if !crate::kernels::dot::avx2() {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        let (hd, stride, slots) = (64, 3 * 64, 37);
        let f = |i: usize| ((i as f32) * 0.377).sin() * 2.0;
        let k: Vec<f32> = (0..slots * stride).map(f).collect();
        let v: Vec<f32> = (0..slots * stride).map(|i| f(i + 5)).collect();
        let q: Vec<f32> = (0..hd).map(|i| f(i + 11)).collect();
        let extra = [30u32, 33, 36];
        let (mut a, mut b) = (vec![0f32; hd], vec![0f32; hd]);
        let mut scores = Vec::new();
        for prefix in [0, 3, 4, 29] {
            one_head_body(
                &q,
                stride,
                64,
                hd,
                &k,
                &v,
                prefix,
                &extra,
                0.125,
                &mut a,
                &mut scores,
            );
            // SAFETY: AVX2 was detected above.
            unsafe {
                one_head_avx2(
                    &q,
                    stride,
                    64,
                    hd,
                    &k,
                    &v,
                    prefix,
                    &extra,
                    0.125,
                    &mut b,
                    &mut scores,
                )
            };
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "prefix {prefix}");
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
