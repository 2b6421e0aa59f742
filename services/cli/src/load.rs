//! `eagle load`: a load generator on the cluster's own gRPC API, in the manner of vLLM's serving
//! benchmark. Every request is streamed, so each one's time to first token, the gaps between
//! its chunks and its end are seen as a client sees them.
//!
//! - Closed loop (default): `--concurrency N` clients, each sending its next request as soon as
//!   its last one ended.
//! - Open loop (`--rate R`): requests arrive at exponential intervals (a Poisson process of R
//!   per second, seeded), whatever is in flight; `--concurrency` then caps requests in flight.
//!
//! Prompts are taken in order from a JSON-lines file (`{"prompt": ..., "raw": false}`),
//! round-robin. The summary is one JSON object on stdout; a progress bar goes to stderr.
//! Percentiles are nearest-rank over all successful requests (chunk gaps: over all chunks).
//!
//! At T = 0 the same prompt must give the same tokens every time, whatever else runs: the
//! summary counts the successful answers that differ from the first answer to their prompt
//! (`mismatched_outputs`), a check that needs no model here (the soak and chaos runs rely on
//! it). A request past `--timeout-s` is cancelled and counted as `Timeout`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use eagle_proto::v1::generation_client::GenerationClient;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;

use crate::client::ClientArgs;

#[derive(Args, Clone, Debug)]
pub struct LoadArgs {
    /// The coordinator's address.
    #[arg(long, env = "EAGLE_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// The API key, for a cluster that requires one.
    #[arg(long, env = "EAGLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Connect over TLS, trusting this CA (PEM).
    #[arg(long, env = "EAGLE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Prompts, one JSON object per line with `prompt` (and `raw: true` to skip the chat
    /// template); used in order, round-robin.
    #[arg(long, default_value = "bench/prompts/eagle-mt-24.jsonl")]
    pub prompts: PathBuf,
    /// Requests in flight at once (closed loop), or their cap (open loop).
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// How many requests to send (default: one per prompt), unless --duration is given.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Send requests for this many seconds instead of a fixed count.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Open loop: requests per second, arriving as a Poisson process.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seed of the open loop's arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 96)]
    pub max_new_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Plain decoding (no speculation), for a side-by-side run.
    #[arg(long)]
    pub no_speculation: bool,
    /// Draft tokens per target pass (-1 or unset: sized per step by the server).
    #[arg(long)]
    pub total_token: Option<i32>,
    /// A request still running after this many seconds is cancelled and counted as `Timeout`.
    #[arg(long, default_value_t = 300.0)]
    pub timeout_s: f64,
    /// Shared-prefix traffic: put a system prompt of about this many tokens (the same text
    /// every time) before the prompts, as a deployment's system prompt or few-shot preamble
    /// would (raw prompts get it as leading text). 0: none.
    #[arg(long, default_value_t = 0)]
    pub prefix_tokens: usize,
    /// With --prefix-tokens: the fraction of requests that carry the shared prefix (chosen
    /// by --seed); the others are sent without it.
    #[arg(long, default_value_t = 1.0)]
    pub share: f64,
}

/// A fixed text of about `tokens` tokens (numbered rules; about 21 tokens a line with the
/// usual BPE tokenizers), the shared prefix of `--prefix-tokens`.
pub fn shared_prefix(tokens: usize) -> String {
    let lines: Vec<String> = (0..tokens.div_ceil(21))
        .map(|i| {
            format!(
                "Rule {i}: shelf {} holds volume {} of series {}.",
                i * 7 % 97,
                i * 13 % 211,
                i % 17
            )
        })
        .collect();
    format!(
        "You answer as the house rules below say.\n{}",
        lines.join("\n")
    )
}

#[derive(serde::Deserialize)]
struct PromptLine {
    prompt: String,
    #[serde(default)]
    raw: bool,
}

/// What one request saw.
#[derive(Default)]
struct Outcome {
    /// Which prompt it sent, and whether with the shared prefix.
    prompt: (usize, bool),
    /// Prompt tokens, and those whose KV the cluster reused (from the last chunk's usage).
    prompt_tokens: u32,
    cached_tokens: u32,
    token_ids: Vec<u32>,
    error: Option<String>,
    ttft: Option<Duration>,
    e2e: Duration,
    tokens: usize,
    steps: u32,
    /// Steps the coordinator decoded plainly because speculation did not pay at the load.
    load_plain_steps: u32,
    /// Gaps between successive chunks that carried tokens.
    gaps: Vec<Duration>,
}

