//! EAGLE-3 heads (`eagle_engine::head`, `eagle3.rs`): a checkpoint in the published layout,
//! written by `scripts/make-eagle3-head.py` (plain Python, no PyTorch), loads; its forward
//! equals the reference's computation done in that script; it survives a save and a reload bit
//! for bit; the target gives it the outputs of the named layers before the final norm; and it
//! drafts for the real SmolLM2-135M with EAGLE output equal to vanilla greedy.

mod common;
#[path = "common/prompts.rs"]
mod prompts;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use eagle_engine::config::{HfConfig, ModelConfig};
use eagle_engine::head::{EagleHead, HeadKind};
use eagle_engine::kernels::attention::Visibility;
use eagle_engine::models::target::lm_head;
use eagle_engine::models::Rows;
use eagle_engine::sampling::{Rng, SamplingParams};
use eagle_engine::spec::SpecConfig;
use eagle_engine::{Engine, GenerateRequest, LoadOptions, Mode};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eagle-eagle3-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `scripts/make-eagle3-head.py` for a target shaped like `cfg`.
fn make_head(out: &Path, cfg: &ModelConfig, draft_vocab: usize, extra: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-eagle3-head.py");
    let dims = [
        ("--hidden", cfg.hidden_size),
        ("--intermediate", cfg.intermediate_size),
        ("--heads", cfg.num_heads),
        ("--kv-heads", cfg.num_kv_heads),
        ("--head-dim", cfg.head_dim),
        ("--vocab", cfg.vocab_size),
        ("--draft-vocab", draft_vocab),
    ];
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg("--out").arg(out);
    for (flag, v) in dims {
        cmd.args([flag, &v.to_string()]);
    }
    cmd.args([
        "--rms-norm-eps",
        &cfg.rms_norm_eps.to_string(),
        "--rope-theta",
        &cfg.rope_theta.to_string(),
    ]);
    cmd.args(extra);
    let st = cmd
        .status()
        .expect("python3 runs scripts/make-eagle3-head.py");
    assert!(st.success(), "make-eagle3-head.py failed: {st}");
}

/// A small LLaMA-shaped target config (8 layers, hidden 64).
fn tiny_config(dir: &Path) -> ModelConfig {
    let p = dir.join("target-config.json");
    std::fs::write(
        &p,
        r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "vocab_size": 300, "max_position_embeddings": 256}"#,
    )
    .unwrap();
    HfConfig::from_file(&p).unwrap().into_config().unwrap()
}

fn random_rows(rng: &mut Rng, m: usize, n: usize, scale: f64) -> Vec<Vec<f32>> {
    (0..m)
        .map(|_| {
            (0..n)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * scale) as f32)
                .collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    let n = rows[0].len();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), n), &Device::Cpu).unwrap()
}

