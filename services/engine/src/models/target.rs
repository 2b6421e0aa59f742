//! A decoder-only target model (LLaMA-2/3, Vicuna, SmolLM2, Mistral, Qwen2) with an explicit
//! KV cache and tree-shaped inputs.
//!
//! Invariant: `forward` returns, for every new token, the same bits whether that token comes
//! alone, in a prompt, or as a node of a draft tree with the same ancestors (see
//! `crate::kernels`). Features are the last decoder layer's output after the final norm: the
//! vector the LM head reads, which is what published EAGLE heads were trained on (HF
//! `hidden_states[-1]`).
//!
//! An EAGLE-3 head reads other features: the outputs of three inner layers, side by side and
//! before any norm ([`TargetModel::set_draft_layers`]). [`TargetModel::forward_batch_states`]
//! returns them next to the last features; the LM head still reads the last ones.
//!
//! A target can be one rank of a tensor-parallel group (see `crate::parallel`): it then holds
//! its slice of every layer and a vocab-parallel block of the embedding and LM head, and its
//! `forward` and `logits` return the whole group's result on every rank.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kernels::dot::WeightElem;
use crate::kernels::{attention::Visibility, with_cpu_slice};
use crate::kv_cache::KvCache;
use crate::layers::{use_cpu_kernels, DecoderLayer, KvPart, Linear, Matrix, RmsNorm, Rope};
use crate::loader::{Quant, WeightSource, Weights};
use crate::parallel::Shard;

/// One sequence's new rows in a pass: `tokens` at `positions`, attending as `vis` says, with
/// their keys/values written to `cache` from its end.
pub struct Rows<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub positions: &'a [usize],
    pub vis: &'a Visibility,
}

pub struct TargetModel {
    pub cfg: ModelConfig,
    /// [vocab, hidden] in the engine dtype or quantized; also the LM head when tied. On a
    /// sharded rank, the rows of `shard.vocab(..)`, zero-padded to `shard.vocab_rows(..)`.
    pub embed: Matrix,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rope: Rope,
    pub device: Device,
    pub dtype: DType,
    pub shard: Shard,
    /// Layers whose outputs are the draft side's features (EAGLE-3), low to high; empty: the
    /// last features.
    pub draft_layers: Vec<usize>,
}

/// What a pass gives for one sequence's rows.
pub struct States {
    /// [m, hidden]: the last features, which the LM head reads.
    pub last: Tensor,
    /// [m, draft feature width]: what the draft side reads (`last` itself, or the outputs of
    /// the draft layers side by side).
    pub draft: Tensor,
}

/// The token embedding [vocab, hidden] and the LM head (the embedding itself when tied, or when
/// the checkpoint has no separate `lm_head.weight`).
pub fn load_embed_and_lm_head(w: &Weights, cfg: &ModelConfig) -> Result<(Matrix, Linear)> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let embed = w.get_matrix("model.embed_tokens.weight", &[v, h])?;
    let separate = if cfg.tie_word_embeddings {
        None
    } else {
        w.get_matrix_opt("lm_head.weight", &[v, h])?
    };
    let lm_head = Linear::from_matrix(separate.unwrap_or_else(|| embed.clone()), None)?;
    Ok((embed, lm_head))
}

/// This rank's block of the embedding and LM head: rows `shard.vocab(..)`, zero-padded to
/// `shard.vocab_rows(..)` so every rank's logits block has one width.
fn load_vocab_block(w: &Weights, cfg: &ModelConfig, shard: &Shard) -> Result<(Matrix, Linear)> {
    let (v, h) = (cfg.vocab_size, cfg.hidden_size);
    let rows = shard.vocab(v);
    let pad = shard.vocab_rows(v) - rows.len();
    let block = |name: &str| -> Result<Tensor> {
        let t = w.get_part(name, &[v, h], 0, rows.clone(), false)?;
        Ok(if pad > 0 {
            Tensor::cat(&[t, Tensor::zeros((pad, h), w.dtype, &w.device)?], 0)?
        } else {
            t
        })
    };
    let embed = block("model.embed_tokens.weight")?;
    let separate = !cfg.tie_word_embeddings && w.has("lm_head.weight")?;
    let lm_head = if separate {
        Linear::new(block("lm_head.weight")?, None)?
    } else {
        Linear::new(embed.clone(), None)?
    };
    Ok((Matrix::Dense(embed), lm_head))
}

