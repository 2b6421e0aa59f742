//! The published configurations of the large targets that tensor parallelism is for
//! (LLaMA-2-70B, LLaMA-3-70B, Qwen2-72B, Mixtral-8x7B) parse into the engine's `ModelConfig`
//! with the shapes the memory plan (`docs/memory-plan.md`) is computed from. The fixtures in
//! `tests/data/configs/` are small `config.json` files written from the published numbers;
//! no weights are needed.

use std::path::PathBuf;

use eagle_engine::config::{Arch, HfConfig, ModelConfig};

fn load(name: &str) -> ModelConfig {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/configs")
        .join(format!("{name}.json"));
    HfConfig::from_file(&path)
        .and_then(HfConfig::into_config)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fields every fixture is checked on.
struct Expect {
    arch: Arch,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    vocab: usize,
    rope_theta: f32,
    rms_norm_eps: f32,
    max_pos: usize,
    attention_bias: bool,
    experts: (usize, usize),
}

fn check(name: &str, e: Expect) {
    let c = load(name);
    assert_eq!(c.arch, e.arch, "{name}: arch");
    assert_eq!(c.hidden_size, e.hidden, "{name}: hidden_size");
    assert_eq!(c.num_layers, e.layers, "{name}: num_layers");
    assert_eq!(c.num_heads, e.heads, "{name}: num_heads");
    assert_eq!(c.num_kv_heads, e.kv_heads, "{name}: num_kv_heads");
    assert_eq!(c.head_dim, e.head_dim, "{name}: head_dim");
    assert_eq!(
        c.intermediate_size, e.intermediate,
        "{name}: intermediate_size"
    );
    assert_eq!(c.vocab_size, e.vocab, "{name}: vocab_size");
    assert_eq!(c.rope_theta, e.rope_theta, "{name}: rope_theta");
    assert_eq!(c.rms_norm_eps, e.rms_norm_eps, "{name}: rms_norm_eps");
    assert_eq!(c.max_position_embeddings, e.max_pos, "{name}: max_position");
    assert_eq!(c.attention_bias, e.attention_bias, "{name}: attention_bias");
    assert_eq!(
        (c.num_experts, c.num_experts_per_tok),
        e.experts,
        "{name}: experts"
    );
    assert_eq!(c.rope_scaling, None, "{name}: rope_scaling");
    assert!(!c.tie_word_embeddings, "{name}: separate LM head");
    // The derived widths the attention split uses.
    assert_eq!(c.q_dim(), e.heads * e.head_dim, "{name}: q_dim");
    assert_eq!(c.q_dim(), e.hidden, "{name}: q_dim == hidden");
    assert_eq!(c.kv_dim(), e.kv_heads * e.head_dim, "{name}: kv_dim");
}

#[test]
fn llama_2_70b() {
    check(
        "llama-2-70b",
        Expect {
            arch: Arch::Llama,
            hidden: 8192,
            layers: 80,
            heads: 64,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 28672,
            vocab: 32000,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_pos: 4096,
            attention_bias: false,
            experts: (0, 0),
        },
    );
}

#[test]
fn llama_3_70b() {
    check(
        "llama-3-70b",
        Expect {
            arch: Arch::Llama,
            hidden: 8192,
            layers: 80,
            heads: 64,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 28672,
            vocab: 128256,
            rope_theta: 500_000.0,
            rms_norm_eps: 1e-5,
            max_pos: 8192,
            attention_bias: false,
            experts: (0, 0),
        },
    );
}

/// Qwen2's `config.json` has no `attention_bias` key; the q/k/v biases are implied by the
/// architecture, and the engine must turn them on by itself.
#[test]
fn qwen2_72b() {
    check(
        "qwen2-72b",
        Expect {
            arch: Arch::Qwen2,
            hidden: 8192,
            layers: 80,
            heads: 64,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 29568,
            vocab: 152064,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-6,
            max_pos: 32768,
            attention_bias: true,
            experts: (0, 0),
        },
    );
}

/// Mixtral's `intermediate_size` is each expert's width; `sliding_window: null` parses.
#[test]
fn mixtral_8x7b() {
    check(
        "mixtral-8x7b",
        Expect {
            arch: Arch::Mixtral,
            hidden: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 14336,
            vocab: 32000,
            rope_theta: 1_000_000.0,
            rms_norm_eps: 1e-5,
            max_pos: 32768,
            attention_bias: false,
            experts: (8, 2),
        },
    );
}

/// Every fixture's KV heads divide its query heads, and the query heads divide by 8, the
/// largest tensor-parallel degree planned; KV heads divide by up to 8 (beyond that they
/// would be replicated).
#[test]
fn heads_split_evenly_up_to_tp8() {
    for name in ["llama-2-70b", "llama-3-70b", "qwen2-72b", "mixtral-8x7b"] {
        let c = load(name);
        for tp in [2usize, 4, 8] {
            assert_eq!(c.num_heads % tp, 0, "{name}: heads at tp {tp}");
            assert_eq!(c.num_kv_heads % tp, 0, "{name}: kv heads at tp {tp}");
            assert_eq!(
                c.intermediate_size % tp,
                0,
                "{name}: intermediate at tp {tp}"
            );
        }
    }
}