/// The draft logits (over the head's draft vocabulary) of a causal run of `m` pairs.
fn draft_logits(head: &EagleHead, embeds: &Tensor, features: &Tensor) -> Vec<Vec<f32>> {
    let m = embeds.dim(0).unwrap();
    let mut cache = head.new_cache(m).unwrap();
    let fused = head.fuse(features).unwrap();
    let positions: Vec<usize> = (0..m).collect();
    let out = head
        .forward(
            &mut cache,
            embeds,
            &fused,
            &positions,
            &Visibility::causal(0, m),
        )
        .unwrap();
    let dv = head.draft_vocab.as_ref().expect("a draft vocabulary");
    lm_head(&dv.lm_head, &head.lm_input(&out).unwrap(), true)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The largest gap between two sets of logits, relative to 1 + |reference|.
fn worst_gap(ours: &[Vec<f32>], reference: &[Vec<f32>]) -> f32 {
    ours.iter()
        .zip(reference)
        .flat_map(|(a, b)| a.iter().zip(b))
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

#[test]
fn a_published_eagle3_checkpoint_computes_what_the_reference_computes() {
    let dir = scratch("reference");
    let cfg = tiny_config(&dir);
    let mut rng = Rng::new(42);
    let m = 5;
    let embeds = random_rows(&mut rng, m, cfg.hidden_size, 1.0);
    let features = random_rows(&mut rng, m, 3 * cfg.hidden_size, 2.0);
    let input = dir.join("in.json");
    std::fs::write(
        &input,
        serde_json::json!({"embeds": embeds, "features": features}).to_string(),
    )
    .unwrap();
    let (head_dir, output) = (dir.join("head"), dir.join("out.json"));
    make_head(
        &head_dir,
        &cfg,
        40,
        &[
            "--seed",
            "3",
            "--reference",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
    );
    let head = EagleHead::load(&head_dir, &cfg, DType::F32, &Device::Cpu).unwrap();
    // No eagle_config in this config.json: the reference's layers for 8 layers.
    assert_eq!(head.kind, HeadKind::Eagle3 { layers: [1, 3, 4] });
    assert_eq!(head.feature_width(), 3 * cfg.hidden_size);
    let ours = draft_logits(&head, &tensor(&embeds), &tensor(&features));
    let theirs: Vec<Vec<f32>> =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&output).unwrap())
            .unwrap()["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| serde_json::from_value(r.clone()).unwrap())
            .collect();
    assert_eq!((ours.len(), ours[0].len()), (m, 40));
    let worst = worst_gap(&ours, &theirs);
    assert!(
        worst < 1e-4,
        "the engine's EAGLE-3 forward differs from the reference by {worst}"
    );
    // The device-generic path (candle ops: CUDA serving and training) computes the same.
    let mut mask = vec![f32::NEG_INFINITY; m * m];
    for t in 0..m {
        mask[t * m..=t * m + t].fill(0.0);
    }
    let mask = Tensor::from_vec(mask, (m, m), &Device::Cpu).unwrap();
    let fused = head.fuse_masked(&tensor(&features)).unwrap();
    let positions: Vec<usize> = (0..m).collect();
    let out = head
        .forward_masked(&tensor(&embeds), &fused, &positions, &mask)
        .unwrap();
    let dv = head.draft_vocab.as_ref().unwrap();
    let generic: Vec<Vec<f32>> = dv
        .lm_head
        .forward(&head.lm_input_masked(&out).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let worst = worst_gap(&generic, &theirs);
    assert!(
        worst < 1e-4,
        "the generic EAGLE-3 path differs from the reference by {worst}"
    );
    // A wrong feature width is refused with a clear error, not a shape panic.
    let narrow = Tensor::zeros((2, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap();
    let err = head.fuse(&narrow).unwrap_err().to_string();
    assert!(err.contains("width 192"), "{err}");
}

#[test]
fn an_eagle3_head_saved_and_reloaded_is_the_same_bit_for_bit() {
    let dir = scratch("roundtrip");
    let cfg = tiny_config(&dir);
    make_head(
        &dir.join("published"),
        &cfg,
        50,
        &["--seed", "5", "--aux-layers", "0,4,7"],
    );
    let head = EagleHead::load(&dir.join("published"), &cfg, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(head.kind, HeadKind::Eagle3 { layers: [0, 4, 7] });
    for dtype in [DType::F16, DType::F32] {
        let out = dir.join(format!("saved-{dtype:?}"));
        head.save(&out, dtype).unwrap();
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["architectures"][0], "LlamaForCausalLMEagle3");
        assert_eq!(
            config["eagle_config"]["eagle_aux_hidden_state_layer_ids"],
            serde_json::json!([0, 4, 7])
        );
        let back = EagleHead::load(&out, &cfg, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.kind, head.kind);
        let (a, b) = (head.tensors().unwrap(), back.tensors().unwrap());
        let mut names: Vec<&String> = a.keys().collect();
        names.sort();
        let mut names_b: Vec<&String> = b.keys().collect();
        names_b.sort();
        assert_eq!(names, names_b);
        assert!(names.contains(&&"midlayer.hidden_norm.weight".to_string()));
        for n in names {
            let x = a[n].flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            let y = b[n].flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            // The published file is f16, so an f16 save keeps every bit too.
            assert_eq!(
                x.to_vec1::<f64>().unwrap(),
                y.to_vec1::<f64>().unwrap(),
                "{n} changed in a {dtype:?} save and reload"
            );
        }
    }
}

#[test]
fn an_eagle3_head_reads_the_named_layers_before_the_final_norm() {
    let opened = eagle_engine::loader::open_model(&common::smollm2_path()).unwrap();
    let mut target = common::load_target(&opened, opened.config.clone(), DType::F32);
    let last = target.cfg.num_layers - 1;
    assert!(target.set_draft_layers(&[0, 14, last + 1]).is_err());
    assert!(target.set_draft_layers(&[14, 2, 20]).is_err());
    target.set_draft_layers(&[0, 14, last]).unwrap();
    let h = target.cfg.hidden_size;
    assert_eq!(target.draft_feature_width(), 3 * h);
    let tokens = [1u32, 504, 3458, 282, 4195, 30];
    let positions: Vec<usize> = (0..tokens.len()).collect();
    let vis = Visibility::causal(0, tokens.len());
    let mut cache = target.new_cache(tokens.len()).unwrap();
    let states = target
        .forward_batch_states(&mut [Rows {
            cache: &mut cache,
            tokens: &tokens,
            positions: &positions,
            vis: &vis,
        }])
        .unwrap()
        .remove(0);
    assert_eq!(states.draft.dims(), [tokens.len(), 3 * h]);
    // The third block is the last layer's output: the final norm of it is the last features.
    let top = states
        .draft
        .narrow(1, 2 * h, h)
        .unwrap()
        .contiguous()
        .unwrap();
    // (The same norm code as the pass: the CPU kernel, or candle's ops under
    // EAGLE_GENERIC_KERNELS.)
    let normed = if eagle_engine::layers::use_cpu_kernels(&Device::Cpu) {
        target
            .norm
            .forward_cpu(&top.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .unwrap()
    } else {
        let n = target.norm.forward(&top).unwrap();
        n.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let last_feats = states.last.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(normed, last_feats);
    // The lower blocks are the outputs of layers 0 and 14: what a target cut after that layer
    // gives as its own draft feature, bit for bit.
    for (block, layer) in [(0, 0), (1, 14)] {
        let mut cut_cfg = opened.config.clone();
        cut_cfg.num_layers = layer + 1;
        let mut cut = common::load_target(&opened, cut_cfg, DType::F32);
        cut.set_draft_layers(&[layer]).unwrap();
        let mut cache = cut.new_cache(tokens.len()).unwrap();
        let alone = cut
            .forward_batch_states(&mut [Rows {
                cache: &mut cache,
                tokens: &tokens,
                positions: &positions,
                vis: &vis,
            }])
            .unwrap()
            .remove(0)
            .draft;
        let ours = states.draft.narrow(1, block * h, h).unwrap();
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "block {block} is not layer {layer}'s output"
        );
    }
}

#[test]
fn a_published_eagle3_head_drafts_for_smollm2_and_eagle_equals_vanilla() {
    let dir = scratch("smollm2");
    let opened = eagle_engine::loader::open_model(&common::smollm2_path()).unwrap();
    let head_dir = dir.join("head");
    make_head(&head_dir, &opened.config, 2048, &["--seed", "1"]);
    let e = Engine::load(
        &LoadOptions {
            model: common::smollm2_path(),
            head: Some(head_dir),
            dtype: DType::BF16,
            quant: eagle_engine::Quant::Native,
            device: Device::Cpu,
        },
        &mut |_, _| {},
    )
    .unwrap();
    let h = e.target.cfg.hidden_size;
    assert_eq!(e.target.draft_feature_width(), 3 * h);
    let d = e.drafter.as_ref().unwrap();
    assert_eq!(d.head.kind, HeadKind::eagle3_for(e.target.cfg.num_layers));
    let draft_ids: std::collections::HashSet<u32> = d
        .head
        .draft_vocab
        .as_ref()
        .unwrap()
        .d2t
        .iter()
        .copied()
        .collect();
    let mut accepted = 0;
    for p in prompts::PROMPTS.iter().take(4) {
        let prompt = e
            .chat_prompt(&[eagle_engine::chat::Message::new("user", *p)])
            .unwrap();
        let req = |mode| GenerateRequest {
            prompt: prompt.clone(),
            max_new_tokens: 32,
            sampling: SamplingParams::greedy(),
            mode,
            spec: SpecConfig::default(),
        };
        let vanilla = e.generate(&req(Mode::Vanilla)).unwrap();
        let eagle = e.generate(&req(Mode::Eagle)).unwrap();
        assert_eq!(eagle.tokens, vanilla.tokens, "prompt {p:?}");
        assert!(!eagle.tree_sizes.is_empty(), "EAGLE mode drafted no tree");
        accepted += eagle.drafts_accepted.iter().sum::<usize>();
    }
    // A random head's draft tokens still come from its draft vocabulary only.
    let prompt = e
        .chat_prompt(&[eagle_engine::chat::Message::new("user", "Hello")])
        .unwrap();
    let mut sess = eagle_engine::session::TargetSession::new(&e.target, 256).unwrap();
    let (feats, logits) = sess.prefill(&e.target, &prompt).unwrap();
    assert_eq!(feats.dims(), [prompt.len(), 3 * h]);
    let root = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32;
    let mut ds = d.open(512).unwrap();
    let mut shifted = prompt[1..].to_vec();
    shifted.push(root);
    ds.push(&shifted, &feats).unwrap();
    let (tree, _) = d
        .draft(
            &mut ds,
            root,
            &SpecConfig::default(),
            &SamplingParams::greedy(),
            &mut Rng::new(0),
            &eagle_engine::spec::TreeBudget::for_spec(&SpecConfig::default(), None),
        )
        .unwrap();
    assert!(tree.len() > 1);
    assert!(tree.tokens[1..].iter().all(|t| draft_ids.contains(t)));
    eprintln!("random EAGLE-3 head: {accepted} draft tokens accepted over 4 prompts");
}

/// The training-time test's attention (EAGLE-3's training): step k of a row sees the first
/// step's rows its mask allows and its own row of steps 1..k. Running the steps one at a time
/// through `forward_ttt` equals one masked pass over every step's rows with that visibility
/// spelled out in full.
#[test]
fn the_training_time_test_attends_to_the_first_step_and_its_own_row_of_later_ones() {
    let dir = scratch("ttt");
    let cfg = tiny_config(&dir);
    let head = EagleHead::init_random_kind(
        &cfg,
        HeadKind::Eagle3 { layers: [1, 3, 4] },
        9,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let h = cfg.hidden_size;
    let mut rng = Rng::new(7);
    // Two packed conversations of 3 and 2 rows.
    let (m, steps) = (5, 3);
    let conv = [0, 0, 0, 1, 1];
    let pos0 = [0usize, 1, 2, 0, 1];
    let visible = |t: usize, j: usize| conv[t] == conv[j] && j <= t;
    let mut mask0 = vec![f32::NEG_INFINITY; m * m];
    for t in 0..m {
        for j in 0..m {
            if visible(t, j) {
                mask0[t * m + j] = 0.0;
            }
        }
    }
    let mask0 = Tensor::from_vec(mask0, (m, m), &Device::Cpu).unwrap();
    let embeds: Vec<Tensor> = (0..steps)
        .map(|_| tensor(&random_rows(&mut rng, m, h, 1.0)))
        .collect();
    let fused = head
        .fuse_masked(&tensor(&random_rows(&mut rng, m, 3 * h, 1.0)))
        .unwrap();
    // Step by step.
    let mut past = eagle_engine::layers::TttKv::default();
    let mut inputs = vec![fused.clone()];
    let mut out = fused;
    for (s, e) in embeds.iter().enumerate() {
        let positions: Vec<usize> = pos0.iter().map(|p| p + s).collect();
        out = head
            .forward_ttt(e, &out, &positions, &mask0, &mut past)
            .unwrap();
        inputs.push(out.clone());
    }
    // All steps in one pass: row (s, t) is s * m + t.
    let n = steps * m;
    let mut mask = vec![f32::NEG_INFINITY; n * n];
    for s in 0..steps {
        for t in 0..m {
            let row = (s * m + t) * n;
            for j in 0..m {
                if visible(t, j) {
                    mask[row + j] = 0.0;
                }
            }
            for s2 in 1..=s {
                mask[row + s2 * m + t] = 0.0;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (n, n), &Device::Cpu).unwrap();
    let positions: Vec<usize> = (0..steps)
        .flat_map(|s| pos0.iter().map(move |p| p + s))
        .collect();
    let all = head
        .forward_masked(
            &Tensor::cat(&embeds, 0).unwrap(),
            &Tensor::cat(&inputs[..steps], 0).unwrap(),
            &positions,
            &mask,
        )
        .unwrap();
    let last_step = all.narrow(0, (steps - 1) * m, m).unwrap();
    let diff = (last_step - &out)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "step-by-step and one-pass differ by {diff}");
    // A step that saw every row of the earlier steps would differ: the mask matters.
    let mut loose = vec![f32::NEG_INFINITY; n * n];
    for r in 0..n {
        for c in 0..n {
            if c % m <= r % m && conv[c % m] == conv[r % m] && c / m <= r / m {
                loose[r * n + c] = 0.0;
            }
        }
    }
    let loose = Tensor::from_vec(loose, (n, n), &Device::Cpu).unwrap();
    let other = head
        .forward_masked(
            &Tensor::cat(&embeds, 0).unwrap(),
            &Tensor::cat(&inputs[..steps], 0).unwrap(),
            &positions,
            &loose,
        )
        .unwrap()
        .narrow(0, (steps - 1) * m, m)
        .unwrap();
    let gap = (other - &out)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(gap > 1e-4, "a looser mask gave the same result ({gap})");
}
