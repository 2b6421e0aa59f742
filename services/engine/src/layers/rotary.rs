//! Rotary position embedding (Su et al., RoFormer, 2021) in the Hugging Face rotate-half layout:
//! dimension d pairs with d + head_dim/2. With LLaMA-3.1 frequency scaling when configured.

use candle_core::{Device, Tensor};

use crate::config::Llama3RopeScaling;
use crate::error::Result;

#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    pub head_dim: usize,
}

/// cos/sin for a run of positions: [m, head_dim/2] each.
#[derive(Clone, Debug)]
pub struct RopeAt {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
    /// cos and sin on the device, uploaded once per pass and shared by every layer (an upload
    /// per layer would synchronise the GPU each time).
    on_device: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, scaling: Option<&Llama3RopeScaling>) -> Self {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64) as f32)
            .collect();
        if let Some(s) = scaling {
            let old = s.original_max_position_embeddings as f32;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen < high_wavelen {
                    *f
                } else if wavelen > low_wavelen {
                    *f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *f / s.factor + smooth * *f
                };
            }
        }
        Rope { inv_freq, head_dim }
    }

    pub fn at(&self, positions: &[usize]) -> RopeAt {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeAt {
            cos,
            sin,
            half,
            on_device: std::sync::OnceLock::new(),
        }
    }
}

impl RopeAt {
    /// Rotates `x` = [m, heads, head_dim] in place.
    pub fn apply_cpu(&self, x: &mut [f32], heads: usize) {
        let half = self.half;
        let hd = 2 * half;
        for (row, chunk) in x.chunks_exact_mut(heads * hd).enumerate() {
            let c = &self.cos[row * half..(row + 1) * half];
            let s = &self.sin[row * half..(row + 1) * half];
            for head in chunk.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for d in 0..half {
                    let (x1, x2) = (a[d], b[d]);
                    a[d] = x1 * c[d] - x2 * s[d];
                    b[d] = x2 * c[d] + x1 * s[d];
                }
            }
        }
    }

    /// Device-generic: `x` is [m, heads, head_dim].
    pub fn apply(&self, x: &Tensor, device: &Device) -> Result<Tensor> {
        let (m, _, hd) = x.dims3()?;
        let half = hd / 2;
        let (cos, sin) = match self.on_device.get() {
            Some((c, s)) if c.device().same_device(device) && c.dims() == [m, 1, half] => {
                (c.clone(), s.clone())
            }
            _ => {
                let c = Tensor::from_slice(&self.cos, (m, 1, half), device)?;
                let s = Tensor::from_slice(&self.sin, (m, 1, half), device)?;
                let _ = self.on_device.set((c.clone(), s.clone()));
                (c, s)
            }
        };
        let x1 = x.narrow(2, 0, half)?;
        let x2 = x.narrow(2, half, half)?;
        let a = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let b = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[a, b], 2)?)
    }
}