fn read_prompts(path: &PathBuf) -> Result<Vec<PromptLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?,
        );
    }
    if out.is_empty() {
        bail!("{} holds no prompt", path.display());
    }
    Ok(out)
}

impl LoadArgs {
    /// The request for prompt `p`, with the shared `prefix` when given.
    fn request(
        &self,
        p: &PromptLine,
        prefix: Option<&str>,
    ) -> Result<tonic::Request<eagle_proto::v1::GenerateRequest>> {
        let (prompt, system) = match (prefix, p.raw) {
            (None, _) => (p.prompt.clone(), None),
            (Some(x), true) => (format!("{x}\n\n{}", p.prompt), None),
            (Some(x), false) => (p.prompt.clone(), Some(x.to_string())),
        };
        ClientArgs {
            addr: String::new(),
            api_key: self.api_key.clone(),
            tls_ca: None,
            prompt,
            chat: !p.raw,
            system,
            stream: true,
            model: String::new(),
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop: Vec::new(),
            no_speculation: self.no_speculation,
            total_token: self.total_token,
            json: true,
            session_id: String::new(),
        }
        .grpc_request()
    }
}

async fn one(
    client: GenerationClient<tonic::transport::Channel>,
    req: tonic::Request<eagle_proto::v1::GenerateRequest>,
    timeout: Duration,
) -> Outcome {
    let t0 = Instant::now();
    match tokio::time::timeout(timeout, stream_one(client, req)).await {
        Ok(o) => o,
        Err(_) => Outcome {
            error: Some("Timeout".into()),
            e2e: t0.elapsed(),
            ..Outcome::default()
        },
    }
}

async fn stream_one(
    mut client: GenerationClient<tonic::transport::Channel>,
    req: tonic::Request<eagle_proto::v1::GenerateRequest>,
) -> Outcome {
    let t0 = Instant::now();
    let mut o = Outcome::default();
    let mut stream = match client.stream_generate(req).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            o.error = Some(format!("{:?}", e.code()));
            o.e2e = t0.elapsed();
            return o;
        }
    };
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if !c.token_ids.is_empty() {
                    let now = Instant::now();
                    match last {
                        None => o.ttft = Some(now - t0),
                        Some(l) => o.gaps.push(now - l),
                    }
                    last = Some(now);
                    o.tokens += c.token_ids.len();
                    o.token_ids.extend_from_slice(&c.token_ids);
                }
                if let Some(s) = c.stats {
                    o.steps = s.steps;
                    o.load_plain_steps = s.load_plain_steps;
                }
                if let Some(u) = c.usage {
                    o.prompt_tokens = u.prompt_tokens;
                    o.cached_tokens = u.cached_prompt_tokens;
                }
            }
            Err(e) => {
                o.error = Some(format!("{:?}", e.code()));
                break;
            }
        }
    }
    o.e2e = t0.elapsed();
    o
}

/// p50, p90, p99 and the mean of `v`, in milliseconds.
fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let round = |x: f64| (x * 100.0).round() / 100.0;
    json!({
        "p50": round(at(0.50)),
        "p90": round(at(0.90)),
        "p99": round(at(0.99)),
        "mean": round(v.iter().sum::<f64>() / v.len() as f64),
    })
}

