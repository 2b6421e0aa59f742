//! `eagle client`: calls a cluster's public Generation API.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use eagle_proto::v1::generation_client::GenerationClient;
use eagle_proto::v1::{
    generate_request::Input, ChatMessage, ChatMessages, FinishReason, GenerateRequest, Sampling,
    Speculation, SpeculationStats, Usage,
};
use tokio_stream::StreamExt;

#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// The coordinator's address.
    #[arg(long, env = "EAGLE_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// The API key, for a cluster that requires one (sent as `authorization: Bearer KEY`).
    #[arg(long, env = "EAGLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Connect over TLS, trusting this CA (PEM; `eagle cluster up --tls` prints its path as
    /// `ca PATH`).
    #[arg(long, env = "EAGLE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The prompt. With --chat it is the user's message, run through the chat template;
    /// otherwise it is sent to the model as is.
    #[arg(long)]
    pub prompt: String,
    /// Send the prompt as a chat message (with --system, if given).
    #[arg(long)]
    pub chat: bool,
    /// A system message (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Print text as it is accepted.
    #[arg(long)]
    pub stream: bool,
    /// The model to ask for (default: the cluster's).
    #[arg(long, default_value = "")]
    pub model: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: u32,
    /// 0 is greedy (the output then equals plain greedy decoding token for token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop strings (repeat the flag for several).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Decode plainly, without drafts.
    #[arg(long)]
    pub no_speculation: bool,
    /// Draft tree size, root excluded plus one; -1 sizes each tree from measured costs.
    #[arg(long)]
    pub total_token: Option<i32>,
    /// Print one JSON object with the text, token ids, finish reason, usage and statistics.
    #[arg(long)]
    pub json: bool,
    /// A multi-turn session: the cluster keeps its KV cache for the next turn with this id.
    #[arg(long, default_value = "")]
    pub session_id: String,
}

impl ClientArgs {
    /// The request with its API key, if any, as `authorization: Bearer KEY`.
    pub fn grpc_request(&self) -> Result<tonic::Request<GenerateRequest>> {
        let mut req = tonic::Request::new(self.request());
        if let Some(k) = &self.api_key {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {k}")
                    .parse()
                    .context("the API key is not a valid header value")?,
            );
        }
        Ok(req)
    }

    pub fn request(&self) -> GenerateRequest {
        let input = if self.chat || self.system.is_some() {
            let mut messages = Vec::new();
            if let Some(s) = &self.system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
            messages.push(ChatMessage {
                role: "user".into(),
                content: self.prompt.clone(),
            });
            Input::Messages(ChatMessages { messages })
        } else {
            Input::Prompt(self.prompt.clone())
        };
        GenerateRequest {
            session_id: self.session_id.clone(),
            model: self.model.clone(),
            input: Some(input),
            sampling: Some(Sampling {
                max_new_tokens: Some(self.max_new_tokens),
                temperature: Some(self.temperature),
                top_p: Some(self.top_p),
                top_k: Some(self.top_k),
                seed: self.seed,
                stop: self.stop.clone(),
            }),
            speculation: Some(Speculation {
                enabled: Some(!self.no_speculation),
                total_token: self.total_token,
                depth: None,
                top_k: None,
            }),
        }
    }
}

pub fn finish_name(f: i32) -> &'static str {
    match FinishReason::try_from(f) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Eos) => "eos",
        Ok(FinishReason::Cancelled) => "cancelled",
        _ => "unspecified",
    }
}

fn stats_line(usage: &Usage, s: &SpeculationStats, finish: i32) -> String {
    format!(
        "[{} prompt + {} generated tokens, finish {}, {} target passes, mean accepted {:.2}, \
         {} plain fallback steps, prefill {:.0} ms, wall {:.0} ms, {:.1} tok/s]",
        usage.prompt_tokens,
        usage.generated_tokens,
        finish_name(finish),
        s.steps,
        s.mean_accepted,
        s.fallback_steps,
        s.prefill_ms,
        s.wall_ms,
        usage.generated_tokens as f64 / (s.wall_ms / 1e3).max(1e-9)
    )
}

/// A client of the coordinator at `addr` (`HOST:PORT`, or a URL).
/// A client of the coordinator at `addr`; over TLS trusting `tls_ca` when given.
pub async fn connect(
    addr: &str,
    tls_ca: Option<&std::path::Path>,
) -> Result<GenerationClient<tonic::transport::Channel>> {
    let tls = match tls_ca {
        Some(p) => Some(eagle_proto::tls::trusting(
            &std::fs::read(p).with_context(|| format!("reading the CA {}", p.display()))?,
        )),
        None => None,
    };
    let ep = eagle_proto::tls::endpoint_with(addr, tls)?;
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {}", ep.uri()))?;
    Ok(GenerationClient::new(channel))
}

pub async fn call(a: &ClientArgs) -> Result<()> {
    let mut client = connect(&a.addr, a.tls_ca.as_deref()).await?;
    let req = a.grpc_request()?;
    if a.stream {
        let mut stream = client
            .stream_generate(req)
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut out = std::io::stdout();
        let (mut text, mut ids) = (String::new(), Vec::new());
        while let Some(chunk) = stream.next().await {
            let c = chunk.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
            if !a.json {
                print!("{}", c.text);
                out.flush()?;
            }
            text.push_str(&c.text);
            ids.extend_from_slice(&c.token_ids);
            if let (Some(u), Some(s)) = (&c.usage, &c.stats) {
                return report(a, &text, &ids, c.finish_reason, u, s);
            }
        }
        bail!("the stream ended without its final chunk")
    } else {
        let r = client
            .generate(req)
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        if !a.json {
            print!("{}", r.text);
        }
        let (u, s) = (r.usage.unwrap_or_default(), r.stats.unwrap_or_default());
        report(a, &r.text, &r.token_ids, r.finish_reason, &u, &s)
    }
}

fn report(
    a: &ClientArgs,
    text: &str,
    ids: &[u32],
    finish: i32,
    u: &Usage,
    s: &SpeculationStats,
) -> Result<()> {
    if a.json {
        let v = serde_json::json!({
            "text": text,
            "token_ids": ids,
            "finish_reason": finish_name(finish),
            "usage": {"prompt_tokens": u.prompt_tokens, "generated_tokens": u.generated_tokens},
            "stats": {
                "steps": s.steps,
                "mean_accepted": s.mean_accepted,
                "fallback_steps": s.fallback_steps,
                "prefill_ms": s.prefill_ms,
                "queue_ms": s.queue_ms,
                "wall_ms": s.wall_ms,
                "cached_prompt_tokens": s.cached_prompt_tokens,
            },
        });
        println!("{v}");
    } else {
        println!();
        eprintln!("{}", stats_line(u, s, finish));
    }
    Ok(())
}

pub fn run(a: ClientArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(call(&a))
}
