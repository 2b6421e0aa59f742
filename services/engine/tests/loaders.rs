//! Loaders: the Hugging Face layout (config.json, sharded safetensors with an index,
//! tokenizer.json) gives bit-identical logits and the same tokens as the GGUF it was exported
//! from; and broken inputs (truncated GGUF, garbage, wrong tensor shape, missing or malformed
//! head files, unknown architecture) give clear errors, never a panic.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use eagle_engine::head::EagleHead;
use eagle_engine::loader::gguf::GgufFile;
use eagle_engine::loader::{open_model, WeightSource};
use eagle_engine::models::TargetModel;
use eagle_engine::EngineError;

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("eagle-loaders-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Exports the GGUF model to an HF directory with two safetensors shards and an index.
fn export_hf(gguf: &Path, dir: &Path) {
    let g = GgufFile::open(gguf).unwrap();
    let cfg = g.config().unwrap();
    let names = common::hf_names(cfg.num_layers);
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let mut m: HashMap<String, Tensor> = HashMap::new();
        for n in part {
            m.insert(n.clone(), g.get(n).unwrap().unwrap());
            weight_map.insert(n.clone(), serde_json::json!(shard));
        }
        candle_core::safetensors::save(&m, dir.join(shard)).unwrap();
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tok = eagle_engine::tokenizer::Tokenizer::from_gguf(&g.content, gguf).unwrap();
    tok.save_hf(dir).unwrap();
}

#[test]
fn hf_layout_matches_the_gguf_it_came_from() {
    let gguf = common::smollm2_path();
    let dir = scratch("hf");
    export_hf(&gguf, &dir);
    let from_gguf = open_model(&gguf).unwrap();
    let from_hf = open_model(&dir).unwrap();
    assert_eq!(from_gguf.config, from_hf.config);
    let msgs = [eagle_engine::chat::Message::new(
        "user",
        "Hello there! 123 héllo 🦅",
    )];
    let ids = from_gguf.tokenizer.encode_chat(&msgs).unwrap();
    assert_eq!(ids, from_hf.tokenizer.encode_chat(&msgs).unwrap());
    assert_eq!(from_gguf.tokenizer.eos_ids(), from_hf.tokenizer.eos_ids());
    let a = common::load_target(&from_gguf, from_gguf.config.clone(), DType::F32);
    let b = common::load_target(&from_hf, from_hf.config.clone(), DType::F32);
    let la = common::last_logits(&a, &ids);
    let lb = common::last_logits(&b, &ids);
    assert!(la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_or_garbage_gguf_is_a_clear_error() {
    let gguf = common::smollm2_path();
    let dir = scratch("trunc");
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = open_model(&cut)
        .err()
        .expect("a truncated file must not load");
    assert!(matches!(err, EngineError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    let header_only = dir.join("header.gguf");
    std::fs::write(&header_only, &bytes[..1000]).unwrap();
    let err = open_model(&header_only).err().unwrap();
    assert!(matches!(err, EngineError::Malformed { .. }), "{err}");
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all").unwrap();
    let err = open_model(&garbage).err().unwrap();
    assert!(err.to_string().contains("GGUF"), "{err}");
    let missing = open_model(&dir.join("nope.gguf")).err().unwrap();
    assert!(
        matches!(missing, EngineError::MissingFile { .. }),
        "{missing}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

struct Map(HashMap<String, Tensor>);
impl WeightSource for Map {
    fn get(&self, name: &str) -> eagle_engine::Result<Option<Tensor>> {
        Ok(self.0.get(name).cloned())
    }
    fn describe(&self) -> String {
        "a test map".into()
    }
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let gguf = common::smollm2_path();
    let g = GgufFile::open(&gguf).unwrap();
    let cfg = g.config().unwrap();
    let mut small = cfg.clone();
    small.num_layers = 1;
    let mut m = HashMap::new();
    for n in common::hf_names(1) {
        m.insert(n.clone(), g.get(&n).unwrap().unwrap());
    }
    m.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros(
            (cfg.kv_dim() + 1, cfg.hidden_size),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
    );
    let err = TargetModel::load(
        &Map(m.clone()),
        small.clone(),
        DType::F32,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .err()
    .unwrap();
    match &err {
        EngineError::Shape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!(expected, &vec![cfg.kv_dim(), cfg.hidden_size]);
            assert_eq!(found, &vec![cfg.kv_dim() + 1, cfg.hidden_size]);
        }
        e => panic!("expected a shape error, got {e}"),
    }
    m.remove("model.norm.weight");
    m.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((cfg.kv_dim(), cfg.hidden_size), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = TargetModel::load(&Map(m), small, DType::F32, &Device::Cpu, &mut |_, _| {})
        .err()
        .unwrap();
    assert!(err.to_string().contains("model.norm.weight"), "{err}");
}

#[test]
fn head_files_missing_or_malformed_are_clear_errors() {
    let gguf = common::smollm2_path();
    let cfg = GgufFile::open(&gguf).unwrap().config().unwrap();
    let dir = scratch("head");
    // No directory.
    let err = EagleHead::load(&dir.join("absent"), &cfg, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::MissingFile { .. }), "{err}");
    // A good head round-trips bit-identically.
    let head = EagleHead::init_random(&cfg, 1, DType::F32, &Device::Cpu).unwrap();
    head.save(&dir, DType::F32).unwrap();
    let back = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
    let a = head
        .fc
        .weight
        .dense()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = back
        .fc
        .weight
        .dense()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a, b);
    // Weights missing.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("model.safetensors or pytorch_model.bin"),
        "{err}"
    );
    // Corrupt weights.
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
    )
    .unwrap();
    let err = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::Malformed { .. }), "{err}");
    // Malformed config.
    std::fs::write(dir.join("config.json"), b"{\"hidden_size\": ").unwrap();
    let err = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(err.to_string().contains("config.json"), "{err}");
    // A head for another target.
    let mut other = cfg.clone();
    other.hidden_size = 64;
    other.intermediate_size = 128;
    other.num_heads = 4;
    other.num_kv_heads = 2;
    other.head_dim = 16;
    EagleHead::init_random(&other, 1, DType::F32, &Device::Cpu)
        .unwrap()
        .save(&dir, DType::F32)
        .unwrap();
    let err = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("the target has hidden 576"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let dir = scratch("arch");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gpt_neox", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10}"#,
    )
    .unwrap();
    let err = open_model(&dir).err().unwrap();
    assert!(
        matches!(err, EngineError::UnsupportedArch(ref a) if a == "gpt_neox"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The flattened f32 values of every weight of a head.
fn head_weights(head: &EagleHead) -> Vec<(&'static str, Vec<f32>)> {
    let mut out = vec![];
    let mut push = |name: &'static str, t: &Tensor| {
        let v = t
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        out.push((name, v));
    };
    push("fc.weight", head.fc.weight.dense().unwrap());
    push("fc.bias", head.fc.bias.as_ref().expect("fc.bias"));
    push(
        "layer.attn.qkv.weight",
        head.layer.attn.qkv.weight.dense().unwrap(),
    );
    push(
        "layer.attn.o.weight",
        head.layer.attn.o.weight.dense().unwrap(),
    );
    push(
        "layer.mlp.gate_up.weight",
        head.layer
            .mlp
            .dense()
            .unwrap()
            .gate_up
            .weight
            .dense()
            .unwrap(),
    );
    push(
        "layer.mlp.down.weight",
        head.layer.mlp.dense().unwrap().down.weight.dense().unwrap(),
    );
    push("layer.post_norm.weight", &head.layer.post_norm.weight);
    out
}

#[test]
fn pytorch_bin_head_loads_like_safetensors() {
    let cfg = GgufFile::open(&common::smollm2_path())
        .unwrap()
        .config()
        .unwrap();
    let dir = scratch("pytorch-bin");
    let head = EagleHead::init_random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    head.save(&dir, DType::F16).unwrap();
    let from_st = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
    // Convert model.safetensors to a torch.save-style pytorch_model.bin, without PyTorch.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/make_pytorch_bin.py");
    let st = dir.join("model.safetensors");
    let bin = dir.join("pytorch_model.bin");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&st)
        .arg(&bin)
        .output()
        .expect("python3 must be installed to run this test");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&st).unwrap();
    let from_bin = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu).unwrap();
    let (a, b) = (head_weights(&from_st), head_weights(&from_bin));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(!x.is_empty(), "{name} is empty");
        assert_eq!(
            x, y,
            "{name} differs between safetensors and pytorch_model.bin"
        );
    }
    // The F16 round trip kept the random weights (not all zeros).
    assert!(a[0].1.iter().any(|v| *v != 0.0));
    // A corrupt pytorch_model.bin is an error naming the file, not a panic.
    std::fs::write(&bin, b"PK\x03\x04 not really a zip").unwrap();
    let err = EagleHead::load(&dir, &cfg, DType::F32, &Device::Cpu)
        .err()
        .expect("a corrupt pytorch_model.bin must not load");
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Head configs read as Hugging Face configs: `torch_dtype` is a name transformers accepts
/// (`getattr(torch, name)`), and the fields its LLaMA config reader needs are there. Checked
/// on the shipped head and on a freshly saved one in every dtype.
#[test]
fn head_configs_read_as_hugging_face_configs() {
    const HF_DTYPES: [&str; 4] = ["float32", "float16", "bfloat16", "float64"];
    let check = |path: &Path| {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let dt = v["torch_dtype"].as_str().unwrap_or_default();
        assert!(
            HF_DTYPES.contains(&dt),
            "{}: torch_dtype {dt:?}",
            path.display()
        );
        for key in [
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "vocab_size",
        ] {
            assert!(!v[key].is_null(), "{}: {key} missing", path.display());
        }
    };
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../heads/smollm2-135m/config.json");
    check(&shipped);
    let cfg = GgufFile::open(&common::smollm2_path())
        .unwrap()
        .config()
        .unwrap();
    let head = EagleHead::init_random(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let dir = scratch(&format!("hf-config-{dtype:?}"));
        head.save(&dir, dtype).unwrap();
        check(&dir.join("config.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
