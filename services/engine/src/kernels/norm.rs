//! RMSNorm on the CPU, one row at a time in a fixed order (batch-invariant).
//!
//! y = x / sqrt(mean(x^2) + eps) * w, as in LLaMA (Zhang & Sennrich, 2019).

use super::dot::dot;

pub fn rms_norm(x: &[f32], h: usize, w: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(w.len(), h);
    let mut out = vec![0f32; x.len()];
    for (row, o) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ss = dot(row, row);
        let inv = 1.0 / (ss / h as f32 + eps).sqrt();
        for ((oi, xi), wi) in o.iter_mut().zip(row).zip(w) {
            *oi = (xi * inv) * wi;
        }
    }
    out
}
