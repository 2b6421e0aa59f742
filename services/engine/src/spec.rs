//! Speculation settings and the automatic tree size (`total_token = -1`).
//!
//! EAGLE-2 observes that the draft's cumulative confidence approximates the chance a node is
//! accepted. So the expected tokens per step for a tree of n nodes is about
//! 1 + sum of exp(score) over the n - 1 best nodes, and with t(n), the measured cost of
//! verifying n tokens on this hardware, the best size is the n that maximises
//! (1 + sum exp(score)) / t(n). With `total_token = -1` this is chosen afresh at every step.

use crate::error::{EngineError, Result};
use crate::tree::StaticShape;

#[derive(Clone, Debug, PartialEq)]
pub enum TreeShape {
    /// EAGLE-2 dynamic trees.
    Dynamic,
    /// EAGLE-1 static trees.
    Static(StaticShape),
}

#[derive(Clone, Debug, PartialEq)]
pub struct SpecConfig {
    /// Nodes per verified tree, root included; -1 chooses it from measured costs.
    pub total_token: i32,
    /// Maximum draft depth (tokens beyond the root).
    pub depth: usize,
    /// Candidates per expansion.
    pub top_k: usize,
    /// Children per expanded node when sampling (T > 0).
    pub sample_branch: usize,
    pub shape: TreeShape,
}

impl Default for SpecConfig {
    fn default() -> Self {
        SpecConfig {
            total_token: -1,
            depth: 6,
            top_k: 8,
            sample_branch: 2,
            shape: TreeShape::Dynamic,
        }
    }
}

/// Largest tree the automatic sizing considers.
pub const AUTO_MAX_TOKENS: usize = 64;

impl SpecConfig {
    pub fn validate(&self) -> Result<()> {
        if self.total_token != -1 && !(2..=512).contains(&self.total_token) {
            return Err(EngineError::InvalidRequest(format!(
                "total_token must be -1 (automatic) or in 2..=512, got {}",
                self.total_token
            )));
        }
        if !(1..=32).contains(&self.depth) {
            return Err(EngineError::InvalidRequest(format!(
                "depth must be in 1..=32, got {}",
                self.depth
            )));
        }
        if !(1..=64).contains(&self.top_k) {
            return Err(EngineError::InvalidRequest(format!(
                "draft top_k must be in 1..=64, got {}",
                self.top_k
            )));
        }
        if let TreeShape::Static(s) = &self.shape {
            s.check().map_err(EngineError::InvalidRequest)?;
        }
        Ok(())
    }

    /// Non-root nodes a tree may hold (the fixed size, or the automatic maximum).
    pub fn node_budget(&self) -> usize {
        if self.total_token < 0 {
            AUTO_MAX_TOKENS - 1
        } else {
            self.total_token as usize - 1
        }
    }

    /// Head-cache slots one draft may use beyond the committed pairs.
    pub fn draft_slots(&self) -> usize {
        match &self.shape {
            TreeShape::Dynamic => self.top_k * self.depth + 1,
            TreeShape::Static(s) => s.paths.len() + 1,
        }
    }
}

/// How big a greedy dynamic tree may grow.
#[derive(Clone, Debug, PartialEq)]
pub enum TreeBudget {
    /// Keep this many non-root nodes.
    Fixed(usize),
    /// Choose per step from the measured costs (`total_token = -1`).
    Auto(CostProfile),
}

impl TreeBudget {
    pub fn for_spec(spec: &SpecConfig, profile: Option<CostProfile>) -> Self {
        match (spec.total_token < 0, profile) {
            (true, Some(p)) => TreeBudget::Auto(p),
            _ => TreeBudget::Fixed(spec.node_budget()),
        }
    }

