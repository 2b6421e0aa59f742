//! Tree verification: which drafted tokens the target accepts, and the bonus token.
//!
//! Invariants:
//! - Greedy (T = 0): the accepted path is the longest chain of children each equal to the
//!   target's argmax at its parent; the bonus token is the argmax at the last accepted node. So
//!   the output is exactly what greedy decoding produces, token for token.
//! - Sampling (T > 0): at each node with target distribution p (warped exactly as in vanilla
//!   sampling) and draft distribution q, the children, drawn from q without replacement, are
//!   tried in draw order: child x is accepted with probability min(1, p(x)/q(x)); on rejection
//!   p <- normalize(max(0, p - q)) and q <- q without x, renormalized. If all are rejected, the
//!   bonus is drawn from the residual p. Each emitted token is then distributed exactly as p
//!   (multi-draft recursive rejection sampling: SpecInfer, Miao et al., 2023; Jeon et al., 2024).

use crate::error::Result;
use crate::sampling::{argmax, sample, warp, Rng, SamplingParams};
use crate::tree::DraftTree;

/// The outcome of verifying one tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Accepted non-root nodes along the path, root-first.
    pub accepted: Vec<usize>,
    /// The new tokens: the accepted nodes' tokens, then the bonus token.
    pub tokens: Vec<u32>,
}

impl Verdict {
    /// Tree indices of the nodes whose keys/values stay in the cache: the root and the
    /// accepted path.
    pub fn kept_nodes(&self) -> Vec<usize> {
        let mut k = vec![0];
        k.extend_from_slice(&self.accepted);
        k
    }
}

/// The target's logits at a tree node, computed on demand: only the nodes the walk visits
/// need the LM head.
pub type NodeLogits<'a> = dyn FnMut(usize) -> Result<Vec<f32>> + 'a;

/// Greedy verification.
pub fn verify_greedy(tree: &DraftTree, logits: &mut NodeLogits) -> Result<Verdict> {
    let children = tree.children();
    let mut cur = 0usize;
    let mut accepted = Vec::new();
    let mut tokens = Vec::new();
    loop {
        let y = argmax(&logits(cur)?);
        match children[cur].iter().find(|&&c| tree.tokens[c] == y) {
            Some(&c) => {
                accepted.push(c);
                tokens.push(y);
                cur = c;
            }
            None => {
                tokens.push(y);
                return Ok(Verdict { accepted, tokens });
            }
        }
    }
}

/// The acceptance rule, factored out so tests can show that breaking it breaks losslessness.
pub trait AcceptRule {
    /// Tries `children` (tokens in draw order) against target `p` and draft `q`; returns the
    /// index of the accepted child, or the token drawn from the final residual.
    fn choose(
        &self,
        p: Vec<f32>,
        q: Vec<f32>,
        children: &[u32],
        rng: &mut Rng,
    ) -> std::result::Result<usize, u32>;
}

/// Recursive rejection sampling: the exact rule.
pub struct Recursive;

impl AcceptRule for Recursive {
    fn choose(
        &self,
        mut p: Vec<f32>,
        mut q: Vec<f32>,
        children: &[u32],
        rng: &mut Rng,
    ) -> std::result::Result<usize, u32> {
        for (i, &x) in children.iter().enumerate() {
            let (px, qx) = (p[x as usize] as f64, q[x as usize] as f64);
            let accept = if qx <= 0.0 {
                px > 0.0
            } else {
                rng.uniform() < (px / qx).min(1.0)
            };
            if accept {
                return Ok(i);
            }
            // Residual target: normalize(max(0, p - q)).
            let mut sum = 0f64;
            let residual: Vec<f32> = p
                .iter()
                .zip(&q)
                .map(|(&a, &b)| {
                    let r = (a - b).max(0.0);
                    sum += r as f64;
                    r
                })
                .collect();
            if sum > 0.0 {
                let inv = 1.0 / sum;
                p = residual
                    .into_iter()
                    .map(|r| (r as f64 * inv) as f32)
                    .collect();
            }
            // Draft without x.
            let rest = 1.0 - q[x as usize] as f64;
            q[x as usize] = 0.0;
            if rest > 0.0 {
                let inv = 1.0 / rest;
                for v in q.iter_mut() {
                    *v = (*v as f64 * inv) as f32;
                }
            }
        }
        Err(sample(&p, rng))
    }
}

