//! `eagle cluster up` / `eagle cluster demo`: a local cluster on loopback, one process per
//! service (coordinator, draft service, N verification workers), started from the binaries
//! next to this one.
//!
//! Children die with this process (PR_SET_PDEATHSIG on Linux); on SIGINT or SIGTERM they are
//! stopped gracefully, the coordinator first so that it stops taking requests. A service that
//! exits on its own is started again at the same address (`supervisor.rs`: backoff and a
//! restart budget); only an exhausted budget, or the exit of a local etcd, stops the cluster.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::client::ClientArgs;
use crate::runtime::{resolve_head, resolve_or_fetch, HeadPolicy};
use crate::supervisor::{self, Policy, Proc, Restart};
use crate::{models, ModelArgs};

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Start a local cluster and serve until SIGINT/SIGTERM. Prints `ready ADDR` (the gRPC
    /// API) on stdout once the coordinator accepts requests, then `http URL` (the
    /// OpenAI-compatible HTTP API, and the chat page at that URL in a browser); with
    /// --coordinators N, such a pair of lines for each.
    Up(UpArgs),
    /// Start a local cluster, answer one prompt through it (streamed), and shut it down.
    Demo {
        #[command(flatten)]
        up: UpArgs,
        /// The prompt, sent as a chat message.
        #[arg(
            long,
            default_value = "What is the capital of France? Answer in one paragraph."
        )]
        prompt: String,
        #[arg(long, default_value_t = 96)]
        max_new_tokens: u32,
    },
    /// List what etcd knows about a cluster: members (group, rank, address, process id,
    /// lease), complete groups, and KV placements of multi-turn sessions.
    Status(crate::etcd::StatusArgs),
    /// Write a throwaway CA (ca.pem; its key is not kept) and a certificate it signs for
    /// localhost and 127.0.0.1 (cert.pem, key.pem) into DIR: what `cluster up --tls` makes,
    /// for services started by hand (--tls-ca, --tls-cert, --tls-key).
    Certs {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args, Clone, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The coordinator's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "EAGLE_PORT", default_value_t = 50051)]
    pub port: u16,
    /// Verification workers (each holds the whole target, or one group of --tp ranks).
    #[arg(long, env = "EAGLE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Coordinators: each serves the public APIs and drives requests over the same workers
    /// and draft service; the first takes --port and --http-port, the others free ports. Each
    /// prints its `ready ADDR` and `http URL` lines. Sessions (KV placement) and the workers'
    /// prefix summaries live in etcd with --etcd; without it, each coordinator keeps its own.
    #[arg(long, env = "EAGLE_COORDINATORS", default_value_t = 1)]
    pub coordinators: usize,
    /// Tensor-parallel degree of each worker: the target is split over this many rank
    /// processes (it must divide the attention heads and the MLP width).
    #[arg(long, env = "EAGLE_TP", default_value_t = 1)]
    pub tp: usize,
    /// Start no draft service: every request decodes plainly.
    #[arg(long)]
    pub no_draft: bool,
    /// Requests generating at once.
    #[arg(long, env = "EAGLE_MAX_RUNNING", default_value_t = 16)]
    pub max_running: usize,
    /// Requests waiting for a slot; past this, RESOURCE_EXHAUSTED.
    #[arg(long, env = "EAGLE_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: usize,
    /// The HTTP API's and the chat page's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "EAGLE_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,
    /// Serve no HTTP API (gRPC only).
    #[arg(long)]
    pub no_http: bool,
    /// Require API keys on the public APIs (one key per line; see eagle-coordinator --help).
    #[arg(long, env = "EAGLE_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// With API keys: requests one key may have running or queued at once (0: no limit).
    #[arg(long, env = "EAGLE_MAX_RUNNING_PER_KEY", default_value_t = 0)]
    pub max_running_per_key: usize,
    /// Restarts allowed to each service within 10 minutes; one more exit stops the cluster
    /// (0: never restart; any exit stops it).
    #[arg(long, env = "EAGLE_MAX_RESTARTS", default_value_t = 5)]
    pub max_restarts: u32,
    /// Mutual TLS between every process, and TLS on the public APIs: a throwaway CA and
    /// certificate are made for this cluster; `ca PATH` on stdout names the CA a client must
    /// trust (eagle client --tls-ca PATH).
    #[arg(long)]
    pub tls: bool,
    /// Serve no Prometheus metrics. By default every process serves them on a free port and
    /// a `metrics NAME URL` line per process follows `ready` on stdout.
    #[arg(long)]
    pub no_metrics: bool,
    /// Write Prometheus file-based service discovery files here (eagle-coordinator.json,
    /// eagle-draft.json, eagle-worker.json), as deploy/prometheus/prometheus.yml reads them.
    #[arg(long, env = "EAGLE_PROMETHEUS_SD_DIR")]
    pub prometheus_sd_dir: Option<PathBuf>,
    /// Export every process's spans by OTLP over gRPC to this collector (the processes also
    /// read OTEL_EXPORTER_OTLP_ENDPOINT and the other OTEL_* variables themselves).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[command(flatten)]
    pub etcd: crate::etcd::UpEtcdArgs,
}