    /// Non-root nodes to keep, given candidate scores sorted best first, after `levels` head
    /// passes of drafting, in a target pass that `load` shares.
    pub fn keep(&self, sorted_scores: &[f32], levels: usize, load: &BatchLoad) -> usize {
        match self {
            TreeBudget::Fixed(n) => (*n).min(sorted_scores.len()),
            TreeBudget::Auto(p) => p.best_keep(
                sorted_scores,
                AUTO_MAX_TOKENS - 1,
                levels as f64 * p.draft_level_s,
                load,
            ),
        }
    }

    /// Non-root nodes of a sampled tree (T > 0). Its size must not depend on the children it
    /// draws (that would bias the output), so it is fixed per step from the costs alone: with
    /// measured costs, the largest tree that costs at most 1.5 times a one-token pass (nearly
    /// all of a GPU's 64 tokens, a handful on a CPU); otherwise the fixed budget.
    pub fn sampled_nodes(&self) -> usize {
        match self {
            TreeBudget::Fixed(n) => *n,
            TreeBudget::Auto(p) => {
                let limit = 1.5 * p.cost(1);
                (1..AUTO_MAX_TOKENS)
                    .take_while(|&n| p.cost(n + 1) <= limit)
                    .last()
                    .unwrap_or(1)
            }
        }
    }

    /// Whether a frontier whose best cumulative log-probability is `best` can still add a node
    /// worth its cost: one more head pass plus the node's verification, against the expected
    /// tokens it adds (at most its probability), each worth a one-token step. Fixed budgets
    /// always expand, as EAGLE-2 does.
    pub fn worth_expanding(&self, best: f32) -> bool {
        match self {
            TreeBudget::Fixed(_) => true,
            TreeBudget::Auto(p) => {
                (best as f64).exp() >= p.marginal_token_cost() + p.draft_level_s / p.cost(1)
            }
        }
    }
}

/// What the other sessions sharing a target pass are expected to add to it: their rows and
/// the tokens those rows yield. Zero for a sequence alone.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct BatchLoad {
    pub rows: f64,
    pub tokens: f64,
}

impl BatchLoad {
    /// Rows past this are not believed (a wire value out of reason).
    pub const MAX_ROWS: f64 = 65536.0;

    /// The load as sent by a client, refused when not finite, negative or out of reason
    /// (rows past [`Self::MAX_ROWS`], more tokens than those rows' trees could yield).
    pub fn checked(rows: f64, tokens: f64) -> Result<Self, String> {
        let within = |x: f64, max: f64| x.is_finite() && (0.0..=max).contains(&x);
        if !within(rows, Self::MAX_ROWS) || !within(tokens, Self::MAX_ROWS * AUTO_MAX_TOKENS as f64)
        {
            return Err(format!(
                "batch load: rows {rows} and tokens {tokens} must be finite and at least 0, \
                 rows at most {}",
                Self::MAX_ROWS
            ));
        }
        Ok(BatchLoad { rows, tokens })
    }
}

/// Measured costs of a speculative step: one target forward over n new tokens, for a few n,
/// and one draft level (a head pass over the frontier plus its LM head).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct CostProfile {
    /// (tokens, seconds), increasing in tokens.
    pub points: Vec<(usize, f64)>,
    /// Seconds per draft level (0 when not measured).
    pub draft_level_s: f64,
}

impl CostProfile {
    /// The profile with every point at least as dear as the ones before it (their running
    /// maximum). Timing noise can make a measured pass over more rows look cheaper than one
    /// over fewer, which would make extra tree rows look free (and speculation with a head
    /// that gains nothing look as fast as plain decoding).
    pub fn monotone(mut self) -> Self {
        let mut most = 0f64;
        for p in &mut self.points {
            most = most.max(p.1);
            p.1 = most;
        }
        self
    }

    /// Cost of n tokens, linearly interpolated (and extrapolated past the last point).
    pub fn cost(&self, n: usize) -> f64 {
        self.cost_of(n as f64)
    }

