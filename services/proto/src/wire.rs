//! Conversions between wire messages and engine types. Every conversion from the wire checks
//! what it is given (sizes, tree shape, token ranges) and says what is wrong; nothing sent by a
//! peer can panic a service.
//!
//! Features travel as raw little-endian rows in the sender's chosen dtype (bf16 by default:
//! 2 bytes per value, so 1.1 KiB per token for a 576-wide model, 16 KiB at hidden size 8192).
//! Draft distributions travel in exact f32, sparse when mostly zero: the acceptance test at
//! T > 0 divides by them, and a rounded q would bias it.

use candle_core::{DType, Device, Tensor};
use eagle_engine::sampling::SamplingParams;
use eagle_engine::spec::SpecConfig;
use eagle_engine::tree::DraftTree;
use tonic::Status;

use crate::common::{self, NodeDistribution};

fn wire_dtype(d: DType) -> Result<common::Dtype, Status> {
    match d {
        DType::F32 => Ok(common::Dtype::F32),
        DType::F16 => Ok(common::Dtype::F16),
        DType::BF16 => Ok(common::Dtype::Bf16),
        o => Err(Status::internal(format!(
            "features in {o:?} cannot be sent"
        ))),
    }
}

/// Features [rows, hidden] to the wire, converted to `dtype`.
pub fn features_to_wire(t: &Tensor, dtype: DType) -> Result<common::Features, Status> {
    let err = |e: candle_core::Error| Status::internal(format!("features: {e}"));
    let (rows, hidden) = t.dims2().map_err(err)?;
    let t = t.to_dtype(dtype).map_err(err)?.flatten_all().map_err(err)?;
    let data = match dtype {
        DType::F32 => bytes_of(&t.to_vec1::<f32>().map_err(err)?, |x| x.to_le_bytes()),
        DType::F16 => bytes_of(&t.to_vec1::<half::f16>().map_err(err)?, |x| x.to_le_bytes()),
        DType::BF16 => bytes_of(&t.to_vec1::<half::bf16>().map_err(err)?, |x| {
            x.to_le_bytes()
        }),
        _ => return Err(Status::internal("unsupported feature dtype")),
    };
    Ok(common::Features {
        rows: rows as u32,
        hidden: hidden as u32,
        dtype: wire_dtype(dtype)? as i32,
        data,
    })
}

fn bytes_of<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * N);
    for &x in v {
        out.extend_from_slice(&f(x));
    }
    out
}

/// Features from the wire as an f32 tensor on `device`, checked against the expected width.
pub fn features_from_wire(
    f: &common::Features,
    hidden: usize,
    device: &Device,
) -> Result<Tensor, Status> {
    if f.hidden as usize != hidden {
        return Err(Status::invalid_argument(format!(
            "features are {} wide, but the EAGLE head reads {hidden} values per token (the \
             hidden size; an EAGLE-3 head reads 3 x the hidden size: start the worker with \
             --draft-features as the head's config.json says)",
            f.hidden
        )));
    }
    let n = f.rows as usize * hidden;
    let width = match common::Dtype::try_from(f.dtype) {
        Ok(common::Dtype::F32) => 4,
        Ok(common::Dtype::F16) | Ok(common::Dtype::Bf16) => 2,
        _ => {
            return Err(Status::invalid_argument(format!(
                "unknown feature dtype {}",
                f.dtype
            )))
        }
    };
    if f.data.len() != n * width {
        return Err(Status::invalid_argument(format!(
            "features: {} rows x {hidden} need {} bytes, got {}",
            f.rows,
            n * width,
            f.data.len()
        )));
    }
    let vals: Vec<f32> = match common::Dtype::try_from(f.dtype) {
        Ok(common::Dtype::F32) => f
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Ok(common::Dtype::F16) => f
            .data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => f
            .data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    Tensor::from_vec(vals, (f.rows as usize, hidden), device)
        .map_err(|e| Status::internal(format!("features: {e}")))
}

/// A draft tree to the wire.
pub fn tree_to_wire(t: &DraftTree) -> common::Tree {
    let draft_probs = t
        .draft_probs
        .iter()
        .enumerate()
        .filter_map(|(i, q)| q.as_ref().map(|q| distribution_to_wire(i, q)))
        .collect();
    common::Tree {
        tokens: t.tokens.clone(),
        parents: t.parents.clone(),
        draft_probs,
    }
}

fn distribution_to_wire(node: usize, q: &[f32]) -> NodeDistribution {
    let nnz = q.iter().filter(|&&p| p != 0.0).count();
    // Sparse only with an entry to send: an empty id list reads as the dense form.
    if nnz > 0 && nnz * 2 < q.len() {
        let (ids, probs) = q
            .iter()
            .enumerate()
            .filter(|(_, &p)| p != 0.0)
            .map(|(i, &p)| (i as u32, p))
            .unzip();
        NodeDistribution {
            node: node as u32,
            ids,
            probs,
            vocab: q.len() as u32,
        }
    } else {
        NodeDistribution {
            node: node as u32,
            ids: Vec::new(),
            probs: q.to_vec(),
            vocab: q.len() as u32,
        }
    }
}

/// A draft tree from the wire, checked: shape, token range, distributions.
pub fn tree_from_wire(t: &common::Tree, vocab: usize) -> Result<DraftTree, Status> {
    let bad = |m: String| Status::invalid_argument(format!("draft tree: {m}"));
    let n = t.tokens.len();
    if n == 0 || t.parents.len() != n {
        return Err(bad(format!(
            "{n} tokens but {} parents (a tree has at least its root)",
            t.parents.len()
        )));
    }
    if let Some(tok) = t.tokens.iter().find(|&&x| x as usize >= vocab) {
        return Err(bad(format!(
            "token {tok} is outside the vocabulary of {vocab}"
        )));
    }
    let mut depths = vec![0usize; n];
    for (i, &p) in t.parents.iter().enumerate() {
        if i == 0 {
            if p != -1 {
                return Err(bad("the root's parent must be -1".into()));
            }
            continue;
        }
        if p < 0 || p as usize >= i {
            return Err(bad(format!("node {i} has parent {p}; parents come first")));
        }
        depths[i] = depths[p as usize] + 1;
    }
    let mut draft_probs: Vec<Option<Vec<f32>>> = vec![None; n];
    for d in &t.draft_probs {
        let node = d.node as usize;
        if node >= n || d.vocab as usize != vocab {
            return Err(bad(format!(
                "distribution for node {} over {} tokens (tree of {n}, vocabulary {vocab})",
                d.node, d.vocab
            )));
        }
        let mut q = vec![0f32; vocab];
        if d.ids.is_empty() {
            if d.probs.len() != vocab {
                return Err(bad(format!(
                    "dense distribution with {} entries",
                    d.probs.len()
                )));
            }
            q.copy_from_slice(&d.probs);
        } else {
            if d.ids.len() != d.probs.len() {
                return Err(bad(
                    "sparse distribution: ids and probs differ in length".into()
                ));
            }
            for (&i, &p) in d.ids.iter().zip(&d.probs) {
                let slot = q
                    .get_mut(i as usize)
                    .ok_or_else(|| bad(format!("distribution entry {i} out of range")))?;
                *slot = p;
            }
        }
        if q.iter().any(|p| !p.is_finite() || *p < 0.0) {
            return Err(bad(
                "a distribution holds a negative or non-finite value".into()
            ));
        }
        draft_probs[node] = Some(q);
    }
    let tree = DraftTree {
        tokens: t.tokens.clone(),
        parents: t.parents.clone(),
        depths,
        draft_probs,
    };
    tree.check().map_err(bad)?;
    Ok(tree)
}

/// Sampling parameters to the engine's type, validated.
pub fn sampling_from_wire(s: Option<&common::SamplingParams>) -> Result<SamplingParams, Status> {
    let p = match s {
        None => SamplingParams::greedy(),
        Some(s) => SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k as usize,
            seed: s.seed,
        },
    };
    p.validate().map_err(|e| crate::status::from_engine(&e))?;
    Ok(p)
}

