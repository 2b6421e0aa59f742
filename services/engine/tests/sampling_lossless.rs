//! Sampling losslessness, shown statistically on a tiny synthetic model (vocabulary 12) with a
//! deliberately poor, randomly initialised head: the distribution of the first generated tokens
//! under EAGLE sampling matches vanilla sampling (two-sample chi-square homogeneity test per
//! position and on the joint of positions 2-3, significance 0.001), at temperature 1 and with
//! top-p < 1. The same test, run with a wrong acceptance rule, must reject.
//!
//! Seeds are fixed, so the test is deterministic.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use eagle_engine::config::{Arch, ModelConfig};
use eagle_engine::draft::Drafter;
use eagle_engine::head::EagleHead;
use eagle_engine::loader::WeightSource;
use eagle_engine::models::TargetModel;
use eagle_engine::sampling::{sample, warp, Rng, SamplingParams};
use eagle_engine::session::TargetSession;
use eagle_engine::spec::{SpecConfig, TreeBudget, TreeShape};
use eagle_engine::tree::StaticShape;
use eagle_engine::verify::{AcceptRule, Recursive};
use eagle_engine::Result;

const VOCAB: usize = 12;
const N: usize = 4000;
const POSITIONS: usize = 4;

struct Map(HashMap<String, Tensor>);
impl WeightSource for Map {
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.0.get(name).cloned())
    }
    fn describe(&self) -> String {
        "synthetic".into()
    }
}

fn tiny_config() -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        vocab_size: VOCAB,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        num_experts: 0,
        num_experts_per_tok: 0,
    }
}

/// A random target whose next-token distributions are far from uniform and depend on context.
fn tiny_target() -> TargetModel {
    let c = tiny_config();
    let mut rng = Rng::new(42);
    let mut t = |r: usize, k: usize, scale: f64| {
        let v: Vec<f32> = (0..r * k)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * scale) as f32)
            .collect();
        Tensor::from_vec(v, (r, k), &Device::Cpu).unwrap()
    };
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let mut m = HashMap::new();
    m.insert("model.embed_tokens.weight".into(), t(VOCAB, h, 1.0));
    m.insert("lm_head.weight".into(), t(VOCAB, h, 0.6));
    m.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
    );
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm"] {
            m.insert(
                format!("{p}.{n}.weight"),
                Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
            );
        }
        m.insert(format!("{p}.self_attn.q_proj.weight"), t(c.q_dim(), h, 0.5));
        m.insert(
            format!("{p}.self_attn.k_proj.weight"),
            t(c.kv_dim(), h, 0.5),
        );
        m.insert(
            format!("{p}.self_attn.v_proj.weight"),
            t(c.kv_dim(), h, 0.5),
        );
        m.insert(format!("{p}.self_attn.o_proj.weight"), t(h, c.q_dim(), 0.3));
        m.insert(format!("{p}.mlp.gate_proj.weight"), t(f, h, 0.3));
        m.insert(format!("{p}.mlp.up_proj.weight"), t(f, h, 0.3));
        m.insert(format!("{p}.mlp.down_proj.weight"), t(h, f, 0.3));
    }
    TargetModel::load(&Map(m), c, DType::F32, &Device::Cpu, &mut |_, _| {}).unwrap()
}

const PROMPT: [u32; 3] = [1, 5, 7];

fn vanilla_run(target: &TargetModel, params: &SamplingParams) -> Vec<u32> {
    let mut rng = Rng::new(params.seed);
    let mut sess = TargetSession::new(target, 16).unwrap();
    let (_, mut logits) = sess.prefill(target, &PROMPT).unwrap();
    let mut out = Vec::new();
    while out.len() < POSITIONS {
        let t = sample(&warp(&logits, params), &mut rng);
        out.push(t);
        logits = sess.decode(target, t).unwrap().1;
    }
    out
}

/// The speculative loop from the library's building blocks, with a chosen acceptance rule.
fn eagle_run(
    target: &TargetModel,
    drafter: &Drafter,
    spec: &SpecConfig,
    params: &SamplingParams,
    rule: &dyn AcceptRule,
) -> Vec<u32> {
    let mut rng = Rng::new(params.seed);
    let mut sess = TargetSession::new(target, 64).unwrap();
    let (feats, logits) = sess.prefill(target, &PROMPT).unwrap();
    let mut last = sample(&warp(&logits, params), &mut rng);
    let mut out = vec![last];
    let mut ds = drafter.open(128).unwrap();
    let mut shifted = PROMPT[1..].to_vec();
    shifted.push(last);
    ds.push(&shifted, &feats).unwrap();
    while out.len() < POSITIONS {
        let (tree, _) = drafter
            .draft(
                &mut ds,
                last,
                spec,
                params,
                &mut rng,
                &TreeBudget::Fixed(spec.node_budget()),
            )
            .unwrap();
        let v = sess
            .verify_with_rule(target, &tree, params, &mut rng, rule)
            .unwrap();
        out.extend_from_slice(&v.verdict.tokens);
        last = *v.verdict.tokens.last().unwrap();
        ds.push(&v.verdict.tokens, &v.features).unwrap();
    }
    out.truncate(POSITIONS);
    out
}

