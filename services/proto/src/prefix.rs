//! Prefix block keys, shared by the worker's prefix cache and the coordinator's cache-aware
//! routing (and published in etcd between them), so both name a block the same way.
//!
//! Invariant: block `d` of a token sequence is keyed by FNV-1a (64-bit) run over every token of
//! blocks `0..=d`, little-endian, from the FNV offset basis: a key names the whole prefix up to
//! its block's end, so equal keys mean equal prefixes unless the hash collides. Keys are hints:
//! the worker confirms a hit token by token before reusing any KV.

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 32;

/// The key before any block (FNV-1a's offset basis).
pub const ROOT: u64 = 0xcbf2_9ce4_8422_2325;

/// The key of `block` after the prefix keyed `parent` ([`ROOT`] for the first block).
pub fn chain(parent: u64, block: &[u32]) -> u64 {
    let mut h = parent;
    for t in block {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The keys of `tokens`' full blocks, in order.
pub fn block_keys(tokens: &[u32]) -> Vec<u64> {
    let mut keys = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
    let mut h = ROOT;
    for block in tokens.chunks_exact(BLOCK_TOKENS) {
        h = chain(h, block);
        keys.push(h);
    }
    keys
}

/// Keys as etcd records carry them: 16 lowercase hex digits each, run together (one string:
/// cheap to copy and compare, and JSON numbers lose 64-bit precision in many readers).
pub fn pack(keys: &[u64]) -> String {
    keys.iter().map(|k| format!("{k:016x}")).collect()
}

/// The keys of a [`pack`]ed string; a malformed one yields none.
pub fn unpack(s: &str) -> Vec<u64> {
    if !s.len().is_multiple_of(16) || !s.is_ascii() {
        return Vec::new();
    }
    (0..s.len() / 16)
        .map_while(|i| u64::from_str_radix(&s[i * 16..(i + 1) * 16], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_over_the_whole_prefix() {
        let t: Vec<u32> = (0..100).collect();
        let a = block_keys(&t);
        assert_eq!(a.len(), 3);
        assert_eq!(a[1], chain(chain(ROOT, &t[..32]), &t[32..64]));
        let mut other = t.clone();
        other[0] = 7;
        let b = block_keys(&other);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(block_keys(&t[..64]), a[..2]);
        assert_eq!(unpack(&pack(&a)), a);
        assert_eq!(pack(&a).len(), 48);
        assert!(unpack("xyz").is_empty());
        assert!(unpack("é").is_empty());
    }
}
