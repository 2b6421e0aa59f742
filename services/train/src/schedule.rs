//! The learning-rate schedule: linear warm-up, then cosine decay to a floor.
//!
//! Invariant: the rate at step s depends only on s and the settings, so a run resumed at step s
//! continues on the same curve. (The EAGLE reference trains with a warm-up followed by decay;
//! cosine is the usual smooth choice.)

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub base_lr: f64,
    pub warmup: usize,
    pub total: usize,
    /// The final rate as a fraction of the base rate.
    pub floor: f64,
}

impl Schedule {
    /// The rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.base_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let t = ((step - self.warmup.min(step)) as f64 / span as f64).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        self.base_lr * (self.floor + (1.0 - self.floor) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_then_decays() {
        let s = Schedule {
            base_lr: 1.0,
            warmup: 10,
            total: 110,
            floor: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-9);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!(s.lr(500) >= 0.1 - 1e-12);
    }
}