/// Two-sample chi-square statistic and its degrees of freedom; cells with a pooled count
/// below 10 are merged into one.
fn chi_square(a: &HashMap<Vec<u32>, usize>, b: &HashMap<Vec<u32>, usize>) -> (f64, usize) {
    let mut keys: Vec<&Vec<u32>> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let (na, nb) = (
        a.values().sum::<usize>() as f64,
        b.values().sum::<usize>() as f64,
    );
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut rare = (0.0, 0.0);
    for k in keys {
        let (x, y) = (
            *a.get(k).unwrap_or(&0) as f64,
            *b.get(k).unwrap_or(&0) as f64,
        );
        if x + y < 10.0 {
            rare.0 += x;
            rare.1 += y;
        } else {
            cells.push((x, y));
        }
    }
    if rare.0 + rare.1 > 0.0 {
        cells.push(rare);
    }
    let mut stat = 0.0;
    for (x, y) in &cells {
        let tot = x + y;
        let ea = tot * na / (na + nb);
        let eb = tot * nb / (na + nb);
        stat += (x - ea).powi(2) / ea + (y - eb).powi(2) / eb;
    }
    (stat, cells.len().saturating_sub(1))
}

/// Chi-square critical value at significance 0.001 (Wilson-Hilferty approximation).
fn critical_001(dof: usize) -> f64 {
    let k = dof as f64;
    let z = 3.090_232; // upper 0.001 quantile of N(0, 1)
    k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
}

fn histograms(samples: &[Vec<u32>]) -> Vec<HashMap<Vec<u32>, usize>> {
    let mut h = vec![HashMap::new(); POSITIONS + 1];
    for s in samples {
        for (p, hp) in h.iter_mut().take(POSITIONS).enumerate() {
            *hp.entry(vec![s[p]]).or_insert(0) += 1;
        }
        *h[POSITIONS].entry(vec![s[1], s[2]]).or_insert(0) += 1;
    }
    h
}

/// Returns the worst (statistic / critical value) over the positions and the joint.
fn compare(params: SamplingParams, spec: &SpecConfig, rule: &dyn AcceptRule) -> f64 {
    let target = tiny_target();
    let head = EagleHead::init_random(&target.cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let drafter = Drafter::new(Arc::new(head), &target);
    let vanilla: Vec<Vec<u32>> = (0..N)
        .map(|i| {
            vanilla_run(
                &target,
                &SamplingParams {
                    seed: i as u64,
                    ..params.clone()
                },
            )
        })
        .collect();
    let eagle: Vec<Vec<u32>> = (0..N)
        .map(|i| {
            eagle_run(
                &target,
                &drafter,
                spec,
                &SamplingParams {
                    seed: (N + i) as u64,
                    ..params.clone()
                },
                rule,
            )
        })
        .collect();
    let (hv, he) = (histograms(&vanilla), histograms(&eagle));
    let mut worst = 0f64;
    for (p, (a, b)) in hv.iter().zip(&he).enumerate() {
        let (stat, dof) = chi_square(a, b);
        let crit = critical_001(dof);
        eprintln!("position {p}: chi2 {stat:.1} on {dof} dof (critical {crit:.1})");
        worst = worst.max(stat / crit);
    }
    worst
}

fn spec(shape: TreeShape) -> SpecConfig {
    SpecConfig {
        total_token: 12,
        depth: 3,
        top_k: 4,
        sample_branch: 2,
        shape,
    }
}

#[test]
fn eagle_sampling_matches_vanilla_at_temperature_1() {
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    let worst = compare(params, &spec(TreeShape::Dynamic), &Recursive);
    assert!(worst < 1.0, "EAGLE sampling differs from vanilla: {worst}");
}

#[test]
fn eagle_sampling_matches_vanilla_with_top_p_and_static_tree() {
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.85,
        top_k: 0,
        seed: 0,
    };
    let shape = TreeShape::Static(StaticShape::default_with(10, 3, 3));
    let worst = compare(params, &spec(shape), &Recursive);
    assert!(worst < 1.0, "EAGLE sampling differs from vanilla: {worst}");
}

/// A plausible but wrong rule: accept with min(1, p/q), and on rejection resample from p
/// itself instead of the residual max(0, p - q). It over-produces drafted tokens.
struct ResampleFromTarget;

impl AcceptRule for ResampleFromTarget {
    fn choose(
        &self,
        p: Vec<f32>,
        q: Vec<f32>,
        children: &[u32],
        rng: &mut Rng,
    ) -> std::result::Result<usize, u32> {
        for (i, &x) in children.iter().enumerate() {
            if rng.uniform() < (p[x as usize] as f64 / q[x as usize] as f64).min(1.0) {
                return Ok(i);
            }
        }
        Err(sample(&p, rng))
    }
}

#[test]
fn a_broken_acceptance_rule_is_detected() {
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
    };
    let worst = compare(params, &spec(TreeShape::Dynamic), &ResampleFromTarget);
    assert!(
        worst > 1.0,
        "the chi-square test failed to catch a wrong rule: {worst}"
    );
}
