//! Automatic prefix caching: the KV of prompts (and finished conversations) kept in fixed-size
//! blocks of tokens, so a later request that starts with the same tokens (a shared system
//! prompt, a few-shot preamble, the earlier turns of a conversation) prefills only the rest.
//! After vLLM's automatic prefix caching (a hash per full block, chained over the prefix) and
//! SGLang's RadixAttention (reuse across requests, least recently used leaves go first).
//!
//! Invariants:
//! - Block `d` of a sequence holds the keys, values and wire features of its tokens
//!   `d*B..(d+1)*B`, keyed by a hash chained over every token up to the block's end
//!   (`eagle_proto::prefix`, the keys the coordinator routes by; one store serves one model). A hit is confirmed token by token along the whole chain (each block
//!   keeps its tokens and its parent's key), so a hash collision costs a miss, never wrong KV.
//! - With the engine's batch-invariant kernels a token's KV depends on its prefix only, so the
//!   rows restored from a block are the bits a fresh prefill would write (tested through the
//!   cluster: outputs equal with the cache on and off).
//! - Blocks are copied into a session's own cache on a hit and copied out when inserted: a
//!   session never holds a reference into the store, so no block is ever in use while it could
//!   be evicted, and eviction never touches a running session.
//! - The store stays within its byte budget. Eviction takes the least recently used block,
//!   the deepest first among equals; a lookup or insert touches the whole chain, so a parent
//!   is never older than its children and leaves go before the blocks they extend.
//! - One insert may take at most a quarter of the budget (`MAX_SHARE`): a huge or hostile
//!   prompt cannot flush everyone else's blocks.

use std::collections::HashMap;

use eagle_engine::kv_cache::KvRows;
pub use eagle_proto::prefix::BLOCK_TOKENS;
use eagle_proto::prefix::{chain, ROOT};

/// The share of the budget one insert may take.
const MAX_SHARE: f64 = 0.25;

struct Block {
    parent: Option<u64>,
    depth: usize,
    tokens: Vec<u32>,
    kv: KvRows,
    features: Vec<u8>,
    used: u64,
    bytes: usize,
}

/// What a lookup found: blocks `from_block..` of the prompt, in order.
pub struct Hit<'a> {
    pub from_block: usize,
    pub blocks: Vec<(&'a [u32], &'a KvRows, &'a [u8])>,
}

/// Counters since start, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Prompt tokens looked up, and those found cached (including a session's own reuse).
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    pub inserted_blocks: u64,
    pub evicted_blocks: u64,
}

pub struct PrefixCache {
    block: usize,
    budget: usize,
    bytes: usize,
    clock: u64,
    blocks: HashMap<u64, Block>,
    stats: Stats,
}

