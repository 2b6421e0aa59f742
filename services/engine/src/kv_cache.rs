//! Preallocated per-sequence KV cache with tree appends and compaction.
//!
//! Invariant: slots `0..len` hold, in position order, the keys and values of the committed
//! tokens. A forward pass writes its new tokens (a chain or a draft tree) at `len..len + m`
//! and advances `len`; after verification, [`KvCache::compact`] moves the accepted path's
//! slots down so they sit contiguously after the prefix, exactly where sequential decoding
//! would have written them, and drops the rest. Memory is allocated once, up front.

use candle_core::{Device, Tensor};

use crate::error::{EngineError, Result};

/// One layer's keys and values, [capacity, kv_dim] each.
#[derive(Debug)]
pub enum LayerKv {
    Cpu { k: Vec<f32>, v: Vec<f32> },
    Device { k: Tensor, v: Tensor },
}

/// The keys and values of a run of consecutive slots: per layer, (k, v), each [rows, kv_dim]
/// row-major. What a prefix cache keeps of a block of tokens.
#[derive(Clone, Debug)]
pub struct KvRows {
    pub rows: usize,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvRows {
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * 4)
            .sum()
    }
}

#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        kv_dim: usize,
        capacity: usize,
        device: &Device,
        cpu_kernels: bool,
    ) -> Result<Self> {
        let layers = (0..num_layers)
            .map(|_| {
                Ok(if cpu_kernels {
                    LayerKv::Cpu {
                        k: vec![0.0; capacity * kv_dim],
                        v: vec![0.0; capacity * kv_dim],
                    }
                } else {
                    LayerKv::Device {
                        k: Tensor::zeros((capacity, kv_dim), candle_core::DType::F32, device)?,
                        v: Tensor::zeros((capacity, kv_dim), candle_core::DType::F32, device)?,
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
            kv_dim,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.capacity * self.kv_dim * 4
    }

    /// Checks that `m` more tokens fit.
    pub fn reserve(&self, m: usize) -> Result<()> {
        if self.len + m > self.capacity {
            return Err(EngineError::ContextOverflow {
                needed: self.len + m,
                limit: self.capacity,
            });
        }
        Ok(())
    }

    /// Marks `m` slots written by the last forward pass as used.
    pub fn advance(&mut self, m: usize) {
        assert!(self.len + m <= self.capacity);
        self.len += m;
    }

    /// Forgets every slot from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keeps, of the slots appended since `start`, those at offsets `keep` (strictly
    /// increasing), moved to `start..start + keep.len()`; drops the rest.
    pub fn compact(&mut self, start: usize, keep: &[usize]) -> Result<()> {
        assert!(start <= self.len);
        for w in keep.windows(2) {
            assert!(w[0] < w[1], "compaction offsets must increase");
        }
        if let Some(&last) = keep.last() {
            assert!(start + last < self.len, "compaction offset past the end");
        }
        let d = self.kv_dim;
        for layer in self.layers.iter_mut() {
            match layer {
                LayerKv::Cpu { k, v } => {
                    for (j, &off) in keep.iter().enumerate() {
                        let (src, dst) = (start + off, start + j);
                        if src != dst {
                            k.copy_within(src * d..(src + 1) * d, dst * d);
                            v.copy_within(src * d..(src + 1) * d, dst * d);
                        }
                    }
                }
                LayerKv::Device { k, v } => {
                    if keep.is_empty() {
                        continue;
                    }
                    let idx: Vec<u32> = keep.iter().map(|&o| (start + o) as u32).collect();
                    let idx = Tensor::new(idx.as_slice(), k.device())?;
                    let kk = k.index_select(&idx, 0)?;
                    let vv = v.index_select(&idx, 0)?;
                    k.slice_set(&kk, 0, start)?;
                    v.slice_set(&vv, 0, start)?;
                }
            }
        }
        self.len = start + keep.len();
        Ok(())
    }

    /// Copies out the keys and values of slots `from..to` (committed ones), every layer.
    pub fn read_rows(&self, from: usize, to: usize) -> Result<KvRows> {
        assert!(from <= to && to <= self.len, "reading uncommitted slots");
        let d = self.kv_dim;
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                Ok(match layer {
                    LayerKv::Cpu { k, v } => {
                        (k[from * d..to * d].to_vec(), v[from * d..to * d].to_vec())
                    }
                    LayerKv::Device { k, v } => {
                        let rows = |t: &Tensor| -> Result<Vec<f32>> {
                            Ok(t.narrow(0, from, to - from)?.flatten_all()?.to_vec1()?)
                        };
                        (rows(k)?, rows(v)?)
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvRows {
            rows: to - from,
            layers,
        })
    }

    /// Appends `rows` (read by [`KvCache::read_rows`] from a cache of the same shape) after the
    /// committed slots and commits them.
    pub fn append_rows(&mut self, rows: &KvRows) -> Result<()> {
        self.reserve(rows.rows)?;
        if rows.layers.len() != self.layers.len()
            || rows.layers.iter().any(|(k, v)| {
                k.len() != rows.rows * self.kv_dim || v.len() != rows.rows * self.kv_dim
            })
        {
            return Err(EngineError::Config(format!(
                "KV rows of another shape: {} layers of {} slots for a cache of {} layers x {}",
                rows.layers.len(),
                rows.rows,
                self.layers.len(),
                self.kv_dim
            )));
        }
        let (at, d) = (self.len, self.kv_dim);
        for (layer, (rk, rv)) in self.layers.iter_mut().zip(&rows.layers) {
            match layer {
                LayerKv::Cpu { k, v } => {
                    k[at * d..(at + rows.rows) * d].copy_from_slice(rk);
                    v[at * d..(at + rows.rows) * d].copy_from_slice(rv);
                }
                LayerKv::Device { k, v } => {
                    let dev = k.device().clone();
                    k.slice_set(&Tensor::from_slice(rk, (rows.rows, d), &dev)?, 0, at)?;
                    v.slice_set(&Tensor::from_slice(rv, (rows.rows, d), &dev)?, 0, at)?;
                }
            }
        }
        self.len += rows.rows;
        Ok(())
    }

    /// Grows the cache to `capacity` slots, keeping the committed ones (a later turn of a
    /// multi-turn session needs more room than the first). Never shrinks.
    pub fn grow(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity {
            return Ok(());
        }
        let d = self.kv_dim;
        for layer in self.layers.iter_mut() {
            match layer {
                LayerKv::Cpu { k, v } => {
                    k.resize(capacity * d, 0.0);
                    v.resize(capacity * d, 0.0);
                }
                LayerKv::Device { k, v } => {
                    let pad = Tensor::zeros(
                        (capacity - self.capacity, d),
                        candle_core::DType::F32,
                        k.device(),
                    )?;
                    *k = Tensor::cat(&[&*k, &pad], 0)?;
                    *v = Tensor::cat(&[&*v, &pad], 0)?;
                }
            }
        }
        self.capacity = capacity;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &mut KvCache, from: usize, vals: &[f32]) {
        for l in c.layers.iter_mut() {
            if let LayerKv::Cpu { k, v } = l {
                for (i, x) in vals.iter().enumerate() {
                    k[(from + i) * 2] = *x;
                    k[(from + i) * 2 + 1] = -*x;
                    v[(from + i) * 2] = *x * 10.0;
                }
            }
        }
    }

    #[test]
    fn compaction_keeps_the_accepted_path() {
        let mut c = KvCache::new(2, 2, 16, &Device::Cpu, true).unwrap();
        fill(&mut c, 0, &[1.0, 2.0, 3.0]);
        c.advance(3);
        // A tree of 5 nodes appended after the prefix; the accepted path is nodes 0, 2, 4.
        fill(&mut c, 3, &[10.0, 11.0, 12.0, 13.0, 14.0]);
        c.advance(5);
        c.compact(3, &[0, 2, 4]).unwrap();
        assert_eq!(c.len(), 6);
        if let LayerKv::Cpu { k, v } = &c.layers[1] {
            let firsts: Vec<f32> = (0..6).map(|i| k[i * 2]).collect();
            assert_eq!(firsts, vec![1.0, 2.0, 3.0, 10.0, 12.0, 14.0]);
            assert_eq!(k[5 * 2 + 1], -14.0);
            assert_eq!(v[4 * 2], 120.0);
        } else {
            unreachable!()
        }
        assert!(c.reserve(10).is_ok());
        assert!(matches!(
            c.reserve(11),
            Err(EngineError::ContextOverflow {
                needed: 17,
                limit: 16
            })
        ));
    }

    #[test]
    fn growing_keeps_the_committed_slots() {
        for cpu in [true, false] {
            let mut c = KvCache::new(1, 2, 4, &Device::Cpu, cpu).unwrap();
            if let LayerKv::Cpu { k, .. } = &mut c.layers[0] {
                k[..4].copy_from_slice(&[1., 2., 3., 4.]);
            }
            if let LayerKv::Device { k, .. } = &c.layers[0] {
                let rows = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
                k.slice_set(&rows, 0, 0).unwrap();
            }
            c.advance(2);
            c.grow(8).unwrap();
            assert_eq!((c.len(), c.capacity()), (2, 8));
            assert!(c.reserve(6).is_ok());
            let firsts = match &c.layers[0] {
                LayerKv::Cpu { k, .. } => k[..4].to_vec(),
                LayerKv::Device { k, .. } => k
                    .narrow(0, 0, 2)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            };
            assert_eq!(firsts, vec![1., 2., 3., 4.]);
        }
    }

    #[test]
    fn rows_read_out_append_to_another_cache_unchanged() {
        for cpu in [true, false] {
            let mut a = KvCache::new(2, 2, 8, &Device::Cpu, cpu).unwrap();
            if let LayerKv::Cpu { .. } = a.layers[0] {
                fill(&mut a, 0, &[1.0, 2.0, 3.0, 4.0]);
            }
            for l in a.layers.iter_mut() {
                if let LayerKv::Device { k, v } = l {
                    let rows = Tensor::new(
                        &[[1f32, -1.], [2., -2.], [3., -3.], [4., -4.]],
                        &Device::Cpu,
                    )
                    .unwrap();
                    k.slice_set(&rows, 0, 0).unwrap();
                    v.slice_set(&(rows * 10.0).unwrap(), 0, 0).unwrap();
                }
            }
            a.advance(4);
            let rows = a.read_rows(1, 3).unwrap();
            assert_eq!(rows.rows, 2);
            assert_eq!(rows.layers[1].0, vec![2.0, -2.0, 3.0, -3.0]);
            assert_eq!(rows.bytes(), 2 * 2 * 2 * 2 * 4);
            let mut b = KvCache::new(2, 2, 3, &Device::Cpu, cpu).unwrap();
            b.append_rows(&a.read_rows(0, 1).unwrap()).unwrap();
            b.append_rows(&rows).unwrap();
            assert_eq!(b.len(), 3);
            assert_eq!(
                b.read_rows(0, 3).unwrap().layers,
                a.read_rows(0, 3).unwrap().layers
            );
            // No room, or rows of another shape: refused, nothing written.
            assert!(b.append_rows(&rows).is_err());
            let mut c = KvCache::new(1, 2, 8, &Device::Cpu, cpu).unwrap();
            assert!(c.append_rows(&rows).is_err());
            assert_eq!(c.len(), 0);
        }
    }

    #[test]
    fn device_path_compacts_like_the_cpu_path() {
        let mut c = KvCache::new(1, 2, 8, &Device::Cpu, false).unwrap();
        if let LayerKv::Device { k, .. } = &c.layers[0] {
            let rows =
                Tensor::new(&[[0f32, 0.], [1., 1.], [2., 2.], [3., 3.]], &Device::Cpu).unwrap();
            k.slice_set(&rows, 0, 0).unwrap();
        }
        c.advance(4);
        c.compact(1, &[2]).unwrap();
        assert_eq!(c.len(), 2);
        if let LayerKv::Device { k, .. } = &c.layers[0] {
            let got: Vec<Vec<f32>> = k.narrow(0, 0, 2).unwrap().to_vec2().unwrap();
            assert_eq!(got, vec![vec![0., 0.], vec![3., 3.]]);
        }
    }
}
