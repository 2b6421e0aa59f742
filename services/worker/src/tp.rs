//! Starting a tensor-parallel group: rank 0 checks the degree against the model, opens the
//! group's address, starts ranks 1..N as child processes of this binary (or waits for them to
//! join from other hosts), and watches them; ranks 1..N join, load their shards and follow.
//! On CUDA with the `nccl` feature the collectives run on NCCL (rank 0 sends the NCCL id over
//! the group's channel); otherwise on the TCP backend.
//!
//! With `--etcd`, every rank registers as a member of the group (rank, TP size), so the
//! coordinator routes only to complete groups, and ranks started by hand on other hosts find
//! rank 0 through an etcd rendezvous instead of `--tp-join`.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use eagle_engine::config::ModelConfig;
use eagle_engine::generate::measure_costs;
use eagle_engine::loader::open_model;
use eagle_engine::models::TargetModel;
use eagle_engine::parallel::{Collective, Shard};
use eagle_membership::record::Kind;
use eagle_membership::service::{join_service, ServiceInfo};
use eagle_parallel::TcpGroup;
use eagle_worker::group::{follow, Group};
use eagle_worker::metrics::Timed;

use crate::Args;

/// How long ranks may take to join (they start before loading).
pub const JOIN_WAIT: Duration = Duration::from_secs(120);

/// Logs loading progress about every tenth of the layers.
pub fn progress(rank: usize) -> impl FnMut(usize, usize) {
    move |i, n| {
        if i == n || i % n.div_ceil(10).max(1) == 0 {
            tracing::info!(rank, "loaded layer {i}/{n}");
        }
    }
}

/// The collective for `device`: NCCL on CUDA when built with it, else the TCP group itself.
fn collective(tcp: Arc<TcpGroup>, device: &Device) -> Result<Arc<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        use eagle_engine::parallel::nccl::{unique_id, Nccl};
        let (rank, world) = (tcp.rank(), tcp.world());
        let id = if rank == 0 {
            let id = unique_id()?;
            tcp.broadcast(&id)?;
            id
        } else {
            tcp.receive()?
                .context("rank 0 closed the group before sending the NCCL id")?
        };
        return Ok(Arc::new(Nccl::new(device, rank, world, &id)?));
    }
    let _ = device;
    Ok(tcp)
}

/// The ranks rank 0 started: each watcher thread ends when its rank's process has exited.
pub struct Ranks(Vec<std::thread::JoinHandle<()>>);

