//! One rank's share of a model: which heads, which MLP columns and which vocabulary rows it
//! holds, and the collective it meets the other ranks in. [`Shard::check`] refuses degrees the
//! model cannot be split by, at start, with a message that says why.

use std::ops::Range;
use std::sync::Arc;

use super::Collective;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};

#[derive(Clone, Debug)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
    /// `None` for an unsharded model.
    pub comm: Option<Arc<dyn Collective>>,
}

/// The heads one rank computes attention for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSplit {
    /// Query heads, in the model's numbering.
    pub q: Range<usize>,
    /// KV heads, in the model's numbering (one replicated head when the degree exceeds the
    /// KV-head count).
    pub kv: Range<usize>,
}

impl Shard {
    /// The whole model in one process.
    pub fn single() -> Shard {
        Shard {
            rank: 0,
            world: 1,
            comm: None,
        }
    }

    /// The rank of `comm` in its group.
    pub fn of(comm: Arc<dyn Collective>) -> Shard {
        Shard {
            rank: comm.rank(),
            world: comm.world(),
            comm: Some(comm),
        }
    }

    /// Whether this rank meets others in collectives (a group of one with a collective runs
    /// the sharded code path, which is how a single GPU exercises NCCL).
    pub fn is_sharded(&self) -> bool {
        self.comm.is_some()
    }

    /// Whether `cfg` splits over `world` ranks; the error names the dimension that does not.
    pub fn check(cfg: &ModelConfig, world: usize) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if world == 0 {
            return bad("the tensor-parallel degree must be at least 1".into());
        }
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        if !nh.is_multiple_of(world) {
            return bad(format!(
                "tensor-parallel degree {world} does not divide the {nh} attention heads \
                 (degrees that do: {})",
                divisors(nh)
            ));
        }
        if world <= nkv && !nkv.is_multiple_of(world) {
            return bad(format!(
                "tensor-parallel degree {world} does not divide the {nkv} key/value heads"
            ));
        }
        if world > nkv && !world.is_multiple_of(nkv) {
            return bad(format!(
                "tensor-parallel degree {world} exceeds the {nkv} key/value heads but is not a \
                 multiple of them, so they cannot be replicated evenly"
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(world) {
            return bad(format!(
                "tensor-parallel degree {world} does not divide the MLP width {}",
                cfg.intermediate_size
            ));
        }
        Ok(())
    }

    pub fn heads(&self, cfg: &ModelConfig) -> HeadSplit {
        let (nh, nkv, w, r) = (cfg.num_heads, cfg.num_kv_heads, self.world, self.rank);
        let per = nh / w;
        let kv = if w <= nkv {
            let kper = nkv / w;
            r * kper..(r + 1) * kper
        } else {
            let k = r / (w / nkv);
            k..k + 1
        };
        HeadSplit {
            q: r * per..(r + 1) * per,
            kv,
        }
    }

    /// This rank's block of `n` (which `check` made divisible).
    pub fn block(&self, n: usize) -> Range<usize> {
        let per = n / self.world;
        self.rank * per..(self.rank + 1) * per
    }

    /// Rows per rank of a vocab-parallel matrix (the last block is zero-padded).
    pub fn vocab_rows(&self, vocab: usize) -> usize {
        vocab.div_ceil(self.world)
    }

    /// The vocabulary ids this rank holds.
    pub fn vocab(&self, vocab: usize) -> Range<usize> {
        let per = self.vocab_rows(vocab);
        (self.rank * per).min(vocab)..((self.rank + 1) * per).min(vocab)
    }

    /// The collective, when sharded.
    pub fn comm(&self) -> Option<&Arc<dyn Collective>> {
        self.comm.as_ref()
    }
}

fn divisors(n: usize) -> String {
    (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;

    fn cfg(nh: usize, nkv: usize, f: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            hidden_size: nh * 8,
            intermediate_size: f,
            num_layers: 1,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            vocab_size: 10,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
            num_experts: 0,
            num_experts_per_tok: 0,
        }
    }

    fn at(rank: usize, world: usize) -> Shard {
        Shard {
            rank,
            world,
            comm: None,
        }
    }

    #[test]
    fn degrees_that_do_not_divide_are_refused() {
        // SmolLM2-135M: 9 heads, 3 KV heads.
        let smol = cfg(9, 3, 1536);
        assert!(Shard::check(&smol, 3).is_ok());
        let e = Shard::check(&smol, 2).unwrap_err().to_string();
        assert!(e.contains("does not divide the 9 attention heads"), "{e}");
        assert!(e.contains("1, 3, 9"), "{e}");
        // 64 heads / 8 KV heads (LLaMA-2-70B) at 16: KV heads replicated twice.
        assert!(Shard::check(&cfg(64, 8, 28672), 16).is_ok());
        assert!(Shard::check(&cfg(12, 8, 48), 12).is_err());
        assert!(Shard::check(&cfg(8, 8, 30), 4).is_err());
    }

    #[test]
    fn heads_split_or_replicate() {
        let c = cfg(8, 2, 16);
        assert_eq!(at(1, 2).heads(&c), HeadSplit { q: 4..8, kv: 1..2 });
        // Degree 4 over 2 KV heads: ranks 0,1 share KV head 0; ranks 2,3 share head 1.
        assert_eq!(at(1, 4).heads(&c).kv, 0..1);
        assert_eq!(at(2, 4).heads(&c), HeadSplit { q: 4..6, kv: 1..2 });
        // Every query head's KV head (q / (8 / 2)) is the one its rank holds.
        for r in 0..4 {
            let h = at(r, 4).heads(&c);
            for q in h.q.clone() {
                assert!(h.kv.contains(&(q / 4)));
            }
        }
    }

    #[test]
    fn vocab_blocks_cover_the_vocabulary_once() {
        for world in 1..6 {
            let ids: Vec<usize> = (0..world).flat_map(|r| at(r, world).vocab(10)).collect();
            assert_eq!(ids, (0..10).collect::<Vec<_>>());
        }
        assert_eq!(at(3, 4).vocab(10), 9..10);
        assert_eq!(at(0, 4).vocab_rows(10), 3);
    }
}
