//! `eagle-worker`: serves the verification worker API for one target model.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use eagle_engine::device::{check_precision, parse_device, parse_dtype, parse_precision};
use eagle_engine::generate::measure_costs;
use eagle_engine::head::HeadKind;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_engine::parallel::Shard;
use eagle_membership::record::Kind;
use eagle_membership::service::{join_service, ServiceInfo};
use eagle_proto::serve;
use eagle_proto::worker::worker_server::WorkerServer;
use eagle_worker::{WorkerOptions, WorkerService};

mod tp;

/// Block keys a worker publishes in its etcd record for cache-aware routing: 512 blocks
/// (16,384 tokens of recent prefixes) in about 9 KiB of JSON, written at most every third of
/// the lease TTL and only when it changed.
const PUBLISHED_PREFIX_BLOCKS: usize = 512;

#[derive(Parser, Clone)]
#[command(
    name = "eagle-worker",
    version,
    about = "eagle-serve verification worker: holds a target model and verifies draft trees over gRPC",
    long_about = "Holds the target model and one KV cache per session. A coordinator prefills \
prompts here, then sends draft trees to verify. Prints `listening ADDR` on stdout once it \
accepts connections; SIGINT or SIGTERM shut it down gracefully."
)]
struct Args {
    /// Target model: a .gguf file, or a Hugging Face directory.
    #[arg(long, env = "EAGLE_WORKER_MODEL")]
    model: std::path::PathBuf,
    /// The name clients use for this model.
    #[arg(long, env = "EAGLE_WORKER_MODEL_NAME", default_value = "default")]
    model_name: String,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "EAGLE_WORKER_LISTEN", default_value = "127.0.0.1:50061")]
    listen: String,
    /// Weights: auto (a quantized GGUF's own blocks, else bf16; tensor-parallel ranks load
    /// bf16 slices), q8_0, f32, bf16 or f16.
    #[arg(long, env = "EAGLE_DTYPE", default_value = "auto")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "EAGLE_DEVICE", default_value = "cpu")]
    device: String,
    /// The dtype features travel in to the draft side: bf16 (compact), f16 or f32.
    #[arg(long, env = "EAGLE_WIRE_DTYPE", default_value = "bf16")]
    wire_dtype: String,
    /// The target features sent to the draft side, as the EAGLE head reads them: `last` (an
    /// EAGLE-1/2 head: the last layer's, after the final norm), `eagle3` (an EAGLE-3 head: the
    /// outputs of layers 1, L/2-1 and L-4 side by side) or three layer indices `a,b,c`.
    /// `eagle cluster up` sets it from the head's config.json.
    #[arg(long, env = "EAGLE_DRAFT_FEATURES", default_value = "last")]
    draft_features: String,
    /// Memory for all sessions' KV caches, in MiB; a session past it is refused.
    #[arg(long, env = "EAGLE_WORKER_CACHE_MB", default_value_t = 4096)]
    cache_mb: u64,
    /// Memory for the prefix cache, in MiB: the KV of recent prompts and conversations, kept
    /// in blocks of 32 tokens so a request that starts with the same tokens (a system prompt,
    /// earlier turns) computes only the rest. Least recently used blocks go first; 0 turns it
    /// off. Not used by a tensor-parallel group.
    #[arg(long, env = "EAGLE_PREFIX_CACHE_MB", default_value_t = 1024)]
    prefix_cache_mb: u64,
    /// Sessions idle this long (seconds) are reclaimed.
    #[arg(long, env = "EAGLE_IDLE_TIMEOUT_S", default_value_t = 120.0)]
    idle_timeout_s: f64,
    /// Rows (tokens) in one target pass: the steps of all sessions that are waiting share a
    /// pass up to this many rows (continuous batching); a single larger step runs alone.
    #[arg(long, env = "EAGLE_MAX_BATCH_TOKENS", default_value_t = 256)]
    max_batch_tokens: usize,
    /// Prompt tokens of one session in one pass: a longer prompt is prefilled over several
    /// passes, between the other sessions' steps.
    #[arg(long, env = "EAGLE_PREFILL_CHUNK", default_value_t = 64)]
    prefill_chunk: usize,
    #[command(flatten)]
    tp: TpArgs,
    #[command(flatten)]
    etcd: eagle_membership::EtcdFlags,
    #[command(flatten)]
    trace: eagle_trace::TraceFlags,
    #[command(flatten)]
    metrics: eagle_metrics::MetricsFlags,
    #[command(flatten)]
    tls: eagle_proto::tls::TlsFlags,
}

