//! Tensor-parallel ranks in separate processes compute what one unsharded process computes.
//!
//! For three tiny random-weight models with the real architectures' features (LLaMA with GQA
//! and 8 KV heads; Qwen2 with q/k/v biases, tied embeddings and more ranks than KV heads, so KV
//! heads are replicated; Mixtral with 8 experts, top-2), each test runs the same prefill and
//! tree-verification pass at TP 1 (in this process) and TP 2 and 4 (this process as rank 0,
//! the other ranks as child processes of this test binary, joined over TCP). Tolerance: the
//! logits agree within 1e-5 of their largest magnitude (sharding only regroups f32 sums) with
//! the same argmax in every row; and every rank ends with bit-identical logits.
//! It also prints the per-step time at each degree (communication overhead on this machine).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use eagle_engine::kernels::attention::Visibility;
use eagle_engine::loader::safetensors::SafetensorsSource;
use eagle_engine::models::random::write_random_model;
use eagle_engine::models::TargetModel;
use eagle_engine::parallel::Shard;
use eagle_engine::tree::DraftTree;
use eagle_parallel::TcpGroup;

const CHILD: &str = "EAGLE_TP_TEST_CHILD";
const PROMPT: [u32; 6] = [3, 141, 59, 265, 35, 297];

/// The pass every rank runs: a 6-token prefill, then an 8-node tree, logits at every row,
/// then `steps` timed tree passes. Returns the logits and the mean seconds per timed pass.
fn run(target: &TargetModel, steps: usize) -> (Vec<f32>, f64) {
    let mut cache = target.new_cache(64).unwrap();
    let pos: Vec<usize> = (0..PROMPT.len()).collect();
    let f = target
        .forward(
            &mut cache,
            &PROMPT,
            &pos,
            &Visibility::causal(0, PROMPT.len()),
        )
        .unwrap();
    let mut out: Vec<f32> = target
        .logits(&f)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut tree = DraftTree::root(297);
    for (parent, tok) in [
        (0, 11),
        (0, 12),
        (1, 13),
        (1, 14),
        (2, 15),
        (3, 16),
        (5, 17),
    ] {
        tree.push(parent, tok);
    }
    let base = cache.len();
    let vis = Visibility::tree(base, &tree.parents);
    let f = target
        .forward(&mut cache, &tree.tokens, &tree.positions(base), &vis)
        .unwrap();
    out.extend(
        target
            .logits(&f)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    let t = Instant::now();
    for _ in 0..steps {
        cache.truncate(base);
        let f = target
            .forward(&mut cache, &tree.tokens, &tree.positions(base), &vis)
            .unwrap();
        target.logits(&f.narrow(0, 0, 1).unwrap()).unwrap();
    }
    (out, t.elapsed().as_secs_f64() / steps.max(1) as f64)
}

fn load(dir: &Path, shard: Shard) -> TargetModel {
    let src = SafetensorsSource::open(dir).unwrap();
    let cfg = eagle_engine::config::HfConfig::from_file(&dir.join("config.json"))
        .unwrap()
        .into_config()
        .unwrap();
    TargetModel::load_shard(&src, cfg, DType::F32, &Device::Cpu, shard, &mut |_, _| {}).unwrap()
}

fn save(path: &Path, x: &[f32]) {
    let b: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, b).unwrap();
}

fn read(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

const STEPS: usize = 20;
const T: Duration = Duration::from_secs(60);

/// The child side: `dir|rank|world|addr` in `EAGLE_TP_TEST_CHILD`. A no-op in a normal run.
#[test]
fn child_rank() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let p: Vec<&str> = spec.split('|').collect();
    let (dir, rank, world, addr) = (
        PathBuf::from(p[0]),
        p[1].parse().unwrap(),
        p[2].parse().unwrap(),
        p[3],
    );
    let group = TcpGroup::join(addr, rank, world, T, T).unwrap();
    let target = load(&dir, Shard::of(Arc::new(group)));
    let (logits, _) = run(&target, STEPS);
    save(&dir.join(format!("rank{rank}-of-{world}.bin")), &logits);
}

fn check(name: &str, hf: serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("eagle-tp-{name}-{}", std::process::id()));
    write_random_model(&dir, &hf, 11).unwrap();
    let (want, t1) = run(&load(&dir, Shard::single()), STEPS);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let vocab = hf["vocab_size"].as_u64().unwrap() as usize;
    eprintln!("{name}: TP 1 step {:.2} ms", t1 * 1e3);
    for world in [2usize, 4] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let children: Vec<_> = (1..world)
            .map(|r| {
                Command::new(std::env::current_exe().unwrap())
                    .args([
                        "child_rank",
                        "--exact",
                        "--nocapture",
                        "--test-threads",
                        "1",
                    ])
                    .env(CHILD, format!("{}|{r}|{world}|{addr}", dir.display()))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let group = TcpGroup::lead(&listener, world, T, T).unwrap();
        let (got, tw) = run(&load(&dir, Shard::of(Arc::new(group))), STEPS);
        for mut c in children {
            assert!(c.wait().unwrap().success(), "{name}: a rank failed");
        }
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: TP {world} step {:.2} ms, max |logit diff| {diff:.2e} (largest logit {scale:.2})",
            tw * 1e3
        );
        assert_eq!(got.len(), want.len());
        assert!(
            diff <= 1e-5 * scale,
            "{name} TP {world}: max |diff| {diff} vs scale {scale}"
        );
        let argmax = |x: &[f32]| -> Vec<usize> {
            x.chunks_exact(vocab)
                .map(|r| {
                    r.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .unwrap()
                        .0
                })
                .collect()
        };
        assert_eq!(argmax(&got), argmax(&want), "{name} TP {world}: argmax");
        for r in 1..world {
            let theirs = read(&dir.join(format!("rank{r}-of-{world}.bin")));
            assert!(
                theirs
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{name} TP {world}: rank {r} ended with other bits than rank 0"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn llama_with_gqa_splits_exactly() {
    check(
        "llama-gqa",
        serde_json::json!({
            "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 8,
            "vocab_size": 1003, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": false
        }),
    );
}

#[test]
fn qwen2_with_biases_and_replicated_kv_heads_splits_exactly() {
    check(
        "qwen2",
        serde_json::json!({
            "model_type": "qwen2", "hidden_size": 96, "intermediate_size": 192,
            "num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 2,
            "vocab_size": 998, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": true
        }),
    );
}

#[test]
fn mixtral_experts_split_exactly() {
    check(
        "mixtral",
        serde_json::json!({
            "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
            "max_position_embeddings": 256, "num_local_experts": 8, "num_experts_per_tok": 2,
            "tie_word_embeddings": false
        }),
    );
}
