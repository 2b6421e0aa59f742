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

/// The query heads of one KV head (grouped-query attention) over their visible slots: scores,
/// softmax, weighted sum of values. The heads share each key and value row they read, and
/// each head's arithmetic is exactly that of attending alone: its scores are `dot`s, its
/// softmax and weighted sum run in slot order. `qs` and `out` hold `group` heads of `hd`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn group_body(
    qs: &[f32],
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
    let group = qs.len() / hd;
    let n = prefix + extra.len();
    scores.clear();
    scores.resize(group * n, 0.0);
    let key = |s: usize| &k_cache[s * kv_stride + g_off..s * kv_stride + g_off + hd];
    let slot = |i: usize| {
        if i < prefix {
            i
        } else {
            extra[i - prefix] as usize
        }
    };
    // Four keys at a time for every head of the group: the same bits as one `dot` each.
    let mut i = 0;
    while i + 4 <= n {
        let ks = [
            key(slot(i)),
            key(slot(i + 1)),
            key(slot(i + 2)),
            key(slot(i + 3)),
        ];
        for h in 0..group {
            let mut o = [[0f32; 4]; 1];
            dot_block([&qs[h * hd..(h + 1) * hd]], ks, &mut o);
            for (j, v) in o[0].iter().enumerate() {
                scores[h * n + i + j] = v * scale;
            }
        }
        i += 4;
    }
    for i in i..n {
        let k = key(slot(i));
        for h in 0..group {
            scores[h * n + i] = dot(&qs[h * hd..(h + 1) * hd], k) * scale;
        }
    }
    let mut inv = [0f32; 16];
    let mut inv_heap = Vec::new();
    let inv: &mut [f32] = if group <= 16 {
        &mut inv[..group]
    } else {
        inv_heap.resize(group, 0.0);
        &mut inv_heap
    };
    for (h, sc) in scores.chunks_exact_mut(n.max(1)).take(group).enumerate() {
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        inv[h] = 1.0 / sum;
    }
    out.fill(0.0);
    for i in 0..n {
        let s = slot(i);
        let v = &v_cache[s * kv_stride + g_off..s * kv_stride + g_off + hd];
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let p = scores[h * n + i];
            // Plain multiply-then-add (not `mul_add`, which is a library call without FMA
            // hardware): the order is fixed either way, which is all batch invariance needs,
            // and elementwise, so 8-lane AVX2 and scalar code give the same bits.
            for (o, vi) in o.iter_mut().zip(v) {
                *o += p * vi;
            }
        }
    }
    for (o, inv) in out.chunks_exact_mut(hd).zip(inv.iter()) {
        for x in o.iter_mut() {
            *x *= inv;
        }
    }
}

/// [`group_body`] compiled for AVX2 (its loops vectorize 8 lanes wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_avx2(
    qs: &[f32],
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
    group_body(
        qs, kv_stride, g_off, hd, k_cache, v_cache, prefix, extra, scale, out, scores,
    )
}

#[allow(clippy::too_many_arguments)]
fn one_group(
    qs: &[f32],
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
            group_avx2(
                qs, kv_stride, g_off, hd, k_cache, v_cache, prefix, extra, scale, out, scores,
            )
        };
    }
    group_body(
        qs, kv_stride, g_off, hd, k_cache, v_cache, prefix, extra, scale, out, scores,
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
    // One task per (row, KV head): the `group` query heads that share it.
    let width = group * hd;
    let run = |(idx, o): (usize, &mut [f32]), scores: &mut Vec<f32>| {
        let (r, g) = (idx / nkv, idx % nkv);
        let (s, i) = rows[r];
        let seq = &seqs[s];
        let q0 = (r * nh + g * group) * hd;
        one_group(
            &q[q0..q0 + width],
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
        out.chunks_exact_mut(width)
            .enumerate()
            .for_each(|x| run(x, &mut scores));
    } else {
        // A few groups per task: each task keeps one score buffer.
        let per = (m * nkv).div_ceil(4 * super::pool::threads()).max(1);
        super::pool::for_each_chunk(&mut out, per * width, &|t, o| {
            let mut scores = Vec::new();
            for (j, og) in o.chunks_exact_mut(width).enumerate() {
                run((t * per + j, og), &mut scores);
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
    fn avx2_and_portable_groups_agree_bitwise_and_equal_heads_alone() {
        if !crate::kernels::dot::avx2() {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        let (hd, stride, slots, group) = (64, 3 * 64, 37, 3);
        let f = |i: usize| ((i as f32) * 0.377).sin() * 2.0;
        let k: Vec<f32> = (0..slots * stride).map(f).collect();
        let v: Vec<f32> = (0..slots * stride).map(|i| f(i + 5)).collect();
        let q: Vec<f32> = (0..group * hd).map(|i| f(i + 11)).collect();
        let extra = [30u32, 33, 36];
        let (mut a, mut b) = (vec![0f32; group * hd], vec![0f32; group * hd]);
        let mut scores = Vec::new();
        for prefix in [0, 3, 4, 29] {
            group_body(
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
                group_avx2(
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
            // Each head of the group as if alone (a group of one).
            for h in 0..group {
                let mut alone = vec![0f32; hd];
                group_body(
                    &q[h * hd..(h + 1) * hd],
                    stride,
                    64,
                    hd,
                    &k,
                    &v,
                    prefix,
                    &extra,
                    0.125,
                    &mut alone,
                    &mut scores,
                );
                assert_eq!(bits(&alone), bits(&a[h * hd..(h + 1) * hd]), "head {h}");
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