impl TargetModel {
    /// Loads from HF-named weights. `progress(i, n)` is called after each layer.
    pub fn load(
        src: &dyn WeightSource,
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        TargetModel::load_shard(src, cfg, dtype, device, Shard::single(), progress)
    }

    /// Loads this rank's part of the model: only its slices are read from the weight source
    /// (memory-mapped safetensors copy just those bytes).
    pub fn load_shard(
        src: &dyn WeightSource,
        cfg: ModelConfig,
        dtype: DType,
        device: &Device,
        shard: Shard,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        TargetModel::load_with(src, cfg, dtype, Quant::None, device, shard, progress)
    }

    /// Loads this rank's part with matrices quantized as `quant` says (see [`Quant`]); a
    /// sharded rank loads dense slices.
    pub fn load_with(
        src: &dyn WeightSource,
        cfg: ModelConfig,
        dtype: DType,
        quant: Quant,
        device: &Device,
        shard: Shard,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        cfg.validate()?;
        Shard::check(&cfg, shard.world)?;
        let quant = if shard.is_sharded() {
            Quant::None
        } else {
            quant
        };
        let w = Weights::new(src, dtype, device.clone()).with_quant(quant);
        let h = cfg.hidden_size;
        let (embed, lm_head) = if shard.is_sharded() {
            load_vocab_block(&w, &cfg, &shard)?
        } else {
            load_embed_and_lm_head(&w, &cfg)?
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            layers.push(DecoderLayer::load(
                &w.pp(format!("model.layers.{i}")),
                &cfg,
                true,
                &shard,
            )?);
            progress(i + 1, cfg.num_layers);
        }
        let norm = RmsNorm::load(&w.pp("model"), "norm", h, cfg.rms_norm_eps)?;
        let rope = Rope::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        Ok(TargetModel {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype,
            shard,
            draft_layers: Vec::new(),
        })
    }