impl UpArgs {
    fn policy(&self) -> Policy {
        Policy {
            max_restarts: self.max_restarts,
            window: Duration::from_secs(600),
        }
    }
}

/// One line of what `cluster up` announces on stdout. A reader that has stopped reading (a
/// closed pipe: `eagle cluster up | head -1`, or a script that read the `ready` line it
/// needed) must not bring the running cluster down, so a failed write is ignored (`println!`
/// would panic, and the cluster would stop with it).
fn announce(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
}

pub fn run(cmd: ClusterCommand) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cmd {
            ClusterCommand::Up(a) => {
                let mut c = Cluster::start(&a).await?;
                for (i, (addr, http)) in c.coordinators.iter().enumerate() {
                    announce(format_args!("ready {addr}"));
                    if let Some(url) = http {
                        announce(format_args!("http {url}"));
                        if i == 0 {
                            eprintln!("chat page and OpenAI-compatible API at {url}");
                        }
                    }
                }
                for (name, url) in &c.metrics {
                    announce(format_args!("metrics {name} {url}"));
                }
                if let Some(t) = &c.tls {
                    announce(format_args!("ca {}", t.ca.display()));
                }
                if let Some(dir) = &a.prometheus_sd_dir {
                    c.write_prometheus_targets(dir)?;
                    eprintln!("Prometheus targets written to {}", dir.display());
                }
                let outcome = tokio::select! {
                    _ = eagle_proto::serve::shutdown_signal() => Ok(()),
                    e = c.supervise(a.policy()) => Err(e),
                };
                c.stop().await;
                outcome
            }
            ClusterCommand::Demo {
                up,
                prompt,
                max_new_tokens,
            } => {
                let up = UpArgs {
                    port: 0,
                    no_http: true,
                    no_metrics: true,
                    ..up
                };
                let mut c = Cluster::start(&up).await?;
                eprintln!("cluster ready at {}", c.addr);
                let args = ClientArgs {
                    addr: c.addr.clone(),
                    api_key: std::env::var("EAGLE_API_KEY").ok(),
                    tls_ca: c.tls.as_ref().map(|t| t.ca.clone()),
                    prompt,
                    chat: true,
                    system: None,
                    stream: true,
                    model: String::new(),
                    max_new_tokens,
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    seed: 0,
                    stop: Vec::new(),
                    no_speculation: false,
                    total_token: None,
                    json: false,
                    session_id: String::new(),
                };
                let r = tokio::select! {
                    r = crate::client::call(&args) => r,
                    e = c.supervise(up.policy()) => Err(e),
                };
                c.stop().await;
                r
            }
            ClusterCommand::Status(a) => crate::etcd::status(&a).await,
            ClusterCommand::Certs { dir } => {
                let f = crate::certs::write(&dir, "eagle-serve")?;
                println!("ca {}", f.ca.display());
                println!("cert {}", f.cert.display());
                println!("key {}", f.key.display());
                Ok(())
            }
        }
    })
}

