//! `eagle-draft`: serves the draft API (EAGLE head + tree builder) for one target model.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use eagle_draft::{DraftOptions, DraftService};
use eagle_engine::device::{check_precision, parse_device, parse_precision};
use eagle_engine::draft::Drafter;
use eagle_engine::loader::open_model;
use eagle_membership::record::Kind;
use eagle_membership::service::{join_service, ServiceInfo};
use eagle_proto::draft::draft_server::DraftServer;
use eagle_proto::serve;

#[derive(Parser)]
#[command(
    name = "eagle-draft",
    version,
    about = "eagle-serve draft service: runs the EAGLE head and builds draft trees over gRPC",
    long_about = "Loads an EAGLE head and, from the target model, only its token embedding and \
LM head. A coordinator opens a session per request, commits the tokens the worker accepted \
with their features, and asks for draft trees. Prints `listening ADDR` on stdout once it \
accepts connections; SIGINT or SIGTERM shut it down gracefully."
)]
struct Args {
    /// Target model (the embedding and LM head are read from it): a .gguf file or a Hugging
    /// Face directory.
    #[arg(long, env = "EAGLE_DRAFT_MODEL")]
    model: std::path::PathBuf,
    /// EAGLE head directory (config.json + model.safetensors).
    #[arg(long, env = "EAGLE_DRAFT_HEAD")]
    head: std::path::PathBuf,
    /// The name clients use for this model.
    #[arg(long, env = "EAGLE_DRAFT_MODEL_NAME", default_value = "default")]
    model_name: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "EAGLE_DRAFT_LISTEN", default_value = "127.0.0.1:50071")]
    listen: String,
    /// Weights: auto (a quantized GGUF's own blocks, else bf16), q8_0, f32, bf16 or f16. The
    /// head runs dense: bf16 under auto and q8_0.
    #[arg(long, env = "EAGLE_DTYPE", default_value = "auto")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "EAGLE_DEVICE", default_value = "cpu")]
    device: String,
    /// Memory for all sessions' head caches, in MiB; a session past it is refused.
    #[arg(long, env = "EAGLE_DRAFT_CACHE_MB", default_value_t = 1024)]
    cache_mb: u64,
    /// Sessions idle this long (seconds) are reclaimed.
    #[arg(long, env = "EAGLE_IDLE_TIMEOUT_S", default_value_t = 120.0)]
    idle_timeout_s: f64,
    /// Sessions whose trees are drafted together in one batch (one head pass per tree level
    /// over all of them), at most; requests beyond it wait for the next batch.
    #[arg(long, env = "EAGLE_DRAFT_MAX_BATCH", default_value_t = 64)]
    max_batch_sessions: usize,
    #[command(flatten)]
    etcd: eagle_membership::EtcdFlags,
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
    let _trace = eagle_trace::init("eagle-draft", &args.trace, Vec::new());
    if let Err(e) = run(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(a: Args) -> Result<()> {
    let tls = a.tls.load()?;
    let device = parse_device(&a.device)?;
    let precision = parse_precision(&a.dtype)?;
    check_precision(&precision, &device)?;
    let (model, head) = (a.model.clone(), a.head.clone());
    let drafter = tokio::task::spawn_blocking(move || -> Result<Drafter> {
        let opened = open_model(&model).with_context(|| format!("opening {}", model.display()))?;
        Drafter::load(
            opened.source.as_ref(),
            &opened.config,
            &head,
            precision.dtype,
            precision.quant,
            &device,
        )
        .with_context(|| format!("loading the EAGLE head {}", head.display()))
    })
    .await??;
    // The workers must send the features this head reads (eagle-worker --draft-features).
    let features = match drafter.head.kind.target_layers() {
        [] => "last".to_string(),
        l => l
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(","),
    };
    tracing::info!(
        model = %a.model_name,
        head = %a.head.display(),
        worker_draft_features = %features,
        "draft head loaded"
    );
    let model_name = a.model_name.clone();
    let svc = DraftService::new(
        drafter,
        DraftOptions {
            model_name: a.model_name,
            head_name: a.head.display().to_string(),
            cache_limit_bytes: a.cache_mb << 20,
            idle_timeout: Duration::from_secs_f64(a.idle_timeout_s),
            max_batch_sessions: a.max_batch_sessions,
        },
    );
    svc.register_metrics();
    eagle_metrics::start(&a.metrics, "eagle-draft").await?;
    let (reporter, health) = serve::health();
    reporter.set_serving::<DraftServer<DraftService>>().await;
    let sessions = svc.load_probe();
    let (incoming, addr) = serve::bind(&a.listen).await?;
    let info = ServiceInfo {
        kind: Kind::Draft,
        model: &model_name,
        device: &a.device,
        capacity_bytes: a.cache_mb << 20,
        rank: 0,
        tp: 1,
        prefixes: None,
    };
    let member = join_service(&a.etcd, info, addr, sessions, &reporter).await?;
    serve::server(tls.as_ref(), false)?
        .add_service(health)
        .add_service(serve::reflection())
        .add_service(DraftServer::new(svc).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, async {
            serve::shutdown_signal().await;
            if let Some(m) = member {
                m.leave().await;
            }
        })
        .await?;
    Ok(())
}