    /// Makes the draft features the outputs of `layers` (0-based, low to high) side by side,
    /// as an EAGLE-3 head reads them; empty restores the last features.
    pub fn set_draft_layers(&mut self, layers: &[usize]) -> Result<()> {
        let n = self.cfg.num_layers;
        if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
            return Err(EngineError::Config(format!(
                "draft features from layer {bad}, but the target has {n} layers"
            )));
        }
        if layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EngineError::Config(format!(
                "draft feature layers must rise, low to high: {layers:?}"
            )));
        }
        self.draft_layers = layers.to_vec();
        Ok(())
    }

    /// Values per token of the draft features.
    pub fn draft_feature_width(&self) -> usize {
        self.cfg.hidden_size * self.draft_layers.len().max(1)
    }

    fn cpu(&self) -> bool {
        use_cpu_kernels(&self.device)
    }

    /// A preallocated cache for `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let kv_heads = self.shard.heads(&self.cfg).kv.len();
        KvCache::new(
            self.cfg.num_layers,
            kv_heads * self.cfg.head_dim,
            capacity,
            &self.device,
            self.cpu(),
        )
    }

    /// Token embeddings, [m, hidden] f32. A sharded rank looks up the tokens in its block,
    /// contributes zeros for the others, and the all-reduce fills every row exactly.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Result<Tensor> {
        let v = self.cfg.vocab_size;
        let Some(comm) = self.shard.comm() else {
            return embed_rows(&self.embed, tokens, v, &self.device);
        };
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary of {v}"
            )));
        }
        let rows = self.shard.vocab(v);
        let local: Vec<u32> = tokens
            .iter()
            .map(|&t| {
                if rows.contains(&(t as usize)) {
                    (t as usize - rows.start) as u32
                } else {
                    0
                }
            })
            .collect();
        let mine: Vec<f32> = tokens
            .iter()
            .map(|&t| f32::from(u8::from(rows.contains(&(t as usize)))))
            .collect();
        let x = embed_rows(&self.embed, &local, self.embed.dims()?.0, &self.device)?;
        let mask = Tensor::from_vec(mine, (tokens.len(), 1), &self.device)?;
        comm.all_reduce_tensor(&x.broadcast_mul(&mask)?)
    }

    /// Runs the new `tokens` (at `positions`, attending as `vis` says) through the model,
    /// writing their keys/values at `cache.len()..` and advancing the cache. Returns the
    /// features [m, hidden] in f32.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        positions: &[usize],
        vis: &Visibility,
    ) -> Result<Tensor> {
        let mut one = [Rows {
            cache,
            tokens,
            positions,
            vis,
        }];
        Ok(self.forward_batch(&mut one)?.remove(0))
    }

    /// Checks that `rows` can run: lengths agree, the visibility starts at the cache's end,
    /// and the cache and the model's context have room.
    pub fn check_rows(&self, rows: &Rows<'_>) -> Result<()> {
        let m = rows.tokens.len();
        let (cache, vis) = (&rows.cache, rows.vis);
        if m == 0 || rows.positions.len() != m || vis.len() != m || vis.prefix != cache.len() {
            return Err(EngineError::InvalidRequest(format!(
                "forward: {m} tokens, {} positions, {} visibility rows, prefix {} vs cache {}",
                rows.positions.len(),
                vis.len(),
                vis.prefix,
                cache.len()
            )));
        }
        cache.reserve(m)?;
        if let Some(&p) = rows.positions.iter().max() {
            if p >= self.cfg.max_position_embeddings {
                return Err(EngineError::ContextOverflow {
                    needed: p + 1,
                    limit: self.cfg.max_position_embeddings,
                });
            }
        }
        Ok(())
    }

    /// One pass over the new rows of several sequences (iteration-level batching): on the CPU
    /// kernels every matmul runs once over the rows of all of them, and attention runs per
    /// sequence over its own cache. A row's result never depends on the other rows (see
    /// `crate::kernels`), so each sequence gets the same bits as alone. Returns each
    /// sequence's features [m_i, hidden] in f32. Any row set that fails [`check_rows`] fails
    /// the whole pass: check them first to refuse one alone.
    ///
    /// [`check_rows`]: TargetModel::check_rows
    pub fn forward_batch(&self, batch: &mut [Rows<'_>]) -> Result<Vec<Tensor>> {
        Ok(self
            .forward_batch_states(batch)?
            .into_iter()
            .map(|s| s.last)
            .collect())
    }

    /// [`TargetModel::forward_batch`] that also returns the draft features of every row.
    pub fn forward_batch_states(&self, batch: &mut [Rows<'_>]) -> Result<Vec<States>> {
        for rows in batch.iter() {
            self.check_rows(rows)?;
        }
        if !self.cpu() {
            // The device path runs one sequence at a time (batched GPU passes: issue 18).
            return batch.iter_mut().map(|r| self.forward_device(r)).collect();
        }
        let starts: Vec<usize> = batch.iter().map(|r| r.cache.len()).collect();
        let tokens: Vec<u32> = batch
            .iter()
            .flat_map(|r| r.tokens.iter().copied())
            .collect();
        let positions: Vec<usize> = batch
            .iter()
            .flat_map(|r| r.positions.iter().copied())
            .collect();
        let m = tokens.len();
        let rope = self.rope.at(&positions);
        let h = self.cfg.hidden_size;
        let mut x = self
            .embed_tokens(&tokens)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut kept: Vec<Vec<f32>> = Vec::with_capacity(self.draft_layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let mut parts: Vec<KvPart<'_>> = batch
                .iter_mut()
                .zip(&starts)
                .map(|(r, &start)| KvPart {
                    kv: &mut r.cache.layers[l],
                    start,
                    vis: r.vis,
                })
                .collect();
            x = layer.forward_cpu(x, m, &rope, &mut parts)?;
            if self.draft_layers.contains(&l) {
                kept.push(x.clone());
            }
        }
        let x = self.norm.forward_cpu(&x)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut row = 0;
        for r in batch.iter_mut() {
            let n = r.tokens.len();
            let last = Tensor::from_slice(&x[row * h..(row + n) * h], (n, h), &self.device)?;
            let draft = if kept.is_empty() {
                last.clone()
            } else {
                // Row i: the kept layers' outputs of row i, low to high.
                let mut d = Vec::with_capacity(n * h * kept.len());
                for i in row..row + n {
                    for k in &kept {
                        d.extend_from_slice(&k[i * h..(i + 1) * h]);
                    }
                }
                Tensor::from_vec(d, (n, h * kept.len()), &self.device)?
            };
            out.push(States { last, draft });
            r.cache.advance(n);
            row += n;
        }
        Ok(out)
    }

    /// The device-generic path for one sequence.
    fn forward_device(&self, r: &mut Rows<'_>) -> Result<States> {
        let start = r.cache.len();
        let rope = self.rope.at(r.positions);
        let mut x = self.embed_tokens(r.tokens)?;
        let mut kept = Vec::with_capacity(self.draft_layers.len());
        for (l, (layer, kv)) in self
            .layers
            .iter()
            .zip(r.cache.layers.iter_mut())
            .enumerate()
        {
            x = layer.forward(&x, &rope, kv, start, r.vis)?;
            if self.draft_layers.contains(&l) {
                kept.push(x.to_dtype(DType::F32)?);
            }
        }
        r.cache.advance(r.tokens.len());
        let last = self.norm.forward(&x)?;
        let draft = if kept.is_empty() {
            last.clone()
        } else {
            Tensor::cat(&kept, 1)?
        };
        Ok(States { last, draft })
    }

    /// LM head over features [m, hidden] -> logits [m, vocab] f32. A sharded rank computes its
    /// vocabulary block and the all-gather puts the blocks side by side on every rank.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let local = lm_head(&self.lm_head, features, self.cpu())?;
        let Some(comm) = self.shard.comm() else {
            return Ok(local);
        };
        let (m, rows) = local.dims2()?;
        let all = comm.all_gather_tensor(&local)?; // [world, m, rows]
        Ok(all
            .transpose(0, 1)?
            .reshape((m, self.shard.world * rows))?
            .narrow(1, 0, self.cfg.vocab_size)?
            .contiguous()?)
    }
}