pub fn sampling_to_wire(p: &SamplingParams) -> common::SamplingParams {
    common::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        seed: p.seed,
    }
}

/// Speculation settings to the engine's type (dynamic trees), validated.
pub fn spec_from_wire(s: Option<&common::SpecParams>) -> Result<SpecConfig, Status> {
    let mut c = SpecConfig::default();
    if let Some(s) = s {
        c.total_token = s.total_token;
        c.depth = s.depth as usize;
        c.top_k = s.top_k as usize;
    }
    c.validate().map_err(|e| crate::status::from_engine(&e))?;
    Ok(c)
}

pub fn spec_to_wire(c: &SpecConfig) -> common::SpecParams {
    common::SpecParams {
        total_token: c.total_token,
        depth: c.depth as u32,
        top_k: c.top_k as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_round_trip_in_every_dtype() {
        let t = Tensor::new(&[[1.0f32, -2.5, 3.25], [0.5, 0.0, -1.0]], &Device::Cpu).unwrap();
        for d in [DType::F32, DType::F16, DType::BF16] {
            let w = features_to_wire(&t, d).unwrap();
            let back = features_from_wire(&w, 3, &Device::Cpu).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        }
        let mut w = features_to_wire(&t, DType::BF16).unwrap();
        w.data.pop();
        let e = features_from_wire(&w, 3, &Device::Cpu).unwrap_err();
        assert!(e.message().contains("need 12 bytes"), "{}", e.message());
        assert!(features_from_wire(&w, 4, &Device::Cpu).is_err());
    }

    #[test]
    fn trees_round_trip_and_bad_trees_are_refused() {
        let mut t = DraftTree::root(5);
        let a = t.push(0, 7);
        t.push(a, 9);
        t.push(0, 3);
        let mut q = vec![0f32; 16];
        q[7] = 0.75;
        q[3] = 0.25;
        t.draft_probs[0] = Some(q);
        t.draft_probs[a] = Some(vec![1.0 / 16.0; 16]);
        let w = tree_to_wire(&t);
        assert!(
            !w.draft_probs[0].ids.is_empty(),
            "mostly-zero q goes sparse"
        );
        assert!(w.draft_probs[1].ids.is_empty(), "dense q stays dense");
        assert_eq!(tree_from_wire(&w, 16).unwrap(), t);

        let mut cyc = w.clone();
        cyc.parents[1] = 3;
        assert!(tree_from_wire(&cyc, 16)
            .unwrap_err()
            .message()
            .contains("parents come first"));
        assert!(tree_from_wire(&w, 8)
            .unwrap_err()
            .message()
            .contains("vocabulary"));
        let empty = common::Tree::default();
        assert!(tree_from_wire(&empty, 16).is_err());
    }
}