/// The name the cluster serves its model under: the registry name, or the file's stem.
fn model_name(arg: &str) -> String {
    if models::find(arg).is_some() {
        return arg.to_string();
    }
    Path::new(arg)
        .file_stem()
        .map_or_else(|| arg.to_string(), |s| s.to_string_lossy().to_string())
}

/// A service binary installed next to this one.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} is missing next to {} (build the workspace: cargo build --release)",
            name,
            exe.display()
        );
    }
    Ok(p)
}

pub struct Cluster {
    /// The first coordinator's gRPC address.
    pub addr: String,
    /// Its HTTP API's base URL, when it is on.
    pub http: Option<String>,
    /// Every coordinator's gRPC address and HTTP URL, the first one's first.
    pub coordinators: Vec<(String, Option<String>)>,
    /// Each process's metrics URL, by a short name (coordinator, draft, worker-N).
    pub metrics: Vec<(String, String)>,
    /// The cluster's certificates, with --tls.
    pub tls: Option<crate::certs::CertFiles>,
    procs: Vec<Proc>,
    /// A local etcd's data, removed when the cluster goes.
    _etcd_dir: Option<crate::etcd::DataDir>,
    /// The certificates' folder, removed when the cluster goes.
    _tls_dir: Option<crate::etcd::DataDir>,
}

/// What a started service announced on stdout.
struct Announced {
    /// From its `listening ADDR` line.
    addr: String,
    /// From an `http URL` line before it: the HTTP API's URL (http:// or https://).
    http: Option<String>,
    /// From a `metrics http://ADDR/metrics` line before it.
    metrics: Option<String>,
}

/// Starts `bin` with `args`, waits for its `listening ADDR` line. The process it returns
/// restarts with the addresses it announced.
async fn spawn(name: String, bin: PathBuf, args: Vec<String>) -> Result<(Proc, Announced)> {
    let mut cmd = Command::new(&bin);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Each child names itself (eagle-coordinator, eagle-worker...) in its traces.
        .env_remove("OTEL_SERVICE_NAME")
        .kill_on_drop(true);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches only this (child) process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut before = Vec::new();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("listening ") {
                return Ok::<_, anyhow::Error>(Some(addr.trim().to_string()));
            }
            before.push(line);
        }
        Ok(None)
    };
    let addr = match tokio::time::timeout(Duration::from_secs(600), wait).await {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await?;
            bail!("{name} exited before listening ({status}); its log is above")
        }
        Err(_) => bail!("{name} did not start listening within 10 minutes"),
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let http = before
        .iter()
        .find_map(|l| l.strip_prefix("http "))
        .map(|u| u.trim().to_string());
    let metrics = before
        .iter()
        .find_map(|l| l.strip_prefix("metrics "))
        .map(|u| u.trim().to_string());
    let mut restart = Restart { bin, args };
    restart.pin("--listen", &addr);
    if let Some(h) = http.as_deref().and_then(host_port) {
        restart.pin("--http-addr", h);
    }
    if let Some(m) = metrics.as_deref().and_then(host_port) {
        restart.pin("--metrics-addr", m);
    }
    Ok((
        Proc::new(name, child, Some(restart)),
        Announced {
            addr,
            http,
            metrics,
        },
    ))
}

/// `127.0.0.1:PORT` of `http://127.0.0.1:PORT/metrics` (or `https://`).
fn host_port(url: &str) -> Option<&str> {
    url.split_once("://")?.1.split('/').next()
}

