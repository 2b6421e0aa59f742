//! Whether a speculative step pays at the current load (continuous batching).
//!
//! The worker runs the steps of all its sessions in one target pass, so the rows a tree adds
//! cost every session of the batch, and on a machine whose pass time grows with its rows (a
//! CPU), speculation that pays for one stream can lose for sixteen. With B sessions on a
//! worker, each either speculating (trees of t nodes giving tau tokens per pass, after a draft
//! of d seconds) or decoding plainly:
//!
//! - speculation: tau tokens per d + cost(B * t) seconds, per session;
//! - plain decoding: 1 token per cost(B) seconds.
//!
//! `cost(n)` is the worker's measured time of a pass over n rows (its cost profile, the one the
//! automatic tree size uses); tau, t and d are running means over this coordinator's recent
//! speculative steps with automatic trees. A step speculates when that rate is at least
//! plain decoding's; otherwise it decodes plainly (counted in
//! `eagle_spec_load_plain_steps_total`). One request in [`EXPLORE`] speculates at every step
//! anyway, so the means keep following the head and the load (whole requests, not single
//! steps: a draft session that skipped steps must catch up on them, which costs more than
//! the step). Requests with a fixed tree size (`total_token` > 0) always speculate: they asked
//! for that tree. So do sampled requests (T > 0): their random draws differ between a
//! speculative and a plain step, and a seeded request must give the same tokens at any load.
//!
//! A step that speculates with an automatic greedy tree has that tree sized for the pass it
//! joins: the draft request carries what the other sessions are expected to add
//! ([`SpecLoad::others`]), and the draft service keeps the nodes that maximise the whole
//! pass's expected tokens per second (`CostProfile::best_keep`), so trees shrink as the load
//! grows before speculation stops altogether.
//!
//! Source: the expected-rate argument of EAGLE-2's `total_token = -1` (and Sequoia's
//! hardware-aware trees), applied to the batch instead of one sequence; vLLM and TensorRT-LLM
//! switch speculation off above a fixed batch size instead of from measured costs.

use std::sync::Mutex;

use eagle_engine::spec::{BatchLoad, CostProfile};

/// One request in this many speculates at every step whatever the means say.
pub const EXPLORE: u64 = 16;
/// Steps observed before the means are trusted (until then every step speculates).
const WARM_UP: u64 = 8;
/// Weight of the newest step in the running means.
const ALPHA: f64 = 0.05;

#[derive(Debug, Default)]
struct Means {
    tokens: f64,
    nodes: f64,
    draft_s: f64,
    observed: u64,
    decided: u64,
}

/// The running means of speculative steps, shared by every request of a coordinator.
#[derive(Debug, Default)]
pub struct SpecLoad {
    means: Mutex<Means>,
    /// Off (`--always-speculate`): every step speculates.
    off: bool,
}

/// What the means say, for the logs and tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub tokens_per_pass: f64,
    pub nodes: f64,
    pub draft_s: f64,
}

impl SpecLoad {
    /// Deciding by load when `on`; otherwise every step speculates.
    pub fn new(on: bool) -> Self {
        SpecLoad {
            off: !on,
            ..Default::default()
        }
    }

    /// Records a speculative step: a tree of `nodes` nodes (root included) gave `tokens`
    /// tokens, after `draft_s` seconds of drafting.
    pub fn observe(&self, nodes: usize, tokens: usize, draft_s: f64) {
        let mut m = self.means.lock().unwrap_or_else(|p| p.into_inner());
        let a = if m.observed < WARM_UP {
            1.0 / (m.observed + 1) as f64
        } else {
            ALPHA
        };
        m.tokens += a * (tokens as f64 - m.tokens);
        m.nodes += a * (nodes as f64 - m.nodes);
        m.draft_s += a * (draft_s - m.draft_s);
        m.observed += 1;
    }

    /// The means, once warmed up.
    pub fn estimate(&self) -> Option<Estimate> {
        let m = self.means.lock().unwrap_or_else(|p| p.into_inner());
        (m.observed >= WARM_UP).then_some(Estimate {
            tokens_per_pass: m.tokens,
            nodes: m.nodes,
            draft_s: m.draft_s,
        })
    }

    /// Whether a new request explores: speculates at every step, for the means. True until
    /// the means are warm, then for one request in [`EXPLORE`].
    pub fn explores(&self) -> bool {
        let mut m = self.means.lock().unwrap_or_else(|p| p.into_inner());
        m.decided += 1;
        self.off || m.observed < WARM_UP || m.decided.is_multiple_of(EXPLORE)
    }

    /// Whether the next step of a session on a worker holding `sessions` sessions should
    /// speculate, given the worker's pass costs (yes while the means are cold).
    pub fn pays(&self, cost: &CostProfile, sessions: usize) -> bool {
        match self.estimate() {
            Some(e) if !cost.points.is_empty() => e.pays(cost, sessions),
            _ => true,
        }
    }
}

