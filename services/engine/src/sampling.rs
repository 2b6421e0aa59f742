//! Logits warping and sampling, shared by vanilla decoding, drafting and verification.
//!
//! Invariant: the target distribution p for a position is `warp(logits, params)` in every mode,
//! computed by the same code, so vanilla sampling and speculative sampling aim at the same
//! distribution, and greedy decoding is the same `argmax` everywhere. Warping follows the
//! Hugging Face order: temperature, then top-k, then top-p (Holtzman et al., 2020).

use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{EngineError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::InvalidRequest(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidRequest(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The seedable generator used for every random choice of a request.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.random::<f64>()
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

/// Log-softmax in f32 with an f64 normaliser.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    logits.iter().map(|&l| l - lse).collect()
}

/// The `k` largest entries as (index, value), best first, lowest index first among equals
/// (values ordered by `f32::total_cmp`).
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(values.len());
    if k == 0 {
        return Vec::new();
    }
    if k <= SMALL_K {
        return top_k_small(values, k);
    }
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut idx: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, v))
        .collect();
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// Up to this `k`, [`top_k`] keeps a sorted list of the best so far in one pass.
const SMALL_K: usize = 64;

/// [`top_k`] in one pass: an entry joins the list only if it beats the k-th best so far
/// (strictly: among equals the earlier index wins), at the place that keeps the order.
fn top_k_small(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    use std::cmp::Ordering::{Greater, Less};
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && v.total_cmp(&best[k - 1].1) != Greater {
            continue;
        }
        // After every entry at least as large (those have lower indices).
        let at = best.partition_point(|&(_, b)| b.total_cmp(&v) != Less);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// The `k` most likely entries of `log_softmax(logits)` as (index, log-probability), best
/// first: [`top_k`] on the logits (the order is the same), then `logit - logsumexp`, with the
/// exponentials on the vector kernels. Values agree with [`log_softmax`] to float rounding.
pub fn top_log_probs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let top = top_k(logits, k);
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if !max.is_finite() {
        let lp = log_softmax(logits);
        return top.into_iter().map(|(i, _)| (i, lp[i as usize])).collect();
    }
    let mut scratch = logits.to_vec();
    let inv_sum = crate::kernels::softmax::softmax(&mut scratch);
    let lse = max - inv_sum.ln();
    top.into_iter().map(|(i, v)| (i, v - lse)).collect()
}

/// The warped distribution (dense, sums to 1) for temperature > 0.
pub fn warp(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    debug_assert!(!params.is_greedy());
    let t = params.temperature;
    let scaled: Vec<f32> = logits.iter().map(|&l| l / t).collect();
    // Candidate set after top-k: a threshold on the scaled logit.
    let mut keep_min = f32::NEG_INFINITY;
    let mut kth: Option<Vec<(u32, f32)>> = None;
    if params.top_k > 0 && params.top_k < scaled.len() {
        let tk = top_k(&scaled, params.top_k);
        keep_min = tk.last().map(|x| x.1).unwrap_or(f32::NEG_INFINITY);
        kth = Some(tk);
    }
    let max = scaled.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = vec![0.0; scaled.len()];
    let mut sum = 0f64;
    for (p, &s) in probs.iter_mut().zip(&scaled) {
        if s >= keep_min {
            let e = ((s - max) as f64).exp();
            *p = e as f32;
            sum += e;
        }
    }
    // Ties at the k-th value: keep exactly k, the lowest indices first.
    if let Some(tk) = kth {
        let kept = probs.iter().filter(|p| **p > 0.0).count();
        if kept > tk.len() {
            let mut mask = vec![false; probs.len()];
            for (i, _) in &tk {
                mask[*i as usize] = true;
            }
            sum = 0.0;
            for (i, p) in probs.iter_mut().enumerate() {
                if !mask[i] {
                    *p = 0.0;
                }
                sum += *p as f64;
            }
        }
    }
    let inv = 1.0 / sum;
    for p in probs.iter_mut() {
        *p = (*p as f64 * inv) as f32;
    }
    if params.top_p < 1.0 {
        apply_top_p(&mut probs, params.top_p);
    }
    probs
}

/// Keeps the smallest set of most likely tokens whose mass reaches `top_p`, renormalised.
fn apply_top_p(probs: &mut [f32], top_p: f32) {
    let nonzero = probs.iter().filter(|p| **p > 0.0).count();
    let mut k = 64.min(nonzero).max(1);
    loop {
        let top = top_k(probs, k);
        let mut cum = 0f64;
        let mut cut = None;
        for (j, (_, p)) in top.iter().enumerate() {
            cum += *p as f64;
            if cum >= top_p as f64 {
                cut = Some(j + 1);
                break;
            }
        }
        if let Some(n) = cut.or(if k >= nonzero { Some(top.len()) } else { None }) {
            let mut keep = vec![false; probs.len()];
            for (i, _) in &top[..n] {
                keep[*i as usize] = true;
            }
            let mut sum = 0f64;
            for (i, p) in probs.iter_mut().enumerate() {
                if !keep[i] {
                    *p = 0.0;
                }
                sum += *p as f64;
            }
            let inv = 1.0 / sum;
            for p in probs.iter_mut() {
                *p = (*p as f64 * inv) as f32;
            }
            return;
        }
        k = (k * 8).min(nonzero);
    }
}

/// The next token from the target's logits, as vanilla decoding picks it: the argmax at
/// T = 0, otherwise a draw from the warped distribution.
pub fn choose(logits: &[f32], params: &SamplingParams, rng: &mut Rng) -> u32 {
    if params.is_greedy() {
        argmax(logits)
    } else {
        sample(&warp(logits, params), rng)
    }
}