/// Applies an LM head (CPU kernel or generic) to [m, hidden] f32 features.
pub fn lm_head(head: &Linear, features: &Tensor, cpu: bool) -> Result<Tensor> {
    let m = features.dim(0)?;
    if cpu {
        let x = features.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let y = head.forward_cpu(&x, m)?;
        Ok(Tensor::from_vec(y, (m, head.out_dim), features.device())?)
    } else {
        head.forward(features)
    }
}

/// Gathers rows of an embedding table into [m, hidden] f32, checking ids.
pub fn embed_rows(table: &Matrix, tokens: &[u32], vocab: usize, device: &Device) -> Result<Tensor> {
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(EngineError::InvalidRequest(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let table = match table {
        Matrix::Dense(t) => t,
        Matrix::Quant(q) => {
            let mut out = vec![0f32; tokens.len() * q.k];
            for (&id, row) in tokens.iter().zip(out.chunks_exact_mut(q.k)) {
                q.dequantize_row(id as usize, row);
            }
            return Ok(Tensor::from_vec(out, (tokens.len(), q.k), device)?);
        }
    };
    let h = table.dim(1)?;
    if device.is_cpu() {
        fn gather<T: WeightElem>(t: &[T], tokens: &[u32], h: usize) -> Vec<f32> {
            let mut out = Vec::with_capacity(tokens.len() * h);
            for &id in tokens {
                out.extend(
                    t[id as usize * h..(id as usize + 1) * h]
                        .iter()
                        .map(|v| v.to_f32()),
                );
            }
            out
        }
        let out = match table.dtype() {
            DType::F32 => with_cpu_slice::<f32, _>(table, |t| gather(t, tokens, h))?,
            DType::BF16 => with_cpu_slice::<bf16, _>(table, |t| gather(t, tokens, h))?,
            DType::F16 => with_cpu_slice::<f16, _>(table, |t| gather(t, tokens, h))?,
            other => {
                return Err(EngineError::Config(format!(
                    "unsupported embedding dtype {other:?}"
                )))
            }
        };
        return Ok(Tensor::from_vec(out, (tokens.len(), h), device)?);
    }
    let ids = Tensor::new(tokens, device)?;
    Ok(table.index_select(&ids, 0)?.to_dtype(DType::F32)?)
}