    /// [`CostProfile::cost`] of a mean number of rows, which may be fractional (a pass whose
    /// trees average 1.4 nodes costs more than one of 1 node).
    pub fn cost_of(&self, n: f64) -> f64 {
        let p = &self.points;
        if p.is_empty() {
            return n;
        }
        if n <= p[0].0 as f64 {
            return p[0].1;
        }
        for w in p.windows(2) {
            let ((a, ta), (b, tb)) = (w[0], w[1]);
            if n <= b as f64 {
                return ta + (tb - ta) * (n - a as f64) / (b - a) as f64;
            }
        }
        let (a, ta) = p[p.len() - 2.min(p.len())];
        let (b, tb) = p[p.len() - 1];
        if b == a {
            return tb;
        }
        tb + (tb - ta) / (b - a) as f64 * (n - b as f64)
    }

    /// The cost of one more verified token, as a fraction of a one-token step (the average
    /// slope over the first 16 tokens).
    pub fn marginal_token_cost(&self) -> f64 {
        ((self.cost(16) - self.cost(1)) / 15.0 / self.cost(1)).max(0.0)
    }

    /// How many non-root nodes to keep, given candidate scores sorted best first and the
    /// `drafted_s` seconds the draft already took: the count that maximises expected tokens
    /// per second of the whole step. In a batched pass (continuous batching) the step is the
    /// whole pass: `load` adds the other sessions' rows to its cost and their tokens to what
    /// it yields, so a node must pay for itself at the batch's rate, not at one sequence's.
    pub fn best_keep(
        &self,
        sorted_scores: &[f32],
        max_nodes: usize,
        drafted_s: f64,
        load: &BatchLoad,
    ) -> usize {
        let others = load.rows.round() as usize;
        let mut expected = 1.0 + load.tokens;
        let mut best = (0usize, expected / (self.cost(others + 1) + drafted_s));
        for (i, s) in sorted_scores.iter().take(max_nodes).enumerate() {
            expected += (*s as f64).exp();
            let rate = expected / (self.cost(others + i + 2) + drafted_s);
            if rate > best.1 {
                best = (i + 1, rate);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_interpolates_and_extrapolates() {
        let c = CostProfile {
            points: vec![(1, 1.0), (9, 2.0), (17, 4.0)],
            ..Default::default()
        };
        assert_eq!(c.cost(1), 1.0);
        assert_eq!(c.cost(5), 1.5);
        assert_eq!(c.cost(13), 3.0);
        assert_eq!(c.cost(25), 6.0);
    }

    #[test]
    fn best_keep_trades_acceptance_for_cost() {
        let alone = BatchLoad::default();
        // Flat cost: keep everything that adds expected tokens.
        let flat = CostProfile {
            points: vec![(1, 1.0), (64, 1.0)],
            ..Default::default()
        };
        let scores = [-0.1f32, -0.5, -1.0, -3.0];
        assert_eq!(flat.best_keep(&scores, 10, 0.0, &alone), 4);
        // Linear cost: each node costs a whole token, so no node pays for itself.
        let linear = CostProfile {
            points: vec![(1, 1.0), (64, 64.0)],
            ..Default::default()
        };
        assert_eq!(linear.best_keep(&scores, 10, 0.0, &alone), 0);
        // Cheap first nodes, then steep.
        let knee = CostProfile {
            points: vec![(1, 1.0), (3, 1.05), (4, 3.0)],
            ..Default::default()
        };
        assert_eq!(knee.best_keep(&scores, 10, 0.0, &alone), 2);
        // Draft time already spent is shared by every choice, so it favours larger trees:
        // with the linear cost, a step that drafted for 10 token-times keeps nodes.
        assert!(linear.best_keep(&scores, 10, 10.0, &alone) > 0);
    }

    /// The keep that maximises the batch's expected tokens per second, by trying every count.
    fn brute_force(p: &CostProfile, scores: &[f32], load: &BatchLoad) -> usize {
        let rate = |n: usize| {
            let tokens: f64 =
                1.0 + load.tokens + scores[..n].iter().map(|s| (*s as f64).exp()).sum::<f64>();
            tokens / p.cost(load.rows.round() as usize + n + 1)
        };
        (0..=scores.len()).fold(0, |best, n| if rate(n) > rate(best) { n } else { best })
    }

    #[test]
    fn under_load_a_node_must_pay_at_the_batch_rate() {
        // A CPU-like profile: 7 ms for a row, about 2.5 ms for each further row past 8.
        let cpu = CostProfile {
            points: vec![
                (1, 7.0),
                (2, 8.2),
                (4, 11.9),
                (8, 18.8),
                (16, 40.3),
                (32, 60.6),
                (64, 120.0),
            ],
            ..Default::default()
        };
        let scores = [-0.05f32, -0.2, -0.4, -0.7, -1.0, -1.5, -2.0, -3.0];
        let alone = BatchLoad::default();
        let kept_alone = cpu.best_keep(&scores, 10, 0.0, &alone);
        assert!(
            kept_alone >= 3,
            "alone, likely nodes pay: kept {kept_alone}"
        );
        for others in [3.0, 7.0, 15.0, 31.0] {
            // Others decoding plainly: a row and a token each.
            let load = BatchLoad {
                rows: others,
                tokens: others,
            };
            let keep = cpu.best_keep(&scores, 10, 0.0, &load);
            assert_eq!(keep, brute_force(&cpu, &scores, &load), "{others} others");
            // Measured profiles need not be convex (here 16 to 32 rows is cheaper per row
            // than 8 to 16), so the size follows the profile, not the load alone; where the
            // pass's marginal row is dear, a node must be near-certain to pay.
            if others == 7.0 || others == 31.0 {
                assert_eq!(
                    keep, 0,
                    "{others} others: the next rows cost more than they give"
                );
            }
        }
        // A flat profile (a GPU's small batches): load changes nothing.
        let flat = CostProfile {
            points: vec![(1, 1.0), (128, 1.0)],
            ..Default::default()
        };
        let load = BatchLoad {
            rows: 31.0,
            tokens: 31.0,
        };
        assert_eq!(flat.best_keep(&scores, 10, 0.0, &load), scores.len());
        assert!(BatchLoad::checked(f64::NAN, 0.0).is_err());
        assert!(BatchLoad::checked(-1.0, 0.0).is_err());
        assert!(BatchLoad::checked(1e9, 0.0).is_err());
        assert_eq!(
            BatchLoad::checked(3.0, 4.5),
            Ok(BatchLoad {
                rows: 3.0,
                tokens: 4.5
            })
        );
    }

    #[test]
    fn expensive_draft_levels_stop_expansion() {
        let cheap = TreeBudget::Auto(CostProfile {
            points: vec![(1, 1.0), (64, 1.0)],
            draft_level_s: 0.0,
        });
        let dear = TreeBudget::Auto(CostProfile {
            points: vec![(1, 1.0), (64, 1.0)],
            draft_level_s: 0.5,
        });
        let p = 0.3f32.ln();
        assert!(cheap.worth_expanding(p));
        assert!(!dear.worth_expanding(p));
        assert!(dear.worth_expanding(0.9f32.ln()));
    }

    #[test]
    fn sampled_trees_are_sized_from_costs_alone() {
        let flat = TreeBudget::Auto(CostProfile {
            points: vec![(1, 1.0), (64, 1.2)],
            ..Default::default()
        });
        assert_eq!(flat.sampled_nodes(), AUTO_MAX_TOKENS - 1);
        // This CPU: 19, 23, 27, 44 ms for 1, 2, 4, 8 tokens.
        let cpu = TreeBudget::Auto(CostProfile {
            points: vec![(1, 19.0), (2, 23.0), (4, 27.0), (8, 44.0)],
            ..Default::default()
        });
        assert_eq!(cpu.sampled_nodes(), 3);
        assert_eq!(TreeBudget::Fixed(9).sampled_nodes(), 9);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let bad = SpecConfig {
            total_token: 1,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("total_token"));
        assert!(SpecConfig::default().validate().is_ok());
    }
}
