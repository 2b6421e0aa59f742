//! Cache-aware routing: a new session goes where its prompt's prefix is most likely cached,
//! weighed against load (after SGLang's cache-aware router, which keeps an approximate radix
//! tree of what it sent to each worker, and NVIDIA Dynamo's KV-aware router).
//!
//! The coordinator remembers, per worker group, the chained keys of the 32-token blocks of the
//! prompts it sent there, least recently used first out, `MAX_BLOCKS` per group. With etcd,
//! each worker also publishes the keys of the blocks its prefix cache holds (its membership
//! record's `prefixes`), so every coordinator sees what the others sent; a group counts the
//! higher of the two estimates. Either is a hint: the worker's own prefix cache decides what
//! is really reused (and confirms it token by token), so a wrong guess costs only speed, never
//! correctness.
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

pub use eagle_proto::prefix::{block_keys, BLOCK_TOKENS};

/// Prompt tokens one session of load is worth.
pub const LOAD_TOKENS: usize = 256;
/// Blocks remembered per group.
pub const MAX_BLOCKS: usize = 16_384;

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

    /// Picks among `(name, load, published)` candidates by the rule above, `published` being
    /// the cached tokens the group's own summary shows (0 without one; the higher of it and
    /// this index's estimate counts); `None` when there are none.
    pub fn pick<'a>(
        &self,
        keys: &[u64],
        candidates: &[(&'a str, usize, usize)],
    ) -> Option<(&'a str, Reason)> {
        let scored: Vec<(&str, usize, i64)> = candidates
            .iter()
            .map(|&(n, load, published)| {
                let cached = self.cached(n, keys).max(published);
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
    fn a_cached_prefix_outweighs_a_little_load_only() {
        let idx = PrefixIndex::default();
        let long = block_keys(&prompt(1, 640));
        idx.record("b", &long);
        // Nothing cached: the least loaded, then by name.
        let none = block_keys(&prompt(2, 640));
        assert_eq!(
            idx.pick(&none, &[("a", 0, 0), ("b", 0, 0)]),
            Some(("a", Reason::Load))
        );
        assert_eq!(
            idx.pick(&none, &[("a", 1, 0), ("b", 0, 0)]),
            Some(("b", Reason::Load))
        );
        // 640 cached tokens on b outweigh two sessions of load, not three.
        assert_eq!(
            idx.pick(&long, &[("a", 0, 0), ("b", 2, 0)]),
            Some(("b", Reason::Prefix))
        );
        assert_eq!(
            idx.pick(&long, &[("a", 0, 0), ("b", 3, 0)]),
            Some(("a", Reason::Load))
        );
        // b least loaded and cached: chosen for load.
        assert_eq!(
            idx.pick(&long, &[("a", 1, 0), ("b", 0, 0)]),
            Some(("b", Reason::Load))
        );
        assert_eq!(idx.cached("b", &long[..5]), 160);
        // What a group publishes counts as well: a's summary shows 640 tokens.
        assert_eq!(
            idx.pick(&none, &[("a", 2, 640), ("b", 0, 0)]),
            Some(("a", Reason::Prefix))
        );
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