impl Ranks {
    /// Closes the group (the ranks exit when they see it close) and waits for them, at most
    /// `within`.
    pub fn stop(self, group: &Group, within: Duration) {
        group.tcp().shutdown("rank 0 shut down");
        let t0 = std::time::Instant::now();
        while t0.elapsed() < within && self.0.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Rank 0: starts or awaits the other ranks. Returns this rank's shard and the group.
pub fn leader(a: &Args, cfg: &ModelConfig, device: &Device) -> Result<(Shard, Arc<Group>, Ranks)> {
    let n = a.tp.tp;
    Shard::check(cfg, n).context("this model cannot be split that way")?;
    let listener = TcpListener::bind(&a.tp.tp_listen)
        .with_context(|| format!("binding the group address {}", a.tp.tp_listen))?;
    let addr = listener.local_addr()?;
    println!("group {addr}");
    let mut children = Vec::new();
    if !a.tp.tp_no_spawn {
        let exe = std::env::current_exe().context("finding this binary to start the ranks")?;
        for r in 1..n {
            let dev = match a.device.strip_prefix("cuda") {
                // Rank r on the r-th GPU after rank 0's.
                Some(rest) => {
                    let base: usize = rest.trim_start_matches(':').parse().unwrap_or(0);
                    format!("cuda:{}", base + r)
                }
                None => a.device.clone(),
            };
            let mut cmd = Command::new(&exe);
            cmd.arg("--model")
                .arg(&a.model)
                .args(["--dtype", &a.dtype, "--device", &dev])
                .args(["--tp", &n.to_string(), "--tp-rank", &r.to_string()])
                .args(["--tp-join", &addr.to_string()])
                .args(["--tp-timeout-s", &a.tp.tp_timeout_s.to_string()])
                .args(["--idle-timeout-s", &a.idle_timeout_s.to_string()])
                // The ranks register under rank 0's model name (a group agrees on it).
                .args(["--model-name", &a.model_name]);
            if let Some(e) = &a.trace.otlp_endpoint {
                cmd.args(["--otlp-endpoint", e]);
            }
            if let (Some(ca), Some(cert), Some(key)) =
                (&a.tls.tls_ca, &a.tls.tls_cert, &a.tls.tls_key)
            {
                cmd.arg("--tls-ca")
                    .arg(ca)
                    .arg("--tls-cert")
                    .arg(cert)
                    .arg("--tls-key")
                    .arg(key);
            }
            if let Some(e) = &a.etcd.etcd {
                cmd.args(["--etcd", e, "--cluster", &a.etcd.cluster])
                    .args(["--etcd-ttl-s", &a.etcd.etcd_ttl_s.to_string()]);
                if let Some(g) = &a.etcd.group {
                    cmd.args(["--group", g]);
                }
                for (flag, path) in [
                    ("--etcd-ca", &a.etcd.etcd_ca),
                    ("--etcd-cert", &a.etcd.etcd_cert),
                    ("--etcd-key", &a.etcd.etcd_key),
                ] {
                    if let Some(p) = path {
                        cmd.arg(flag).arg(p);
                    }
                }
            }
            // A rank's metrics address, if any, is its own: never rank 0's.
            cmd.env_remove("EAGLE_METRICS_ADDR");
            let child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting rank {r}"))?;
            println!("rank {r} pid {}", child.id());
            children.push((r, child));
        }
    }
    if let (true, Some(cfg), Some(group)) =
        (a.tp.tp_no_spawn, a.etcd.config(), a.etcd.group.clone())
    {
        // Publish this group's address for ranks started elsewhere; it completes in the
        // background once they have all published theirs.
        let my =
            a.tp.tp_advertise
                .clone()
                .unwrap_or_else(|| addr.to_string());
        tokio::runtime::Handle::current().spawn(async move {
            let r = async {
                let client = eagle_membership::connect(&cfg).await?;
                let world = n as u32;
                eagle_membership::rendezvous(
                    &client,
                    &cfg.cluster,
                    &group,
                    0,
                    world,
                    &my,
                    JOIN_WAIT,
                )
                .await
            };
            match r.await {
                Ok(addrs) => tracing::info!("rendezvous complete: {addrs:?}"),
                Err(e) => tracing::warn!("rendezvous through etcd: {e}"),
            }
        });
    }
    let timeout = Duration::from_secs_f64(a.tp.tp_timeout_s);
    // With TLS, the ranks' links are mutual TLS too: rank 0 admits only certified ranks.
    let tls = a.tls.load()?;
    let server = tls
        .as_ref()
        .map(|t| t.rustls_server(false))
        .transpose()?
        .map(Arc::new);
    let tcp = Arc::new(TcpGroup::lead_with(
        &listener, n, JOIN_WAIT, timeout, server,
    )?);
    let mut watchers = Vec::new();
    for (r, mut child) in children {
        let tcp = tcp.clone();
        watchers.push(std::thread::spawn(move || {
            let pid = child.id();
            let status = match child.wait() {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            tcp.shutdown(&format!("rank {r} (pid {pid}) exited ({status})"));
        }));
    }
    // Rank 0's collectives are timed for the metrics; every rank waits in each one alike.
    let comm: Arc<dyn Collective> = Arc::new(Timed(collective(tcp.clone(), device)?));
    tracing::info!("tensor-parallel group of {n} formed at {addr}");
    Ok((Shard::of(comm), Arc::new(Group::new(tcp)), Ranks(watchers)))
}

/// Ranks 1..N: join rank 0, load this rank's shard, measure as rank 0 does, then follow.
pub fn follower(a: &Args, dtype: DType, device: Device) -> Result<()> {
    let (r, n) = (a.tp.tp_rank, a.tp.tp);
    let rt = tokio::runtime::Handle::current();
    let join = match (&a.tp.tp_join, a.etcd.config(), &a.etcd.group) {
        (Some(j), _, _) => j.clone(),
        (None, Some(cfg), Some(group)) => {
            tracing::info!(rank = r, "finding rank 0 of group {group} through etcd");
            let addrs = rt.block_on(async {
                let client = eagle_membership::connect(&cfg).await?;
                let (rank, world) = (r as u32, n as u32);
                eagle_membership::rendezvous(
                    &client,
                    &cfg.cluster,
                    group,
                    rank,
                    world,
                    "",
                    JOIN_WAIT,
                )
                .await
            })?;
            addrs[0].clone()
        }
        _ => anyhow::bail!(
            "a rank other than 0 needs --tp-join (rank 0's group address), or --etcd and --group \
             to find it there"
        ),
    };
    let timeout = Duration::from_secs_f64(a.tp.tp_timeout_s);
    let client = a
        .tls
        .load()?
        .map(|t| t.rustls_client())
        .transpose()?
        .map(Arc::new);
    let tcp = Arc::new(TcpGroup::join_with(
        join.as_str(),
        r,
        n,
        JOIN_WAIT,
        timeout,
        client,
    )?);
    let comm = collective(tcp.clone(), &device)?;
    let opened = open_model(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let target = TargetModel::load_shard(
        opened.source.as_ref(),
        opened.config,
        dtype,
        &device,
        Shard::of(comm),
        &mut progress(r),
    )?;
    // Ranks load at their own pace; meet before the first collective of the measurements.
    tcp.barrier(JOIN_WAIT)?;
    measure_costs(&target)?;
    // Registered as rank r of the group, so the group counts as complete only while this rank
    // lives (its lease lapses when it dies).
    let bound = tcp.local_addr()?;
    let member = rt.block_on(async {
        let (reporter, _health) = eagle_proto::serve::health();
        let info = ServiceInfo {
            kind: Kind::Worker,
            model: &a.model_name,
            device: &a.device,
            capacity_bytes: a.cache_mb << 20,
            rank: r as u32,
            tp: n as u32,
            prefixes: None,
        };
        join_service(&a.etcd, info, bound, || 0, &reporter).await
    })?;
    tracing::info!(rank = r, "shard loaded; following rank 0");
    let result = follow(&tcp, &target, Duration::from_secs_f64(a.idle_timeout_s));
    if let Some(m) = member {
        rt.block_on(m.leave());
    }
    result?;
    tracing::info!(rank = r, "rank 0 closed the group");
    Ok(())
}
