//! AdamW whose state can be saved, so a checkpoint holds the moments and a resumed run takes
//! exactly the steps an uninterrupted one would (candle_nn's AdamW keeps its moments private).
//!
//! Invariant: optimizer step t (1-based) updates each variable θ with gradient g as
//! Loshchilov & Hutter (2019) define decoupled weight decay, in candle_nn's order of operations:
//!   m ← β1·m + (1-β1)·g,  v ← β2·v + (1-β2)·g²,
//!   θ ← θ·(1 - lr·λ) - lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε).
//! The state is (t, m, v per variable); saved and loaded as f32 tensors named after the
//! variables, it resumes bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::error::{Result, TrainError};

/// AdamW's settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    t: usize,
    slots: Vec<Slot>,
}

const M: &str = ".adam_m";
const V: &str = ".adam_v";

impl AdamW {
    /// Zero moments for the named variables.
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: zeros.clone(),
                    v: zeros,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, t: 0, slots })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Optimizer steps taken (t).
    pub fn steps(&self) -> usize {
        self.t
    }

    /// One update from `grads` (variables without a gradient keep their value and moments).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let scale_m = 1.0 / (1.0 - c.beta1.powi(self.t as i32));
        let scale_v = 1.0 / (1.0 - c.beta2.powi(self.t as i32));
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + c.eps)?)?;
            let theta = ((s.var.as_tensor() * (1.0 - c.lr * c.weight_decay))? - (update * c.lr)?)?;
            s.var.set(&theta)?;
            s.m = m;
            s.v = v;
        }
        Ok(())
    }

    /// Writes the moments to `path` (safetensors; `t` is the caller's to keep).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for s in &self.slots {
            map.insert(format!("{}{M}", s.name), s.m.clone());
            map.insert(format!("{}{V}", s.name), s.v.clone());
        }
        candle_core::safetensors::save(&map, path)
            .map_err(|e| TrainError::data(path, e.to_string()))
    }

    /// Restores the moments written by [`AdamW::save`] and the step count `t`; every variable
    /// must be there with its shape.
    pub fn load(&mut self, path: &Path, t: usize, device: &Device) -> Result<()> {
        let map = candle_core::safetensors::load(path, device)
            .map_err(|e| TrainError::data(path, e.to_string()))?;
        for s in &mut self.slots {
            for (suffix, slot) in [(M, &mut s.m), (V, &mut s.v)] {
                let key = format!("{}{suffix}", s.name);
                let t = map.get(&key).ok_or_else(|| {
                    TrainError::data(path, format!("the optimizer state lacks {key}"))
                })?;
                if t.dims() != slot.dims() {
                    return Err(TrainError::data(
                        path,
                        format!(
                            "{key} has shape {:?}, the head's variable {:?}",
                            t.dims(),
                            slot.dims()
                        ),
                    ));
                }
                *slot = t.to_dtype(slot.dtype())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// The update equals the formula above, and a save/load in the middle changes nothing.
    #[test]
    fn updates_by_the_formula_and_resumes_exactly() {
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let dev = Device::Cpu;
        let run = |split: Option<usize>| -> Vec<f32> {
            let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap()).unwrap();
            let vars = vec![("w".to_string(), w.clone())];
            let mut opt = AdamW::new(&vars, cfg).unwrap();
            let dir = std::env::temp_dir().join(format!("adamw-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for step in 0..6 {
                if Some(step) == split {
                    let p = dir.join("opt.safetensors");
                    opt.save(&p).unwrap();
                    let t = opt.steps();
                    opt = AdamW::new(&vars, cfg).unwrap();
                    opt.load(&p, t, &dev).unwrap();
                }
                let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            w.as_tensor().to_vec1().unwrap()
        };
        let straight = run(None);
        assert_eq!(
            straight,
            run(Some(3)),
            "a resumed run equals the straight one"
        );

        // The first step by hand: m = 0.1 g, v = 0.05 g², so m̂ / sqrt(v̂) = sign(g).
        let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(&[("w".into(), w.clone())], cfg).unwrap();
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        let got: Vec<f32> = w
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) + 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w as f32).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
