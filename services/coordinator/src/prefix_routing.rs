//! Cache-aware routing: a new session goes where its prompt's prefix is most likely cached,
//! weighed against load (after SGLang's cache-aware router, which keeps an approximate radix
//! tree of what it sent to each worker, and NVIDIA Dynamo's KV-aware router).
//!
//! The coordinator remembers, per worker group, the chained keys of the 32-token blocks of the
//! prompts (and answers) it sent there, least recently used first out, `MAX_BLOCKS` per group.
//! It is an estimate: the worker's own prefix cache decides what is really reused (and confirms
//! it token by token), so a wrong guess costs only speed, never correctness.
//!
//! The rule (documented in README, "Automatic prefix caching"): each usable group scores
//! `cached - LOAD_TOKENS * load`, where `cached` is how many leading prompt tokens it is
//! believed to hold and `load` its sessions (live and queued, as routing counts them); the
//! highest score wins, then the lowest load, then the name. With nothing cached anywhere this
//! is least-loaded routing, as before. One more session of load costs as much as 256 prompt
//! tokens to prefill: on the CPU a pass over a session's next tree costs about what a 64-token
//! prompt chunk costs, and a session stays for many passes, so a group must save a real
//! prefill to be worth the extra queueing.

use std::collections::HashMap;
use std::sync::Mutex;

/// Tokens per block (the worker's `prefix_cache::BLOCK_TOKENS`).
pub const BLOCK_TOKENS: usize = 32;
/// Prompt tokens one session of load is worth.
pub const LOAD_TOKENS: usize = 256;
/// Blocks remembered per group.
pub const MAX_BLOCKS: usize = 16_384;

/// The chained keys of `tokens`' full blocks (FNV-1a over the previous key and the block).
pub fn block_keys(tokens: &[u32]) -> Vec<u64> {
    let mut keys = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for block in tokens.chunks_exact(BLOCK_TOKENS) {
        for t in block {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        keys.push(h);
    }
    keys
}

#[derive(Default)]
struct Group {
    /// Key -> last use.
    blocks: HashMap<u64, u64>,
}

/// Why a group was chosen, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The session's own placement (a multi-turn `session_id`).
    Session,
    /// A cached prefix outweighed load.
    Prefix,
    /// The least loaded group (nothing cached, or not enough to matter).
    Load,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Session => "session",
            Reason::Prefix => "prefix",
            Reason::Load => "load",
        }
    }
}

#[derive(Default)]
pub struct PrefixIndex {
    inner: Mutex<(u64, HashMap<String, Group>)>,
}

impl PrefixIndex {
    /// How many leading tokens of the prompt with block `keys` group `name` is believed to
    /// hold.
    pub fn cached(&self, name: &str, keys: &[u64]) -> usize {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.get(name).map_or(0, |g| {
            keys.iter().take_while(|k| g.blocks.contains_key(k)).count() * BLOCK_TOKENS
        })
    }

    /// Remembers that group `name` now holds the blocks `keys`.
    pub fn record(&self, name: &str, keys: &[u64]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0 += 1;
        let clock = g.0;
        let group = g.1.entry(name.to_string()).or_default();
        for k in keys {
            group.blocks.insert(*k, clock);
        }
        if group.blocks.len() > MAX_BLOCKS {
            let mut by_age: Vec<(u64, u64)> = group.blocks.iter().map(|(k, t)| (*t, *k)).collect();
            by_age.sort_unstable();
            let excess = group.blocks.len() - MAX_BLOCKS * 3 / 4;
            for (_, k) in by_age.into_iter().take(excess) {
                group.blocks.remove(&k);
            }
        }
    }

    /// Forgets a group (it failed: its caches are gone or unreachable).
    pub fn forget(&self, name: &str) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.1.remove(name);
    }

    /// Picks among `(name, load)` candidates by the rule above; `None` when there are none.
    pub fn pick<'a>(
        &self,
        keys: &[u64],
        candidates: &[(&'a str, usize)],
    ) -> Option<(&'a str, Reason)> {
        let scored: Vec<(&str, usize, i64)> = candidates
            .iter()
            .map(|&(n, load)| {
                let cached = self.cached(n, keys);
                (n, load, cached as i64 - (LOAD_TOKENS * load) as i64)
            })
            .collect();
        let least = scored.iter().min_by_key(|(n, load, _)| (*load, *n))?;
        let best = scored
            .iter()
            .max_by(|a, b| a.2.cmp(&b.2).then(b.1.cmp(&a.1)).then(b.0.cmp(a.0)))?;
        Some(if best.0 == least.0 {
            (least.0, Reason::Load)
        } else {
            (best.0, Reason::Prefix)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    #[test]
    fn keys_chain_over_the_whole_prefix() {
        let a = block_keys(&prompt(1, 100));
        assert_eq!(a.len(), 3);
        let mut other = prompt(1, 100);
        other[0] = 7;
        let b = block_keys(&other);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "a change in block 0 changes every key"
        );
        assert_eq!(block_keys(&prompt(1, 64)), a[..2]);
    }

    #[test]
    fn a_cached_prefix_outweighs_a_little_load_only() {
        let idx = PrefixIndex::default();
        let long = block_keys(&prompt(1, 640));
        idx.record("b", &long);
        // Nothing cached: the least loaded, then by name.
        let none = block_keys(&prompt(2, 640));
        assert_eq!(
            idx.pick(&none, &[("a", 0), ("b", 0)]),
            Some(("a", Reason::Load))
        );
        assert_eq!(
            idx.pick(&none, &[("a", 1), ("b", 0)]),
            Some(("b", Reason::Load))
        );
        // 640 cached tokens on b outweigh two sessions of load, not three.
        assert_eq!(
            idx.pick(&long, &[("a", 0), ("b", 2)]),
            Some(("b", Reason::Prefix))
        );
        assert_eq!(
            idx.pick(&long, &[("a", 0), ("b", 3)]),
            Some(("a", Reason::Load))
        );
        // b least loaded and cached: chosen for load.
        assert_eq!(
            idx.pick(&long, &[("a", 1), ("b", 0)]),
            Some(("b", Reason::Load))
        );
        assert_eq!(idx.cached("b", &long[..5]), 160);
        idx.forget("b");
        assert_eq!(idx.cached("b", &long), 0);
        assert_eq!(idx.pick(&long, &[]), None);
    }

    #[test]
    fn memory_per_group_is_bounded_and_keeps_the_recent() {
        let idx = PrefixIndex::default();
        for s in 0..(MAX_BLOCKS / 10 + 20) as u32 {
            idx.record("g", &block_keys(&prompt(s, 320)));
        }
        let inner = idx.inner.lock().unwrap();
        assert!(inner.1["g"].blocks.len() <= MAX_BLOCKS);
        drop(inner);
        let last = block_keys(&prompt((MAX_BLOCKS / 10 + 19) as u32, 320));
        assert_eq!(idx.cached("g", &last), 320);
    }
}