impl Cluster {
    pub async fn start(a: &UpArgs) -> Result<Self> {
        if a.etcd.worker_count(a.workers) == 0 {
            bail!("--workers (or --groups) must be at least 1");
        }
        let m = &a.model;
        let model = resolve_or_fetch(&m.model)?;
        let policy = if a.no_draft {
            HeadPolicy::None
        } else {
            HeadPolicy::Prefer
        };
        let head = resolve_head(m, policy)?;
        let name = model_name(&m.model);
        let model_s = model.display().to_string();
        // With --tls, certificates for every process, made before any starts.
        let (tls, tls_dir) = if a.tls {
            let dir = std::env::temp_dir().join(format!("eagle-tls-{}", std::process::id()));
            let files = crate::certs::write(&dir, "eagle-serve")?;
            (Some(files), Some(crate::etcd::DataDir(dir)))
        } else {
            (None, None)
        };
        let tls_args = tls
            .as_ref()
            .map_or_else(Vec::new, crate::certs::CertFiles::args);
        let common = |extra: &[String]| -> Vec<String> {
            let mut v = vec![
                "--model".into(),
                model_s.clone(),
                "--model-name".into(),
                name.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ];
            if !a.no_metrics {
                v.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
            }
            if let Some(e) = &a.otlp_endpoint {
                v.extend(["--otlp-endpoint".into(), e.clone()]);
            }
            v.extend_from_slice(&tls_args);
            v.extend_from_slice(extra);
            v
        };
        let dev = vec![
            "--dtype".to_string(),
            m.dtype.clone(),
            "--device".to_string(),
            m.device.clone(),
        ];
        let mut cluster = Cluster {
            addr: String::new(),
            http: None,
            coordinators: Vec::new(),
            metrics: Vec::new(),
            tls: None,
            procs: Vec::new(),
            _etcd_dir: None,
            _tls_dir: None,
        };
        cluster.tls = tls;
        cluster._tls_dir = tls_dir;
        // A local etcd serves over mutual TLS with the cluster's certificates under --tls.
        let mut etcd_tls = Vec::new();
        let etcd_url = match a.etcd.resolve(cluster.tls.as_ref()).await? {
            Some((url, local)) => {
                if let Some(l) = local {
                    cluster.procs.push(Proc::new("etcd".into(), l.child, None));
                    cluster._etcd_dir = Some(l.dir);
                    if let Some(t) = &cluster.tls {
                        etcd_tls = t.etcd_args();
                    }
                }
                Some(url)
            }
            None => None,
        };
        let member = |group: Option<String>| {
            let mut v = etcd_url
                .as_deref()
                .map_or_else(Vec::new, |u| a.etcd.member_args(u, group));
            v.extend_from_slice(&etcd_tls);
            v
        };
        let workers = a.etcd.worker_count(a.workers);
        // Workers and the draft service load in parallel.
        let worker_bin = sibling("eagle-worker")?;
        let mut worker_extra = dev.clone();
        worker_extra.extend(["--tp".to_string(), a.tp.to_string()]);
        if let Some(h) = &head {
            // The workers send the features the head reads (EAGLE-3: three inner layers).
            worker_extra.extend(["--draft-features".to_string(), head_features(h)?]);
        }
        if a.tp > 1 {
            // A group whose rank died exits, and the supervisor starts it again whole.
            worker_extra.push("--tp-exit-on-break".to_string());
        }
        let starts: Vec<_> = (0..workers)
            .map(|i| {
                let mut args = common(&worker_extra);
                args.extend(member(Some(format!("g{i}"))));
                tokio::spawn(spawn(format!("worker {i}"), worker_bin.clone(), args))
            })
            .collect();
        let draft = match &head {
            Some(h) => {
                let mut extra = dev.clone();
                extra.extend(["--head".to_string(), h.display().to_string()]);
                extra.extend(member(None));
                let bin = sibling("eagle-draft")?;
                Some(tokio::spawn(spawn(
                    "draft service".into(),
                    bin,
                    common(&extra),
                )))
            }
            None => None,
        };
        eprintln!(
            "starting {} worker(s){}{} for {name}",
            workers,
            if a.tp > 1 {
                format!(" of {} tensor-parallel ranks each", a.tp)
            } else {
                String::new()
            },
            if head.is_some() {
                " and a draft service"
            } else {
                ""
            }
        );
        let mut worker_addrs = Vec::new();
        let mut first_err = None;
        for (i, w) in starts.into_iter().enumerate() {
            match w.await.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok((p, a)) => {
                    cluster.procs.push(p);
                    cluster.announce_metrics(format!("worker-{i}"), a.metrics);
                    worker_addrs.push(a.addr);
                }
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        let draft = match draft {
            Some(d) => Some(d.await.map_err(anyhow::Error::from).and_then(|r| r)),
            None => None,
        };
        let draft_addr = match draft {
            Some(Ok((p, a))) => {
                cluster.procs.push(p);
                cluster.announce_metrics("draft".into(), a.metrics);
                Some(a.addr)
            }
            Some(Err(e)) => {
                first_err = first_err.or(Some(e));
                None
            }
            None => None,
        };
        if let Some(e) = first_err {
            cluster.stop().await;
            return Err(e);
        }
        let mut extra = vec![
            "--max-running".to_string(),
            a.max_running.to_string(),
            "--max-waiting".to_string(),
            a.max_waiting.to_string(),
        ];
        if etcd_url.is_some() {
            // Workers and the draft service are found in etcd.
            extra.extend(member(None));
        } else {
            for w in &worker_addrs {
                extra.extend(["--worker".to_string(), w.clone()]);
            }
            if let Some(d) = &draft_addr {
                extra.extend(["--draft".to_string(), d.clone()]);
            }
        }
        if let Some(t) = &m.chat_template {
            extra.extend(["--chat-template".to_string(), t.clone()]);
        }
        if let Some(f) = &a.api_keys_file {
            extra.extend([
                "--api-keys-file".to_string(),
                f.display().to_string(),
                "--max-running-per-key".to_string(),
                a.max_running_per_key.to_string(),
            ]);
        }
        if !a.no_http {
            extra.extend([
                "--http-addr".to_string(),
                format!("127.0.0.1:{}", a.http_port),
            ]);
        }
        if a.coordinators == 0 {
            cluster.stop().await;
            bail!("--coordinators must be at least 1");
        }
        for i in 0..a.coordinators {
            let mut args = common(&extra);
            let listen = args
                .iter()
                .position(|x| x == "127.0.0.1:0")
                .expect("listen arg");
            // The first coordinator takes the ports asked for; the others free ones.
            if i == 0 {
                args[listen] = format!("127.0.0.1:{}", a.port);
            } else if let Some(h) = args.iter().position(|x| x == "--http-addr") {
                args[h + 1] = "127.0.0.1:0".to_string();
            }
            let name = match i {
                0 => "coordinator".to_string(),
                _ => format!("coordinator-{}", i + 1),
            };
            match spawn(name.clone(), sibling("eagle-coordinator")?, args).await {
                Ok((p, ann)) => {
                    cluster.procs.push(p);
                    cluster.announce_metrics(name, ann.metrics);
                    cluster.coordinators.push((ann.addr, ann.http));
                }
                Err(e) => {
                    cluster.stop().await;
                    return Err(e);
                }
            }
        }
        (cluster.addr, cluster.http) = cluster.coordinators[0].clone();
        Ok(cluster)
    }

    fn announce_metrics(&mut self, name: String, url: Option<String>) {
        if let Some(u) = url {
            self.metrics.push((name, u));
        }
    }

    /// Writes Prometheus file-based service discovery files into `dir`, one per scrape job of
    /// deploy/prometheus/prometheus.yml, each target labelled with its process's name.
    pub fn write_prometheus_targets(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for job in ["coordinator", "draft", "worker"] {
            let targets: Vec<serde_json::Value> = self
                .metrics
                .iter()
                .filter(|(name, _)| name.split('-').next() == Some(job))
                .filter_map(|(name, url)| {
                    Some(serde_json::json!({
                        "targets": [host_port(url)?],
                        "labels": {"service": name},
                    }))
                })
                .collect();
            let path = dir.join(format!("eagle-{job}.json"));
            // Written whole and renamed, so Prometheus never reads half a file.
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_string_pretty(&targets)?)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Restarts children that exit (see `supervisor.rs`); resolves only when the cluster must
    /// stop, with why.
    pub async fn supervise(&mut self, policy: Policy) -> anyhow::Error {
        loop {
            let stop = supervisor::check(&mut self.procs, policy, |name, r| {
                Box::pin(async move { spawn(name, r.bin, r.args).await.map(|(p, _)| p.child) })
            })
            .await;
            if let Some(e) = stop {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every child: SIGTERM, the coordinator first; SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            p.abort_restart();
            if let Some(pid) = p.child.id() {
                // SAFETY: sending a signal to our own child process.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("{} did not stop in 10 s; killing it", p.name);
                    let _ = p.child.kill().await;
                }
            }
        }
        self.procs.clear();
    }
}

/// EAGLE through a local cluster, for `eagle bench --cluster`: timed from the client's side,
/// so the figures include every gRPC hop.
pub struct RemoteBench {
    rt: tokio::runtime::Runtime,
    cluster: Option<Cluster>,
    client: eagle_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    pub hidden: usize,
}

impl RemoteBench {
    pub fn start(model: &ModelArgs, tp: usize) -> Result<Self> {
        let rt = tokio::runtime::Runtime::new()?;
        let up = UpArgs {
            model: model.clone(),
            port: 0,
            workers: 1,
            coordinators: 1,
            tp,
            no_draft: false,
            max_running: 4,
            max_waiting: 4,
            http_port: 0,
            no_http: true,
            api_keys_file: None,
            max_running_per_key: 0,
            max_restarts: 0,
            no_metrics: true,
            tls: false,
            prometheus_sd_dir: None,
            otlp_endpoint: None,
            etcd: Default::default(),
        };
        let (cluster, client, hidden) = rt.block_on(async {
            let c = Cluster::start(&up).await?;
            let client = crate::client::connect(&c.addr, None).await?;
            let path = resolve_or_fetch(&model.model)?;
            let hidden = eagle_engine::loader::open_model(&path)?.config.hidden_size;
            Ok::<_, anyhow::Error>((c, client, hidden))
        })?;
        Ok(RemoteBench {
            rt,
            cluster: Some(cluster),
            client,
            hidden,
        })
    }

    pub fn generate(
        &mut self,
        prompt: &str,
        raw: bool,
        sampling: &crate::generate::SamplingArgs,
    ) -> Result<eagle_engine::GenerateOutput> {
        let args = ClientArgs {
            addr: String::new(),
            api_key: None,
            tls_ca: None,
            prompt: prompt.into(),
            chat: !raw,
            system: None,
            stream: false,
            model: String::new(),
            max_new_tokens: sampling.max_new_tokens as u32,
            temperature: sampling.temperature,
            top_p: sampling.top_p,
            top_k: sampling.top_k as u32,
            seed: sampling.seed,
            stop: Vec::new(),
            no_speculation: false,
            total_token: None,
            json: false,
            session_id: String::new(),
        };
        let mut client = self.client.clone();
        let t0 = std::time::Instant::now();
        let r = self
            .rt
            .block_on(client.generate(args.request()))
            .map_err(|s| anyhow!("cluster: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let wall_s = t0.elapsed().as_secs_f64();
        let stats = r.stats.unwrap_or_default();
        Ok(eagle_engine::GenerateOutput {
            tokens: r.token_ids,
            steps: stats.steps as usize,
            fallback_steps: stats.fallback_steps as usize,
            prefill_s: stats.prefill_ms / 1e3,
            wall_s,
            ..Default::default()
        })
    }
}

impl Drop for RemoteBench {
    fn drop(&mut self) {
        if let Some(mut c) = self.cluster.take() {
            self.rt.block_on(c.stop());
        }
    }
}

/// The worker's `--draft-features` for the head in `dir`, from its config.json.
fn head_features(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the head's {}", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing the head's {}", path.display()))?;
    Ok(eagle_engine::head::draft_features(&config))
}
