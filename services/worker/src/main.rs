//! `eagle-worker`: serves the verification worker API for one target model.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use eagle_engine::device::{parse_device, parse_dtype};
use eagle_engine::generate::measure_costs;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_membership::record::Kind;
use eagle_membership::service::{join_service, ServiceInfo};
use eagle_proto::serve;
use eagle_proto::worker::worker_server::WorkerServer;
use eagle_worker::{WorkerOptions, WorkerService};

#[derive(Parser)]
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
    /// Weight dtype: f32, bf16 or f16.
    #[arg(long, env = "EAGLE_DTYPE", default_value = "f32")]
    dtype: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "EAGLE_DEVICE", default_value = "cpu")]
    device: String,
    /// The dtype features travel in to the draft side: bf16 (compact), f16 or f32.
    #[arg(long, env = "EAGLE_WIRE_DTYPE", default_value = "bf16")]
    wire_dtype: String,
    /// Memory for all sessions' KV caches, in MiB; a session past it is refused.
    #[arg(long, env = "EAGLE_WORKER_CACHE_MB", default_value_t = 4096)]
    cache_mb: u64,
    /// Sessions idle this long (seconds) are reclaimed.
    #[arg(long, env = "EAGLE_IDLE_TIMEOUT_S", default_value_t = 120.0)]
    idle_timeout_s: f64,
    #[command(flatten)]
    etcd: eagle_membership::EtcdFlags,
}

#[tokio::main]
async fn main() {
    let _trace = eagle_trace::init("worker");
    if let Err(e) = run(Args::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(a: Args) -> Result<()> {
    let dtype = parse_dtype(&a.dtype)?;
    let wire_dtype = parse_dtype(&a.wire_dtype)?;
    let device = parse_device(&a.device)?;
    let path = a.model.clone();
    let (target, cost) = tokio::task::spawn_blocking(move || -> Result<_> {
        let opened = open_model(&path).with_context(|| format!("opening {}", path.display()))?;
        let target = TargetModel::load(
            opened.source.as_ref(),
            opened.config,
            dtype,
            &device,
            &mut |i, n| tracing::debug!("loaded layer {i}/{n}"),
        )?;
        tracing::info!("measuring verification costs");
        let cost = measure_costs(&target)?;
        Ok((target, cost))
    })
    .await??;
    tracing::info!(model = %a.model_name, "target loaded");
    let model_name = a.model_name.clone();
    let svc = WorkerService::new(
        target,
        cost,
        WorkerOptions {
            model_name: a.model_name,
            wire_dtype,
            cache_limit_bytes: a.cache_mb << 20,
            idle_timeout: Duration::from_secs_f64(a.idle_timeout_s),
        },
    );
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
        tp: 1,
    };
    let member = join_service(&a.etcd, info, addr, sessions, &reporter).await?;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(serve::reflection())
        .add_service(WorkerServer::new(svc).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, async {
            serve::shutdown_signal().await;
            if let Some(m) = member {
                m.leave().await;
            }
        })
        .await?;
    Ok(())
}