/// Draws an index from `probs` (need not be normalised) by inverse CDF in index order.
pub fn sample(probs: &[f32], rng: &mut Rng) -> u32 {
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    let u = rng.uniform() * total;
    let mut cum = 0f64;
    let mut last = 0u32;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cum += p as f64;
            last = i as u32;
            if u < cum {
                return i as u32;
            }
        }
    }
    last
}

/// An ordered sample of up to `k` distinct indices from `probs`, drawn one after another
/// without replacement (each draw from the distribution renormalised without the earlier
/// ones). This is the order in which recursive rejection sampling must try them.
pub fn sample_without_replacement(probs: &[f32], k: usize, rng: &mut Rng) -> Vec<u32> {
    let mut chosen: Vec<u32> = Vec::with_capacity(k);
    let support = probs.iter().filter(|&&p| p > 0.0).count();
    let mut removed = 0f64;
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    for _ in 0..k.min(support) {
        let u = rng.uniform() * (total - removed);
        let mut cum = 0f64;
        let mut pick = None;
        let mut last = None;
        for (i, &p) in probs.iter().enumerate() {
            if p <= 0.0 || chosen.contains(&(i as u32)) {
                continue;
            }
            cum += p as f64;
            last = Some(i as u32);
            if u < cum {
                pick = Some(i as u32);
                break;
            }
        }
        let Some(x) = pick.or(last) else { break };
        removed += probs[x as usize] as f64;
        chosen.push(x);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warp_applies_temperature_top_k_top_p() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        let p = warp(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
        );
        let s: f32 = p.iter().sum();
        assert!((s - 1.0).abs() < 1e-5);
        assert!(p[0] > p[1] && p[1] > p[2]);
        let k2 = warp(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_k: 2,
                ..Default::default()
            },
        );
        assert_eq!(k2.iter().filter(|x| **x > 0.0).count(), 2);
        let e = (1.0f32).exp();
        assert!((k2[0] - e / (e + 1.0)).abs() < 1e-5);
        // top_p = 0.5: the first token alone has ~0.53 of the mass.
        let tp = warp(
            &logits,
            &SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                ..Default::default()
            },
        );
        assert_eq!(tp, vec![1.0, 0.0, 0.0, 0.0, 0.0]);
        let cold = warp(
            &logits,
            &SamplingParams {
                temperature: 0.1,
                ..Default::default()
            },
        );
        assert!(cold[0] > 0.99);
    }

    #[test]
    fn argmax_and_top_k_break_ties_by_lowest_index() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(
            top_k(&[1.0, 3.0, 3.0, 2.0], 3),
            vec![(1, 3.0), (2, 3.0), (3, 2.0)]
        );
    }

    /// The one-pass top-k equals sorting everything, on values with many ties, both zeros and
    /// infinities; the log-probabilities of the best equal `log_softmax`'s to rounding.
    #[test]
    fn the_one_pass_top_k_equals_a_full_sort() {
        let mut state = 0x2545f491u32;
        for round in 0..200 {
            let n = 1 + round * 7 % 300;
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    match state % 11 {
                        0 => -0.0,
                        1 => 0.0,
                        2 => f32::NEG_INFINITY,
                        _ => ((state >> 8) % 23) as f32 * 0.25 - 3.0,
                    }
                })
                .collect();
            let mut all: Vec<(u32, f32)> =
                v.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for k in [1, 2, 8, 10, 64] {
                let want: Vec<(u32, u32)> =
                    all.iter().take(k).map(|&(i, x)| (i, x.to_bits())).collect();
                let got: Vec<(u32, u32)> = top_k(&v, k)
                    .into_iter()
                    .map(|(i, x)| (i, x.to_bits()))
                    .collect();
                assert_eq!(got, want, "n={n} k={k}");
                let lp = log_softmax(&v);
                for (i, p) in top_log_probs(&v, k) {
                    assert!(
                        (p - lp[i as usize]).abs() <= 1e-5 || p == lp[i as usize],
                        "{p} vs {}",
                        lp[i as usize]
                    );
                }
            }
        }
    }

    #[test]
    fn sampling_matches_probabilities() {
        let probs = [0.5f32, 0.3, 0.2];
        let mut rng = Rng::new(7);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[sample(&probs, &mut rng) as usize] += 1;
        }
        for (c, p) in counts.iter().zip(probs) {
            assert!((*c as f32 / 20000.0 - p).abs() < 0.02);
        }
        // Without replacement: first draw ~ p; second excludes the first.
        let mut second_given_first0 = [0usize; 3];
        let mut n0 = 0;
        for _ in 0..20000 {
            let s = sample_without_replacement(&probs, 2, &mut rng);
            assert_eq!(s.len(), 2);
            assert_ne!(s[0], s[1]);
            if s[0] == 0 {
                n0 += 1;
                second_given_first0[s[1] as usize] += 1;
            }
        }
        assert!((second_given_first0[1] as f32 / n0 as f32 - 0.6).abs() < 0.03);
    }

    #[test]
    fn bad_params_are_rejected() {
        for t in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(SamplingParams {
                temperature: t,
                ..Default::default()
            }
            .validate()
            .is_err());
        }
        for p in [0.0, 1.5, f32::NAN] {
            assert!(SamplingParams {
                top_p: p,
                ..Default::default()
            }
            .validate()
            .is_err());
        }
    }
}