/// Sampling verification with the exact rule.
pub fn verify_sampling(
    tree: &DraftTree,
    logits: &mut NodeLogits,
    params: &SamplingParams,
    rng: &mut Rng,
) -> Result<Verdict> {
    verify_sampling_with(tree, logits, params, rng, &Recursive)
}

pub fn verify_sampling_with(
    tree: &DraftTree,
    logits: &mut NodeLogits,
    params: &SamplingParams,
    rng: &mut Rng,
    rule: &dyn AcceptRule,
) -> Result<Verdict> {
    let children = tree.children();
    let mut cur = 0usize;
    let mut accepted = Vec::new();
    let mut tokens = Vec::new();
    loop {
        let p = warp(&logits(cur)?, params);
        let kids = &children[cur];
        let q = match (&tree.draft_probs[cur], kids.is_empty()) {
            (Some(q), false) => q.clone(),
            _ => {
                tokens.push(sample(&p, rng));
                return Ok(Verdict { accepted, tokens });
            }
        };
        let kid_tokens: Vec<u32> = kids.iter().map(|&c| tree.tokens[c]).collect();
        match rule.choose(p, q, &kid_tokens, rng) {
            Ok(i) => {
                let c = kids[i];
                accepted.push(c);
                tokens.push(tree.tokens[c]);
                cur = c;
            }
            Err(t) => {
                tokens.push(t);
                return Ok(Verdict { accepted, tokens });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_hot(v: usize, at: usize) -> Vec<f32> {
        let mut l = vec![0.0; v];
        l[at] = 5.0;
        l
    }

    #[test]
    fn greedy_follows_the_argmax_chain() {
        // root -> {1: tok 3, 2: tok 4}; 1 -> {3: tok 5}; 2 -> {4: tok 6}.
        let mut t = DraftTree::root(9);
        let a = t.push(0, 3);
        let b = t.push(0, 4);
        t.push(a, 5);
        t.push(b, 6);
        let logits = [
            one_hot(10, 4),
            one_hot(10, 5),
            one_hot(10, 6),
            one_hot(10, 7),
            one_hot(10, 1),
        ];
        // Target says 4 at root -> node b; at b says 6 -> node 4; at node 4 says 1: bonus.
        let v = verify_greedy(&t, &mut |i| Ok(logits[i].clone())).unwrap();
        assert_eq!(v.accepted, vec![b, 4]);
        assert_eq!(v.tokens, vec![4, 6, 1]);
        assert_eq!(v.kept_nodes(), vec![0, b, 4]);
        // Nothing matches at the root: only the bonus.
        let v = verify_greedy(&t, &mut |_| Ok(one_hot(10, 8))).unwrap();
        assert_eq!(v.tokens, vec![8]);
        assert!(v.accepted.is_empty());
    }

    /// One level of recursive rejection sampling reproduces p exactly, whatever q is.
    #[test]
    fn recursive_rule_reproduces_the_target_distribution() {
        let p = vec![0.1f32, 0.5, 0.15, 0.25];
        let q = vec![0.6f32, 0.1, 0.25, 0.05];
        let mut rng = Rng::new(3);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            // Children drawn from q without replacement, as the drafter does.
            let kids = crate::sampling::sample_without_replacement(&q, 2, &mut rng);
            let t = match Recursive.choose(p.clone(), q.clone(), &kids, &mut rng) {
                Ok(i) => kids[i],
                Err(t) => t,
            };
            counts[t as usize] += 1;
        }
        for (c, pi) in counts.iter().zip(&p) {
            let f = *c as f64 / n as f64;
            assert!((f - *pi as f64).abs() < 0.005, "{counts:?}");
        }
    }
}