impl PrefixCache {
    /// A store of at most `budget` bytes, in blocks of `block` tokens.
    pub fn new(budget: usize, block: usize) -> Self {
        PrefixCache {
            block: block.max(1),
            budget,
            bytes: 0,
            clock: 0,
            blocks: HashMap::new(),
            stats: Stats::default(),
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    fn key(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        chain(parent.unwrap_or(ROOT), tokens)
    }

    /// The keys of the `max` most recently used blocks, parents before their children: what
    /// the worker publishes for cache-aware routing.
    pub fn summary(&self, max: usize) -> Vec<u64> {
        let mut v: Vec<(u64, usize, u64)> = self
            .blocks
            .iter()
            .map(|(k, b)| (b.used, b.depth, *k))
            .collect();
        v.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        v.into_iter().take(max).map(|(_, _, k)| k).collect()
    }

    /// The confirmed chain of `tokens`' full blocks, as keys, up to `max_blocks`.
    fn chain(&self, tokens: &[u32], max_blocks: usize) -> Vec<u64> {
        let mut keys = Vec::new();
        let mut parent = None;
        for (d, t) in tokens.chunks_exact(self.block).take(max_blocks).enumerate() {
            let k = self.key(parent, t);
            match self.blocks.get(&k) {
                Some(b) if b.parent == parent && b.depth == d && b.tokens == t => keys.push(k),
                _ => break,
            }
            parent = Some(k);
        }
        keys
    }

    fn touch(&mut self, keys: &[u64]) {
        self.clock += 1;
        for k in keys {
            if let Some(b) = self.blocks.get_mut(k) {
                b.used = self.clock;
            }
        }
    }

    /// Looks `prompt` up. `kept` tokens are already in the session's cache (its own earlier
    /// turn); at least the last prompt token is left to run, since its logits choose the next
    /// token. Returns the blocks to restore after the session's first `from_block` blocks, or
    /// `None` when the store holds no more than the session does.
    pub fn lookup(&mut self, prompt: &[u32], kept: usize) -> Option<Hit<'_>> {
        self.stats.queried_tokens += prompt.len() as u64;
        let usable = prompt.len().saturating_sub(1) / self.block;
        let keys = self.chain(prompt, usable);
        let found = keys.len() * self.block;
        if found <= kept {
            self.stats.hit_tokens += kept as u64;
            self.touch(&keys);
            return None;
        }
        self.stats.hit_tokens += found as u64;
        self.touch(&keys);
        let from_block = kept / self.block;
        let blocks = keys[from_block..]
            .iter()
            .map(|k| {
                let b = &self.blocks[k];
                (b.tokens.as_slice(), &b.kv, b.features.as_slice())
            })
            .collect();
        Some(Hit { from_block, blocks })
    }

    /// Offers a sequence's full blocks: `tokens` are what its cache holds, `read(from, to)` copies
    /// out the KV rows and wire features of those slots. Blocks already stored are only touched;
    /// new ones are copied in, evicting the least recently used others, within `MAX_SHARE` of
    /// the budget for this one call. Returns how many blocks were added.
    pub fn insert<E>(
        &mut self,
        tokens: &[u32],
        mut read: impl FnMut(usize, usize) -> Result<(KvRows, Vec<u8>), E>,
    ) -> Result<usize, E> {
        let mut keys = Vec::new();
        let mut parent = None;
        let mut added_bytes = 0usize;
        let share = (self.budget as f64 * MAX_SHARE) as usize;
        let mut added = 0;
        for (d, t) in tokens.chunks_exact(self.block).enumerate() {
            let k = self.key(parent, t);
            match self.blocks.get(&k) {
                Some(b) if b.parent == parent && b.depth == d && b.tokens == t => {}
                // The key is taken by another chain (a collision): stop here, keep theirs.
                Some(_) => break,
                None => {
                    let (kv, features) = read(d * self.block, (d + 1) * self.block)?;
                    let bytes = kv.bytes() + features.len() + t.len() * 4;
                    if added_bytes + bytes > share || bytes > self.budget {
                        break;
                    }
                    self.touch(&keys);
                    if !self.make_room(bytes) {
                        break;
                    }
                    added_bytes += bytes;
                    self.bytes += bytes;
                    self.clock += 1;
                    self.blocks.insert(
                        k,
                        Block {
                            parent,
                            depth: d,
                            tokens: t.to_vec(),
                            kv,
                            features,
                            used: self.clock,
                            bytes,
                        },
                    );
                    self.stats.inserted_blocks += 1;
                    added += 1;
                }
            }
            keys.push(k);
            parent = Some(k);
        }
        self.touch(&keys);
        Ok(added)
    }

    /// Evicts until `bytes` more fit; false if they cannot.
    fn make_room(&mut self, bytes: usize) -> bool {
        while self.bytes + bytes > self.budget {
            let Some((&k, _)) = self
                .blocks
                .iter()
                .min_by_key(|(_, b)| (b.used, std::cmp::Reverse(b.depth)))
            else {
                return false;
            };
            let b = self.blocks.remove(&k).expect("a stored key");
            self.bytes -= b.bytes;
            self.stats.evicted_blocks += 1;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One layer, kv_dim 1: a token's "KV" is its id and its position, so restored rows show
    /// exactly which slots they came from.
    fn rows(tokens: &[u32], from: usize, to: usize) -> Result<(KvRows, Vec<u8>), ()> {
        let k: Vec<f32> = tokens[from..to].iter().map(|&t| t as f32).collect();
        let v: Vec<f32> = (from..to).map(|p| p as f32).collect();
        let f: Vec<u8> = tokens[from..to].iter().map(|&t| t as u8).collect();
        Ok((
            KvRows {
                rows: to - from,
                layers: vec![(k, v)],
            },
            f,
        ))
    }

    fn block_bytes(b: usize) -> usize {
        b * 4 * 2 + b + b * 4
    }

    fn offer(c: &mut PrefixCache, tokens: &[u32]) -> usize {
        c.insert(tokens, |a, b| rows(tokens, a, b)).unwrap()
    }

    #[test]
    fn a_prompt_reuses_its_longest_cached_prefix_and_leaves_the_last_token() {
        let mut c = PrefixCache::new(1 << 20, 4);
        let a: Vec<u32> = (0..10).collect();
        assert_eq!(offer(&mut c, &a), 2);
        // The same 8 tokens then others: both blocks restored, in order.
        let mut b: Vec<u32> = (0..8).collect();
        b.extend([50, 51, 52]);
        let hit = c.lookup(&b, 0).unwrap();
        assert_eq!(hit.from_block, 0);
        assert_eq!(hit.blocks.len(), 2);
        assert_eq!(hit.blocks[1].0, &[4, 5, 6, 7]);
        assert_eq!(hit.blocks[1].1.layers[0].1, vec![4.0, 5.0, 6.0, 7.0]);
        // Exactly 8 tokens: the last must run, so only the first block is used.
        let hit = c.lookup(&b[..8], 0).unwrap();
        assert_eq!(hit.blocks.len(), 1);
        // A change inside block 1 keeps block 0 only; inside block 0, nothing.
        let mut d = b.clone();
        d[5] = 99;
        assert_eq!(c.lookup(&d, 0).unwrap().blocks.len(), 1);
        d[1] = 99;
        assert!(c.lookup(&d, 0).is_none());
        // A session that already holds 6 tokens gets the blocks from its own block 1 on.
        let hit = c.lookup(&b, 6).unwrap();
        assert_eq!((hit.from_block, hit.blocks.len()), (1, 1));
        assert!(c.lookup(&b, 8).is_none());
        let s = c.stats();
        assert_eq!(s.queried_tokens, 11 + 8 + 11 + 11 + 11 + 11);
        // Hits: 8, 4, 4, none, 8, and the session's own 8.
        assert_eq!(s.hit_tokens, 32);
    }

    #[test]
    fn other_prefixes_never_match_and_keys_are_the_routers() {
        let mut c = PrefixCache::new(1 << 20, 4);
        let a: Vec<u32> = (0..9).collect();
        offer(&mut c, &a);
        // The same second block after another first block: a different chain.
        let mut b = a.clone();
        b[0] = 7;
        assert!(c.lookup(&b, 0).is_none());
        // The keys are the coordinator's.
        let mut c32 = PrefixCache::new(1 << 30, BLOCK_TOKENS);
        let long: Vec<u32> = (0..100).collect();
        offer(&mut c32, &long);
        let mut s = c32.summary(8);
        s.sort_unstable();
        let mut want = eagle_proto::prefix::block_keys(&long);
        want.sort_unstable();
        assert_eq!(s, want);
        assert_eq!(
            c32.summary(1),
            vec![eagle_proto::prefix::block_keys(&long)[0]]
        );
    }

    #[test]
    fn a_collision_is_confirmed_against_the_tokens() {
        let mut c = PrefixCache::new(1 << 20, 4);
        let a: Vec<u32> = (0..5).collect();
        offer(&mut c, &a);
        // Forge a collision: another prompt's first block stored under a's key.
        let k = c.key(None, &a[..4]);
        c.blocks.get_mut(&k).unwrap().tokens = vec![9, 9, 9, 9];
        assert!(c.lookup(&a, 0).is_none());
        // Inserting a's block again does not overwrite the other chain's block.
        assert_eq!(offer(&mut c, &a), 0);
        assert_eq!(c.blocks[&k].tokens, vec![9, 9, 9, 9]);
    }

    #[test]
    fn least_recently_used_leaves_go_first_within_the_budget() {
        let b = 4;
        // Room for 8 blocks; one insert may take 2.
        let mut c = PrefixCache::new(8 * block_bytes(b), b);
        let prompts: Vec<Vec<u32>> = (0..4u32)
            .map(|p| (0..9).map(|i| p * 100 + i).collect())
            .collect();
        for p in &prompts {
            assert_eq!(offer(&mut c, p), 2);
        }
        assert_eq!((c.len(), c.bytes()), (8, 8 * block_bytes(b)));
        // Use prompt 0 again, then add a fifth: prompt 1 (least recent) loses its leaf first,
        // then its root.
        assert!(c.lookup(&prompts[0], 0).is_some());
        let fifth: Vec<u32> = (0..9).map(|i| 500 + i).collect();
        assert_eq!(offer(&mut c, &fifth), 2);
        assert_eq!(c.len(), 8);
        assert!(c.lookup(&prompts[1], 0).is_none());
        assert_eq!(c.lookup(&prompts[0], 0).unwrap().blocks.len(), 2);
        assert_eq!(c.lookup(&prompts[2], 0).unwrap().blocks.len(), 2);
        assert_eq!(c.stats().evicted_blocks, 2);
        assert!(c.bytes() <= c.budget());
    }

    #[test]
    fn one_huge_prompt_takes_at_most_its_share() {
        let b = 4;
        let mut c = PrefixCache::new(8 * block_bytes(b), b);
        let small: Vec<u32> = (0..9).map(|i| 1000 + i).collect();
        offer(&mut c, &small);
        let huge: Vec<u32> = (0..400).collect();
        assert_eq!(offer(&mut c, &huge), 2);
        assert_eq!(c.lookup(&small, 0).unwrap().blocks.len(), 2);
        // A budget smaller than a block stores nothing.
        let mut tiny = PrefixCache::new(10, b);
        assert_eq!(offer(&mut tiny, &huge), 0);
        assert!(tiny.is_empty());
    }
}
