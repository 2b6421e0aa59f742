//! Grouped-query self-attention (Ainslie et al., 2023) over a [`KvCache`] layer, with tree
//! visibility (see `kernels::attention`). A tensor-parallel rank holds a block of the heads
//! (see `crate::parallel`); everything below works on the heads it holds.

use candle_core::{DType, Device, Tensor, D};

use super::linear::Split;
use super::{Linear, RopeAt};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::attention::{attention_batch, AttnShape, Seq, Visibility};
use crate::kv_cache::LayerKv;
use crate::loader::Weights;
use crate::parallel::Shard;

/// One sequence's share of a batched pass in one layer: its cache, the slot its new rows are
/// written from, and what each of them sees. Its rows are `vis.len()` consecutive rows of the
/// pass.
pub struct KvPart<'a> {
    pub kv: &'a mut LayerKv,
    pub start: usize,
    pub vis: &'a Visibility,
}

#[derive(Clone, Debug)]
pub struct Attention {
    /// q, k and v projections fused along the output dimension.
    pub qkv: Linear,
    pub o: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` under `w` (HF names). `in_dim` is the
    /// width of the layer's input (the hidden size, or more for EAGLE-3 heads). A sharded rank
    /// loads its heads' rows of q/k/v (and biases) and the matching columns of `o_proj`.
    pub fn load(w: &Weights, cfg: &ModelConfig, in_dim: usize, shard: &Shard) -> Result<Self> {
        let (qd, kvd, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let b = cfg.attention_bias;
        let heads = shard.heads(cfg);
        let rows = |h: &std::ops::Range<usize>| h.start * hd..h.end * hd;
        let (q_rows, kv_rows) = (rows(&heads.q), rows(&heads.kv));
        let (col, row) = if shard.is_sharded() {
            (
                [Split::Column(&q_rows), Split::Column(&kv_rows)],
                Split::Row(&q_rows, shard),
            )
        } else {
            ([Split::Full, Split::Full], Split::Full)
        };
        let q = Linear::load_split(w, "q_proj", in_dim, qd, b, col[0])?;
        let k = Linear::load_split(w, "k_proj", in_dim, kvd, b, col[1])?;
        let v = Linear::load_split(w, "v_proj", in_dim, kvd, b, col[1])?;
        let o = Linear::load_split(w, "o_proj", qd, cfg.hidden_size, false, row)?;
        Ok(Attention {
            qkv: Linear::fuse(&[q, k, v])?,
            o,
            n_heads: heads.q.len(),
            n_kv_heads: heads.kv.len(),
            head_dim: hd,
        })
    }

    fn dims(&self) -> (usize, usize) {
        (
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
        )
    }

    /// CPU path over the rows of one or more sequences: `x` is [m, in_dim], the rows of
    /// `parts[0]` first, then those of `parts[1]`, and so on. The projections run once over all
    /// rows (each weight block loaded once for the whole batch); each part's new keys/values go
    /// to its own cache at `start..`, and its rows attend only within that cache, as its
    /// visibility says.
    pub fn forward_cpu(
        &self,
        x: &[f32],
        m: usize,
        rope: &RopeAt,
        parts: &mut [KvPart<'_>],
    ) -> Result<Vec<f32>> {
        let (qd, kvd) = self.dims();
        let qkv = self.qkv.forward_cpu(x, m)?;
        let width = qd + 2 * kvd;
        let mut q = Vec::with_capacity(m * qd);
        let mut k = Vec::with_capacity(m * kvd);
        let mut v = Vec::with_capacity(m * kvd);
        for row in qkv.chunks_exact(width) {
            q.extend_from_slice(&row[..qd]);
            k.extend_from_slice(&row[qd..qd + kvd]);
            v.extend_from_slice(&row[qd + kvd..]);
        }
        rope.apply_cpu(&mut q, self.n_heads);
        rope.apply_cpu(&mut k, self.n_kv_heads);
        let shape = AttnShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
        };
        let mut row = 0;
        for part in parts.iter_mut() {
            let (start, n) = (part.start, part.vis.len());
            let LayerKv::Cpu { k: kc, v: vc } = &mut *part.kv else {
                unreachable!("CPU kernels with a device cache")
            };
            kc[start * kvd..(start + n) * kvd].copy_from_slice(&k[row * kvd..(row + n) * kvd]);
            vc[start * kvd..(start + n) * kvd].copy_from_slice(&v[row * kvd..(row + n) * kvd]);
            row += n;
        }
        let seqs: Vec<Seq<'_>> = parts
            .iter()
            .map(|part| {
                let LayerKv::Cpu { k, v } = &*part.kv else {
                    unreachable!("CPU kernels with a device cache")
                };
                Seq {
                    k_cache: k,
                    v_cache: v,
                    vis: part.vis,
                }
            })
            .collect();
        let ctx = attention_batch(&q, &shape, &seqs);
        debug_assert_eq!(row, m, "the parts' rows must cover the pass");
        self.o.forward_cpu(&ctx, m)
    }

    /// Device-generic path with a dense mask built from `vis`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        kv: &mut LayerKv,
        start: usize,
        vis: &Visibility,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, rope)?;
        let LayerKv::Device { k: kc, v: vc } = kv else {
            unreachable!("device path with a CPU cache")
        };
        kc.slice_set(&k, 0, start)?;
        vc.slice_set(&v, 0, start)?;
        let total = start + q.dim(0)?;
        let mask = dense_mask(vis, total, x.device())?;
        self.attend(
            &q,
            &kc.narrow(0, 0, total)?,
            &vc.narrow(0, 0, total)?,
            &mask,
        )
    }

    /// Device-generic path without a cache: the `m` rows of `x` attend to each other as the
    /// additive `mask` [m, m] says (0 visible, -inf hidden). Every step is a differentiable
    /// candle op on the weights' own tensors, so training can backpropagate through it.
    pub fn forward_masked(&self, x: &Tensor, rope: &RopeAt, mask: &Tensor) -> Result<Tensor> {
        let (q, k, v) = self.project(x, rope)?;
        self.attend(&q, &k, &v, mask)
    }

    /// Training-time test (EAGLE-3, Li et al., 2025; reference `traineagle3/cnets.py`): the
    /// head unrolled for several steps over the same m rows. At the first step (`past` empty)
    /// the rows attend as `mask` [m, m] says; at step k each row also sees its own row of the
    /// keys of steps 1..k (this one included), one score each, all under one softmax. Keys
    /// and values of every step are kept in `past` for the next. Differentiable candle ops.
    pub fn forward_ttt(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        mask: &Tensor,
        past: &mut TttKv,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, rope)?;
        let Some((k0, v0)) = past.first.clone() else {
            past.first = Some((k.clone(), v.clone()));
            return self.attend(&q, &k, &v, mask);
        };
        past.later.push((k, v));
        let (qd, _) = self.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (m, group) = (q.dim(0)?, nh / nkv);
        let scale = 1.0 / (hd as f64).sqrt();
        // [m, kv_dim] -> [m, nh, hd], each KV head repeated for its query heads.
        let per_head = |c: &Tensor| -> Result<Tensor> {
            Ok(c.reshape((m, nkv, 1, hd))?
                .broadcast_as((m, nkv, group, hd))?
                .reshape((m, nh, hd))?)
        };
        let qh = q.transpose(0, 1)?.contiguous()?; // [nh, m, hd]
        let keys0 = per_head(&k0)?.transpose(0, 1)?.contiguous()?;
        let values0 = per_head(&v0)?.transpose(0, 1)?.contiguous()?;
        let main = (qh.matmul(&keys0.t()?)? * scale)?.broadcast_add(mask)?; // [nh, m, m]
        let mut scores = vec![main];
        let mut diag_values = Vec::with_capacity(past.later.len());
        for (ki, vi) in &past.later {
            let s = (&q * per_head(ki)?)?.sum(D::Minus1)? * scale; // [m, nh]
            scores.push(s?.transpose(0, 1)?.unsqueeze(2)?); // [nh, m, 1]
            diag_values.push(per_head(vi)?.transpose(0, 1)?); // [nh, m, hd]
        }
        let scores = Tensor::cat(&scores, 2)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let mut ctx = p.narrow(2, 0, m)?.contiguous()?.matmul(&values0)?; // [nh, m, hd]
        for (i, vi) in diag_values.iter().enumerate() {
            ctx = (ctx + p.narrow(2, m + i, 1)?.broadcast_mul(vi)?)?;
        }
        let ctx = ctx.transpose(0, 1)?.reshape((m, qd))?;
        self.o.forward(&ctx)
    }

    /// The rotated queries [m, heads, head_dim], and rotated keys and values [m, kv_dim].
    fn project(&self, x: &Tensor, rope: &RopeAt) -> Result<(Tensor, Tensor, Tensor)> {
        let device = x.device().clone();
        let (qd, kvd) = self.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let m = x.dim(0)?;
        let qkv = self.qkv.forward(x)?;
        let q = qkv.narrow(1, 0, qd)?.reshape((m, nh, hd))?;
        let k = qkv.narrow(1, qd, kvd)?.reshape((m, nkv, hd))?;
        let v = qkv.narrow(1, qd + kvd, kvd)?.contiguous()?;
        let q = rope.apply(&q, &device)?;
        let k = rope.apply(&k, &device)?.reshape((m, kvd))?;
        Ok((q, k, v))
    }

    /// Queries [m, heads, head_dim] over `keys` / `values` [T, kv_dim] with the additive
    /// `mask` [m, T], then the output projection.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (qd, _) = self.dims();
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let m = q.dim(0)?;
        let total = keys.dim(0)?;
        let group = nh / nkv;
        let expand = |c: &Tensor| -> Result<Tensor> {
            Ok(c.reshape((total, nkv, 1, hd))?
                .broadcast_as((total, nkv, group, hd))?
                .reshape((total, nh, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let keys = expand(keys)?; // [nh, T, hd]
        let values = expand(values)?;
        let q = q.transpose(0, 1)?.contiguous()?; // [nh, m, hd]
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&keys.t()?)? * scale)?; // [nh, m, T]
        let scores = scores.broadcast_add(mask)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let ctx = p.matmul(&values)?.transpose(0, 1)?.reshape((m, qd))?;
        self.o.forward(&ctx)
    }
}

/// The keys and values of the steps of a training-time test so far (see
/// [`Attention::forward_ttt`]): the first step's, then each later step's, [m, kv_dim] each.
#[derive(Default)]
pub struct TttKv {
    pub first: Option<(Tensor, Tensor)>,
    pub later: Vec<(Tensor, Tensor)>,
}

/// [m, total] additive mask: 0 where visible, -inf elsewhere; built once per pass (see
/// [`Visibility::dense`]).
fn dense_mask(vis: &Visibility, total: usize, device: &Device) -> Result<Tensor> {
    if let Some((t, mask)) = vis.dense.get() {
        if *t == total && mask.device().same_device(device) {
            return Ok(mask.clone());
        }
    }
    let mask = build_mask(vis, total, device)?;
    let _ = vis.dense.set((total, mask.clone()));
    Ok(mask)
}

fn build_mask(vis: &Visibility, total: usize, device: &Device) -> Result<Tensor> {
    let m = vis.len();
    let mut mask = vec![f32::NEG_INFINITY; m * total];
    for (i, extra) in vis.extra.iter().enumerate() {
        mask[i * total..i * total + vis.prefix].fill(0.0);
        for &s in extra {
            mask[i * total + s as usize] = 0.0;
        }
    }
    Ok(Tensor::from_vec(mask, (m, total), device)?.to_dtype(DType::F32)?)
}