impl SpecLoad {
    /// What the other sessions of a worker holding `sessions` sessions are expected to add to
    /// the pass a tree joins, to size that tree for the whole pass: a speculative step's mean
    /// rows and tokens each where speculation pays at this load, a plain step's one row and one
    /// token each where it does not (and while the means are cold).
    pub fn others(&self, cost: &CostProfile, sessions: usize) -> BatchLoad {
        let n = sessions.saturating_sub(1) as f64;
        match self.estimate() {
            Some(e) if !cost.points.is_empty() && e.pays(cost, sessions) => BatchLoad {
                rows: n * e.nodes,
                tokens: n * e.tokens_per_pass,
            },
            _ => BatchLoad { rows: n, tokens: n },
        }
    }
}

impl Estimate {
    /// Speculation's rate against plain decoding's with `sessions` sessions per pass.
    pub fn pays(&self, cost: &CostProfile, sessions: usize) -> bool {
        let b = sessions.max(1);
        // The mean rows, not rounded: trees of 1.4 nodes cost more than plain steps' 1.
        let rows = (b as f64 * self.nodes).max(b as f64);
        let spec = self.tokens_per_pass / (self.draft_s + cost.cost_of(rows));
        let plain = 1.0 / cost.cost(b);
        // Strictly faster: a step that gains nothing decodes plainly.
        spec > plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU-like profile: 7 ms for one row, then about 2.5 ms per extra row.
    fn cpu() -> CostProfile {
        CostProfile {
            points: vec![
                (1, 0.007),
                (2, 0.0082),
                (4, 0.0119),
                (8, 0.0188),
                (16, 0.0403),
                (32, 0.0606),
                (64, 0.12),
            ],
            draft_level_s: 0.0,
        }
    }

    #[test]
    fn speculation_pays_alone_and_stops_paying_under_load() {
        let e = Estimate {
            tokens_per_pass: 2.0,
            nodes: 3.0,
            draft_s: 0.001,
        };
        assert!(e.pays(&cpu(), 1), "2 tokens for 3 rows pays alone");
        assert!(
            !e.pays(&cpu(), 16),
            "48 rows instead of 16 for twice the tokens does not"
        );
        // A flat profile (a GPU's small batches): speculation pays at any load.
        let flat = CostProfile {
            points: vec![(1, 0.015), (64, 0.016)],
            draft_level_s: 0.0,
        };
        assert!(e.pays(&flat, 16));
        // A head that rarely hits never pays.
        let poor = Estimate {
            tokens_per_pass: 1.05,
            ..e
        };
        assert!(!poor.pays(&cpu(), 1));
        // Nor do small trees that gain less than their extra rows cost: 1.4 nodes a tree for
        // 1.05 tokens (rounding the rows down to one would call it a win).
        let small = Estimate {
            tokens_per_pass: 1.05,
            nodes: 1.4,
            draft_s: 0.0001,
        };
        assert!(!small.pays(&cpu(), 1));
        // A head that gains nothing, on a profile whose noise made two rows look cheaper than
        // one (as the worker's measurement can under load): plain, once the profile is made
        // monotone as the coordinator reads it.
        let noisy = CostProfile {
            points: vec![(1, 0.0080), (2, 0.0078), (4, 0.0090)],
            draft_level_s: 0.0,
        };
        let none = Estimate {
            tokens_per_pass: 1.0,
            nodes: 1.3,
            draft_s: 0.0,
        };
        assert!(none.pays(&noisy, 1), "the noisy profile alone misleads");
        assert!(!none.pays(&noisy.monotone(), 1));
    }

    #[test]
    fn the_rest_of_the_pass_is_what_the_others_are_expected_to_run() {
        let s = SpecLoad::new(true);
        assert_eq!(s.others(&cpu(), 1), BatchLoad::default(), "alone");
        // Cold: plain steps assumed, a row and a token each.
        assert_eq!(s.others(&cpu(), 5).rows, 4.0);
        for _ in 0..WARM_UP {
            s.observe(3, 2, 0.001);
        }
        // Two tokens for three rows pays for two sessions: the others speculate.
        let two = s.others(&cpu(), 2);
        assert!((two.rows - 3.0).abs() < 1e-9 && (two.tokens - 2.0).abs() < 1e-9);
        // Not for sixteen: the others decode plainly.
        assert_eq!(
            s.others(&cpu(), 16),
            BatchLoad {
                rows: 15.0,
                tokens: 15.0
            }
        );
    }

    #[test]
    fn warm_up_and_exploration_speculate() {
        let s = SpecLoad::new(true);
        // Until warmed up, every request explores and every step speculates.
        for _ in 0..WARM_UP {
            assert!(s.explores() && s.pays(&cpu(), 16));
            s.observe(3, 1, 0.01);
        }
        // A head that gains nothing: plain steps, and one request in EXPLORE explores.
        assert!(!s.pays(&cpu(), 16));
        let exploring = (0..EXPLORE * 4).filter(|_| s.explores()).count();
        assert_eq!(exploring as u64, 4);
        // Switched off, every request speculates throughout.
        let always = SpecLoad::new(false);
        always.observe(3, 1, 0.01);
        assert!((0..EXPLORE).all(|_| always.explores()));
    }
}