/// Tensor parallelism: one model split over several rank processes.
#[derive(clap::Args, Clone)]
struct TpArgs {
    /// Tensor-parallel degree: the model is split over this many rank processes. It must divide
    /// the attention heads (and the KV heads, or be a multiple of them) and the MLP width.
    #[arg(long, env = "EAGLE_TP", default_value_t = 1)]
    tp: usize,
    /// This process's rank in the group (0 serves the API). Set by rank 0 when it starts the
    /// other ranks itself, or by hand to join a group from another host with --tp-join.
    #[arg(long, default_value_t = 0)]
    tp_rank: usize,
    /// Ranks other than 0: rank 0's group address (it prints `group ADDR`).
    #[arg(long, env = "EAGLE_TP_JOIN")]
    tp_join: Option<String>,
    /// Rank 0: where the other ranks connect.
    #[arg(long, env = "EAGLE_TP_LISTEN", default_value = "127.0.0.1:0")]
    tp_listen: String,
    /// Rank 0: wait for ranks to join from elsewhere instead of starting them here.
    #[arg(long, env = "EAGLE_TP_NO_SPAWN")]
    tp_no_spawn: bool,
    /// A rank silent this long inside a collective breaks the group (seconds).
    #[arg(long, env = "EAGLE_TP_TIMEOUT_S", default_value_t = 30.0)]
    tp_timeout_s: f64,
    /// Rank 0 with --etcd: the group address published for the other ranks (default: the
    /// bound --tp-listen address).
    #[arg(long, env = "EAGLE_TP_ADVERTISE")]
    tp_advertise: Option<String>,
    /// Rank 0: once the group breaks (a rank died), leave etcd and exit with status 3, so that
    /// a supervisor (eagle cluster up, Kubernetes) starts the whole group again. Without it the
    /// broken group stays up, answering UNAVAILABLE and NOT_SERVING.
    #[arg(long, env = "EAGLE_TP_EXIT_ON_BREAK")]
    tp_exit_on_break: bool,
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    if args.tp.tp > 1 && args.etcd.etcd.is_some() && args.etcd.group.is_none() {
        // Every rank of the group registers under one group name.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        args.etcd.group = Some(format!("tp-{}-{}", host.trim(), std::process::id()));
    }
    let resource = vec![
        opentelemetry::KeyValue::new("eagle.group", args.etcd.group.clone().unwrap_or_default()),
        opentelemetry::KeyValue::new("eagle.rank", args.tp.tp_rank as i64),
    ];
    let _trace = eagle_trace::init("eagle-worker", &args.trace, resource);
    if let Err(e) = run(args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(a: Args) -> Result<()> {
    let tls = a.tls.load()?;
    let precision = parse_precision(&a.dtype)?;
    let dtype = precision.dtype;
    let wire_dtype = parse_dtype(&a.wire_dtype)?;
    let device = parse_device(&a.device)?;
    check_precision(&precision, &device)?;
    if a.tp.tp_rank > 0 {
        // Ranks above 0 serve no API: only the every-process metrics (memory, build).
        eagle_metrics::start(&a.metrics, "eagle-worker").await?;
        let a2 = a.clone();
        return tokio::task::spawn_blocking(move || tp::follower(&a2, dtype, device)).await?;
    }
    let path = a.model.clone();
    let tp_args = a.tp.clone();
    let me = a.clone();
    let (target, cost, group) = tokio::task::spawn_blocking(move || -> Result<_> {
        let opened = open_model(&path).with_context(|| format!("opening {}", path.display()))?;
        let (shard, group) = if tp_args.tp > 1 {
            let (shard, group, ranks) = tp::leader(&me, &opened.config, &device)?;
            (shard, Some((group, ranks)))
        } else {
            (Shard::single(), None)
        };
        let features = HeadKind::parse_features(&me.draft_features, opened.config.num_layers)
            .context("--draft-features")?;
        let mut target = TargetModel::load_with(
            opened.source.as_ref(),
            opened.config,
            dtype,
            precision.quant,
            &device,
            shard,
            &mut tp::progress(0),
        )?;
        target.set_draft_layers(features.target_layers())?;
        if let Some((g, _)) = &group {
            // Ranks load at their own pace; meet before the measurements' first collective.
            g.tcp().barrier(tp::JOIN_WAIT)?;
        }
        tracing::info!("measuring verification costs");
        let cost = measure_costs(&target)?;
        Ok((target, cost, group))
    })
    .await??;
    tracing::info!(model = %a.model_name, tp = a.tp.tp, "target loaded");
    let (group, ranks) = match group {
        Some((g, r)) => (Some(g), Some(r)),
        None => (None, None),
    };
    if let Some(g) = &group {
        // Only now: loading and measuring ran collectives outside the group's call order.
        g.spawn_heartbeat(Duration::from_millis(250));
    }
    let model_name = a.model_name.clone();
    let svc = WorkerService::with_group(
        target,
        cost,
        WorkerOptions {
            model_name: a.model_name,
            wire_dtype,
            cache_limit_bytes: a.cache_mb << 20,
            idle_timeout: Duration::from_secs_f64(a.idle_timeout_s),
            batch: eagle_worker::Limits {
                max_rows: a.max_batch_tokens,
                prefill_chunk: a.prefill_chunk,
            },
            prefix_cache_bytes: a.prefix_cache_mb << 20,
        },
        group.clone(),
    );
    svc.register_metrics();
    eagle_metrics::start(&a.metrics, "eagle-worker").await?;
    let (reporter, health) = serve::health();
    reporter.set_serving::<WorkerServer<WorkerService>>().await;
    let sessions = svc.load_probe();
    let (incoming, addr) = serve::bind(&a.listen).await?;
    let info = ServiceInfo {
        kind: Kind::Worker,
        model: &model_name,
        device: &a.device,
        capacity_bytes: a.cache_mb << 20,
        rank: 0,
        tp: a.tp.tp as u32,
        prefixes: Some(std::sync::Arc::new({
            let probe = svc.prefix_probe(PUBLISHED_PREFIX_BLOCKS);
            move || eagle_proto::prefix::pack(&probe())
        })),
    };
    let member = join_service(&a.etcd, info, addr, sessions, &reporter).await?;
    // Whoever comes first, a broken group or a shutdown, takes the registration out of etcd.
    let member = std::sync::Arc::new(tokio::sync::Mutex::new(member));
    if let Some(g) = group.clone() {
        let member = member.clone();
        // A broken group stays up to answer UNAVAILABLE, and says so in its health; or, with
        // --tp-exit-on-break, exits for its supervisor to start it again.
        let exit_on_break = a.tp.tp_exit_on_break;
        tokio::spawn(async move {
            loop {
                if let Some(why) = g.broken() {
                    tracing::error!("tensor-parallel group broken: {why}");
                    reporter
                        .set_not_serving::<WorkerServer<WorkerService>>()
                        .await;
                    reporter
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                    if let Some(m) = member.lock().await.take() {
                        m.leave().await;
                    }
                    if exit_on_break {
                        eprintln!("error: tensor-parallel group broken ({why}); exiting");
                        std::process::exit(3);
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }
    serve::server(tls.as_ref(), false)?
        .add_service(health)
        .add_service(serve::reflection())
        .add_service(WorkerServer::new(svc).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, async {
            serve::shutdown_signal().await;
            if let Some(m) = member.lock().await.take() {
                m.leave().await;
            }
        })
        .await?;
    if let (Some(g), Some(r)) = (group, ranks) {
        tokio::task::spawn_blocking(move || r.stop(&g, Duration::from_secs(10))).await?;
    }
    Ok(())
}
