//! `eagle-coordinator`: serves the public Generation API in front of a draft service and a
//! verification worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use eagle_coordinator::auth::ApiKeys;
use eagle_coordinator::backends::{draft_client, worker_client, Backends, Timeouts, WorkerPool};
use eagle_coordinator::load::SpecLoad;
use eagle_coordinator::membership as etcd;
use eagle_coordinator::queue::Queue;
use eagle_coordinator::sessions::SessionPlacements;
use eagle_coordinator::Coordinator;
use eagle_engine::chat::ChatTemplate;
use eagle_engine::loader::open_model;
use eagle_membership::EtcdFlags;
use eagle_proto::common::Empty;
use eagle_proto::serve;
use eagle_proto::v1::generation_server::GenerationServer;
use eagle_proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "eagle-coordinator",
    version,
    about = "eagle-serve coordinator: the public Generate / StreamGenerate API",
    long_about = "Tokenises and validates requests, queues them (a bounded queue; a full one \
answers RESOURCE_EXHAUSTED), and drives each one across the draft service and the \
verification worker. Without a reachable draft service it decodes plainly, which gives the same \
text. With --http-addr it also serves the OpenAI-compatible HTTP API (/v1/chat/completions, \
/v1/completions, /v1/models, /health) and a chat page at /, and prints `http http://ADDR`. \
Prints `listening ADDR` on stdout once it accepts connections (after the `http` line); SIGINT or \
SIGTERM shut it down gracefully."
)]
struct Args {
    /// Target model (only its tokenizer and config are read here): a .gguf file or a Hugging
    /// Face directory.
    #[arg(long, env = "EAGLE_COORDINATOR_MODEL")]
    model: std::path::PathBuf,
    /// The name clients use for this model (requests naming another are refused).
    #[arg(long, env = "EAGLE_COORDINATOR_MODEL_NAME", default_value = "default")]
    model_name: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(
        long,
        env = "EAGLE_COORDINATOR_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: String,
    /// Verification worker addresses (repeat the flag, or separate with commas); new sessions
    /// go to the least busy. With --etcd, workers come from etcd instead.
    #[arg(
        long = "worker",
        env = "EAGLE_COORDINATOR_WORKERS",
        value_delimiter = ',',
        required_unless_present = "etcd"
    )]
    workers: Vec<String>,
    /// The draft service's address; without one, every request decodes plainly.
    #[arg(long, env = "EAGLE_COORDINATOR_DRAFT")]
    draft: Option<String>,
    /// Requests generating at once.
    #[arg(long, env = "EAGLE_MAX_RUNNING", default_value_t = 16)]
    max_running: usize,
    /// Requests waiting for a slot; past this, RESOURCE_EXHAUSTED.
    #[arg(long, env = "EAGLE_MAX_WAITING", default_value_t = 64)]
    max_waiting: usize,
    /// Deadline of each worker call, in milliseconds.
    #[arg(long, env = "EAGLE_WORKER_TIMEOUT_MS", default_value_t = 60_000)]
    worker_timeout_ms: u64,
    /// Deadline of each draft call, in milliseconds; a late draft turns into a plain step.
    #[arg(long, env = "EAGLE_DRAFT_TIMEOUT_MS", default_value_t = 2_000)]
    draft_timeout_ms: u64,
    /// After a draft failure, decode plainly this long before trying the draft side again.
    #[arg(long, env = "EAGLE_DRAFT_RETRY_MS", default_value_t = 1_000)]
    draft_retry_ms: u64,
    /// Speculate at every step of requests with automatic trees, whatever the load. By default
    /// a step decodes plainly where the worker's measured pass costs say trees of the recent
    /// size and acceptance give fewer tokens per second than plain steps (under load on a
    /// CPU, or with a weak head); see eagle_spec_load_plain_steps_total.
    #[arg(long, env = "EAGLE_ALWAYS_SPECULATE")]
    always_speculate: bool,
    /// Chat template override: chatml, vicuna, llama2 or llama3 (default: the model's own).
    #[arg(long, env = "EAGLE_CHAT_TEMPLATE")]
    chat_template: Option<String>,
    /// How long to wait for the worker at start, in seconds.
    #[arg(long, env = "EAGLE_STARTUP_WAIT_S", default_value_t = 120)]
    startup_wait_s: u64,
    /// With --etcd: how long a request waits for a healthy worker group before UNAVAILABLE,
    /// in milliseconds.
    #[arg(long, env = "EAGLE_ROUTE_WAIT_MS", default_value_t = 5_000)]
    route_wait_ms: u64,
    /// How long a multi-turn session's KV placement is kept (seconds); match the workers'
    /// --idle-timeout-s, after which they drop the cache.
    #[arg(long, env = "EAGLE_SESSION_TTL_S", default_value_t = 120)]
    session_ttl_s: u64,
    /// Also serve the OpenAI-compatible HTTP API and the web chat page on this address (port 0
    /// picks a free port); prints `http http://ADDR` on stdout once it accepts connections.
    #[arg(long, env = "EAGLE_HTTP_ADDR")]
    http_addr: Option<String>,
    /// Require an API key (`authorization: Bearer KEY`) on the public API: a file with one key
    /// per line (`#` comments allowed). Keys may also come in EAGLE_API_KEYS (comma-separated).
    /// Health checks, reflection and the chat page stay open.
    #[arg(long, env = "EAGLE_API_KEYS_FILE")]
    api_keys_file: Option<std::path::PathBuf>,
    /// With API keys: requests one key may have running or queued at once (0: no limit); past
    /// it, RESOURCE_EXHAUSTED (HTTP 429).
    #[arg(long, env = "EAGLE_MAX_RUNNING_PER_KEY", default_value_t = 0)]
    max_running_per_key: usize,
    #[command(flatten)]
    etcd: EtcdFlags,
    #[command(flatten)]
    trace: eagle_trace::TraceFlags,
    #[command(flatten)]
    metrics: eagle_metrics::MetricsFlags,
    #[command(flatten)]
    tls: eagle_proto::tls::TlsFlags,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _trace = eagle_trace::init("eagle-coordinator", &args.trace, Vec::new());
    if let Err(e) = run(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(a: Args) -> Result<()> {
    let tls = a.tls.load()?;
    if let Some(t) = &tls {
        // Calls to the workers and the draft service present this process's certificate.
        eagle_proto::tls::set_client(t.clone());
    }
    let keys = ApiKeys::load(
        a.api_keys_file.as_deref(),
        std::env::var("EAGLE_API_KEYS").ok().as_deref(),
        a.max_running_per_key,
    )?;
    if let Some(k) = &keys {
        tracing::info!(
            keys = k.len(),
            per_key_limit = a.max_running_per_key,
            "API keys required"
        );
    }
    let opened = open_model(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let mut tokenizer = opened.tokenizer;
    if let Some(name) = &a.chat_template {
        tokenizer.set_chat_template(ChatTemplate::by_name(name)?);
    }
    let draft = a.draft.as_deref().map(draft_client).transpose()?;
    let session_ttl = Duration::from_secs(a.session_ttl_s);
    let (reporter, health) = serve::health();
    let (workers, etcd, sessions) = match a.etcd.config() {
        None => (
            WorkerPool::new(&a.workers)?,
            None,
            SessionPlacements::local(session_ttl),
        ),
        Some(cfg) => {
            let m = etcd::start(
                &cfg,
                &a.model_name,
                Duration::from_secs(a.startup_wait_s),
                Duration::from_millis(a.route_wait_ms),
                session_ttl,
                &reporter,
            )
            .await?;
            (
                WorkerPool::from_etcd(m.routes.clone()),
                Some(m.routes),
                m.sessions,
            )
        }
    };
    let first_addr = match &etcd {
        Some(r) => r.groups().first().map(|g| g.addr.clone()),
        None => None,
    };
    let etcd_worker = first_addr.as_deref().map(worker_client).transpose()?;

    // Workers measure their verification costs at start; wait for them all.
    let t0 = Instant::now();
    let mut infos = Vec::new();
    let firsts: Vec<(&str, &WorkerClient<Channel>)> = match (&first_addr, &etcd_worker) {
        (Some(a), Some(c)) => vec![(a.as_str(), c)],
        _ => workers.all().collect(),
    };
    for (addr, client) in firsts {
        let info = loop {
            match client.clone().info(Empty {}).await {
                Ok(i) => break i.into_inner(),
                Err(e) if t0.elapsed() < Duration::from_secs(a.startup_wait_s) => {
                    tracing::debug!(error = %e.message(), "waiting for the worker at {addr}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => bail!("the worker at {addr} did not answer: {}", e.message()),
            }
        };
        if info.model != a.model_name {
            bail!(
                "the worker at {addr} serves {:?}, not {:?}",
                info.model,
                a.model_name
            );
        }
        if info.vocab_size as usize != opened.config.vocab_size {
            bail!(
                "the worker at {addr} has a vocabulary of {}, {} has {}",
                info.vocab_size,
                a.model.display(),
                opened.config.vocab_size
            );
        }
        infos.push(info);
    }
    let info = infos.swap_remove(0);
    let backends = Backends {
        workers,
        draft,
        etcd,
        sessions,
        cost: info.cost_profile,
        spec_load: SpecLoad::new(!a.always_speculate),
        tokenizer,
        model_name: a.model_name.clone(),
        max_context: info.max_context as usize,
        timeouts: Timeouts {
            worker: Duration::from_millis(a.worker_timeout_ms),
            draft: Duration::from_millis(a.draft_timeout_ms),
            draft_retry: Duration::from_millis(a.draft_retry_ms),
        },
    };
    let coord = Arc::new(
        Coordinator::new(backends, Queue::start(a.max_running, a.max_waiting)).with_keys(keys),
    );
    coord.register_metrics(a.max_running, a.max_waiting);
    eagle_metrics::start(&a.metrics, "eagle-coordinator").await?;
    reporter
        .set_serving::<GenerationServer<Coordinator>>()
        .await;
    let shutdown = serve::Shutdown::on_signal();
    let http = match &a.http_addr {
        Some(addr) => {
            let listener = eagle_coordinator::http::bind(addr, tls.as_ref()).await?;
            let stop = shutdown.clone().wait();
            Some(tokio::spawn(eagle_coordinator::http::serve(
                listener,
                coord.clone(),
                stop,
            )))
        }
        None => None,
    };
    // Bound after the HTTP API: `listening ADDR` is the last line a starter waits for.
    let (incoming, _addr) = serve::bind(&a.listen).await?;
    tracing::info!(model = %a.model_name, workers = ?a.workers, draft = ?a.draft, http = ?a.http_addr, "coordinator ready");
    serve::server(tls.as_ref(), true)?
        .add_service(health)
        .add_service(serve::reflection())
        .add_service(GenerationServer::from_arc(coord))
        .serve_with_incoming_shutdown(incoming, shutdown.wait())
        .await?;
    if let Some(h) = http {
        h.await.context("the HTTP server task")??;
    }
    Ok(())
}