pub fn run(a: LoadArgs) -> Result<()> {
    if !(a.timeout_s > 0.0 && a.timeout_s.is_finite()) {
        bail!("--timeout-s must be a positive number of seconds");
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of requests per second");
    }
    if !(0.0..=1.0).contains(&a.share) {
        bail!("--share must be a fraction in [0, 1]");
    }
    let prefix = (a.prefix_tokens > 0).then(|| shared_prefix(a.prefix_tokens));
    let prompts = Arc::new(read_prompts(&a.prompts)?);
    let total = match (a.duration, a.requests) {
        (Some(_), _) => None,
        (None, Some(n)) => Some(n),
        (None, None) => Some(prompts.len()),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let client = crate::client::connect(&a.addr, a.tls_ca.as_deref()).await?;
        let bar = match total {
            Some(n) => ProgressBar::new(n as u64),
            None => ProgressBar::new((a.duration.unwrap_or(0.0) * 1e3) as u64),
        }
        .with_style(
            ProgressStyle::with_template("load [{bar:30}] {pos}/{len} {msg}")
                .expect("a valid template"),
        );
        let deadline = a
            .duration
            .map(|d| Instant::now() + Duration::from_secs_f64(d));
        let slots = Arc::new(Semaphore::new(a.concurrency));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        let mut sent = 0usize;
        loop {
            if total.is_some_and(|n| sent >= n) || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            if let Some(rate) = a.rate {
                // Exponential gaps: a Poisson process of `rate` arrivals per second.
                let u: f64 = rng.random_range(f64::EPSILON..1.0);
                tokio::time::sleep(Duration::from_secs_f64(-u.ln() / rate)).await;
            }
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let index = sent % prompts.len();
            let shared = prefix.is_some() && rng.random_bool(a.share);
            let req = a.request(&prompts[index], prefix.as_deref().filter(|_| shared))?;
            let (client, bar) = (client.clone(), bar.clone());
            let by_time = deadline.is_some();
            let timeout = Duration::from_secs_f64(a.timeout_s);
            tasks.push(tokio::spawn(async move {
                let mut o = one(client, req, timeout).await;
                o.prompt = (index, shared);
                drop(permit);
                if by_time {
                    bar.set_position(t0.elapsed().as_millis() as u64);
                } else {
                    bar.inc(1);
                }
                o
            }));
            sent += 1;
        }
        let mut outcomes = Vec::with_capacity(tasks.len());
        for t in tasks {
            outcomes.push(t.await?);
        }
        let wall = t0.elapsed().as_secs_f64();
        bar.finish_and_clear();
        println!("{}", summary(&a, &outcomes, wall));
        Ok(())
    })
}

fn summary(a: &LoadArgs, outcomes: &[Outcome], wall_s: f64) -> Value {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes.iter().filter_map(|o| o.error.as_ref()) {
        *failed.entry(o.clone()).or_default() += 1;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tokens: usize = ok.iter().map(|o| o.tokens).sum();
    let steps: u64 = ok.iter().map(|o| o.steps as u64).sum();
    let load_plain: u64 = ok.iter().map(|o| o.load_plain_steps as u64).sum();
    // At T = 0 every answer to a prompt must be the first one's.
    let mut first: BTreeMap<(usize, bool), &[u32]> = BTreeMap::new();
    let mut mismatched = 0;
    for o in &ok {
        let f = *first.entry(o.prompt).or_insert(&o.token_ids);
        mismatched += usize::from(f != o.token_ids.as_slice());
    }
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|o| o.tokens > 1)
        .filter_map(|o| o.ttft.map(|t| ms(o.e2e - t) / (o.tokens - 1) as f64))
        .collect();
    json!({
        "requests": outcomes.len(),
        "ok": ok.len(),
        "failed": failed,
        "concurrency": a.concurrency,
        "rate": a.rate,
        "speculation": !a.no_speculation,
        "max_new_tokens": a.max_new_tokens,
        "duration_s": (wall_s * 1e3).round() / 1e3,
        "output_tokens": tokens,
        "throughput_tok_s": (tokens as f64 / wall_s * 100.0).round() / 100.0,
        "requests_per_s": (ok.len() as f64 / wall_s * 1000.0).round() / 1000.0,
        "mean_accepted": if steps > 0 { tokens as f64 / steps as f64 } else { 0.0 },
        "steps": steps,
        "load_plain_steps": load_plain,
        "prefix_tokens": a.prefix_tokens,
        "share": if a.prefix_tokens > 0 { json!(a.share) } else { Value::Null },
        "prompt_tokens": ok.iter().map(|o| u64::from(o.prompt_tokens)).sum::<u64>(),
        "cached_prompt_tokens": ok.iter().map(|o| u64::from(o.cached_tokens)).sum::<u64>(),
        "mismatched_outputs": if a.temperature == 0.0 { json!(mismatched) } else { Value::Null },
        "ttft_ms": percentiles(ok.iter().filter_map(|o| o.ttft.map(ms)).collect()),
        "tpot_ms": percentiles(tpot),
        "chunk_gap_ms": percentiles(ok.iter().flat_map(|o| o.gaps.iter().map(|g| ms(*g))).collect()),
        "e2e_ms": percentiles(ok.iter().map(|o| ms(o.e2e)).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!(
            (p["p50"].as_f64(), p["p90"].as_f64(), p["p99"].as_f64()),
            (Some(50.0), Some(90.0), Some(99.0))
        );
        assert_eq!(percentiles(vec![7.0])["p99"], 7.0);
        assert!(percentiles(Vec::new()).is_null());
    }
}
