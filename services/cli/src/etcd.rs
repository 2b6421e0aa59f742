//! `eagle cluster up --etcd` and `eagle cluster status`: a local etcd for a cluster that
//! should find its members through etcd, and a listing of what etcd knows about a cluster
//! (members with their leases, complete groups, KV placements).
//!
//! The local etcd is the real server (`etcd` on PATH, Debian `etcd-server`) on free loopback
//! ports with its data in a temporary folder removed when the cluster stops.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use eagle_membership::{connect, EtcdConfig, EtcdHealth, MembershipView};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Args, Clone, Debug)]
pub struct StatusArgs {
    /// etcd endpoints (comma-separated).
    #[arg(long, env = "EAGLE_ETCD")]
    pub etcd: String,
    /// The cluster's name in etcd.
    #[arg(long, env = "EAGLE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// TLS to etcd (https:// endpoints): the CA (PEM) that signed etcd's certificate.
    #[arg(long, env = "EAGLE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "EAGLE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "EAGLE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

/// `eagle cluster up`'s etcd flags.
#[derive(Args, Clone, Debug, Default)]
pub struct UpEtcdArgs {
    /// Register every service in etcd at these endpoints (comma-separated), and let the
    /// coordinator find workers and the draft service there; `local` starts an etcd here.
    #[arg(long = "etcd", env = "EAGLE_ETCD")]
    pub etcd: Option<String>,
    /// The cluster's name in etcd.
    #[arg(long = "cluster", env = "EAGLE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// With --etcd: worker groups to start, each registered as its own group (default: the
    /// --workers count).
    #[arg(long)]
    pub groups: Option<usize>,
}

impl UpEtcdArgs {
    /// Worker processes to start.
    pub fn worker_count(&self, workers: usize) -> usize {
        match (&self.etcd, self.groups) {
            (Some(_), Some(g)) => g,
            _ => workers,
        }
    }

    /// The etcd endpoints to use, starting a local etcd when asked.
    /// With `tls`, a local etcd serves clients over mutual TLS with those certificates.
    pub async fn resolve(
        &self,
        tls: Option<&crate::certs::CertFiles>,
    ) -> Result<Option<(String, Option<LocalEtcd>)>> {
        match self.etcd.as_deref() {
            None => Ok(None),
            Some("local") => {
                let l = start_local(tls).await?;
                eprintln!("started a local etcd at {}", l.url);
                Ok(Some((l.url.clone(), Some(l))))
            }
            Some(url) => Ok(Some((url.to_string(), None))),
        }
    }

    /// Flags registering a service in `url` (as worker group `group` when given).
    pub fn member_args(&self, url: &str, group: Option<String>) -> Vec<String> {
        let mut v = vec![
            "--etcd".to_string(),
            url.to_string(),
            "--cluster".to_string(),
            self.cluster.clone(),
        ];
        if let Some(g) = group {
            v.extend(["--group".to_string(), g]);
        }
        v
    }
}

/// A local etcd server; its data folder goes when the [`DataDir`] is dropped.
pub struct LocalEtcd {
    pub url: String,
    pub child: Child,
    pub dir: DataDir,
}

/// A folder removed on drop.
pub struct DataDir(pub PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `etcd` on free loopback ports and waits until it serves clients; with `tls`, over
/// mutual TLS (clients must present a certificate the CA signed).
pub async fn start_local(tls: Option<&crate::certs::CertFiles>) -> Result<LocalEtcd> {
    let (client, peer) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("eagle-etcd-{}-{client}", std::process::id()));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new("etcd");
    if let Some(t) = tls {
        cmd.arg("--cert-file")
            .arg(&t.cert)
            .arg("--key-file")
            .arg(&t.key)
            .arg("--trusted-ca-file")
            .arg(&t.ca)
            .arg("--client-cert-auth");
    }
    let mut child = cmd
        .args(["--name", "eagle", "--data-dir"])
        .arg(&dir)
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("eagle={peer_url}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting etcd (install it: apt-get install etcd-server)")?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("ready to serve client requests") {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(Duration::from_secs(30), ready).await {
        Ok(Ok(true)) => {}
        _ => bail!("etcd did not become ready within 30 s"),
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(LocalEtcd {
        url,
        child,
        dir: DataDir(dir),
    })
}

/// Prints what etcd knows about the cluster.
pub async fn status(a: &StatusArgs) -> Result<()> {
    let mut cfg = EtcdConfig::new(&a.etcd, &a.cluster);
    cfg.tls = a.etcd_ca.clone().map(|ca| eagle_membership::EtcdTls {
        ca,
        cert: a.etcd_cert.clone(),
        key: a.etcd_key.clone(),
    });
    let client = connect(&cfg).await?;
    let health = EtcdHealth::default();
    let view = MembershipView::start(client.clone(), &cfg, health.clone()).await;
    if !health.is_reachable() {
        bail!("etcd at {} does not answer: {}", a.etcd, health.describe());
    }
    // Remaining time of each lease.
    let mut ttls = std::collections::HashMap::new();
    let leases = view
        .members()
        .iter()
        .map(|m| m.lease)
        .chain(view.placements().iter().map(|p| p.1))
        .collect::<std::collections::BTreeSet<_>>();
    for id in leases.into_iter().filter(|&id| id != 0) {
        let mut c = client.clone();
        if let Ok(Ok(r)) = tokio::time::timeout(cfg.timeout, c.lease_time_to_live(id, None)).await {
            ttls.insert(id, r.ttl());
        }
    }
    let members: Vec<_> = view
        .members()
        .into_iter()
        .map(|m| {
            let r = &m.rec;
            json!({
                "kind": r.kind.as_str(), "group": r.group, "rank": r.rank, "tp": r.tp,
                "addr": r.addr, "model": r.model, "device": r.device, "pid": r.pid,
                "healthy": r.healthy, "capacity_bytes": r.capacity_bytes,
                "active_sessions": r.load.active_sessions, "queue_depth": r.load.queue_depth,
                "lease": format!("{:x}", m.lease), "ttl_s": ttls.get(&m.lease),
            })
        })
        .collect();
    let groups: Vec<_> = view
        .groups(None)
        .into_iter()
        .map(|g| {
            json!({
                "group": g.name, "model": g.model, "addr": g.addr, "tp": g.tp,
                "active_sessions": g.load.active_sessions,
            })
        })
        .collect();
    let placements: Vec<_> = view
        .placements()
        .into_iter()
        .map(|(s, lease, p)| {
            json!({
                "session": s, "group": p.group, "addr": p.addr,
                "cached_tokens": p.cached_tokens, "lease": format!("{lease:x}"),
                "ttl_s": ttls.get(&lease),
            })
        })
        .collect();
    if a.json {
        let out = json!({
            "cluster": a.cluster, "etcd": a.etcd, "revision": view.revision(),
            "members": members, "groups": groups, "placements": placements,
        });
        println!("{out}");
        return Ok(());
    }
    println!(
        "cluster {:?} in etcd {} (revision {})",
        a.cluster,
        a.etcd,
        view.revision()
    );
    println!("members:");
    println!(
        "  {:<7} {:<24} {:>4} {:<22} {:>8} {:>9} {:>16} {:>5}",
        "kind", "group", "rank", "address", "pid", "sessions", "lease", "ttl"
    );
    for m in view.members() {
        let r = &m.rec;
        println!(
            "  {:<7} {:<24} {:>4} {:<22} {:>8} {:>9} {:>16x} {:>5}",
            r.kind.as_str(),
            r.group,
            format!("{}/{}", r.rank, r.tp),
            r.addr,
            r.pid,
            r.load.active_sessions,
            m.lease,
            ttls.get(&m.lease).map_or("?".into(), |t| format!("{t}s"))
        );
    }
    println!("complete groups:");
    for g in view.groups(None) {
        println!("  {} ({}, tp {}) at {}", g.name, g.model, g.tp, g.addr);
    }
    println!("KV placements:");
    for (s, lease, p) in view.placements() {
        println!(
            "  {s}: group {} ({} cached tokens), lease {lease:x} ttl {}",
            p.group,
            p.cached_tokens,
            ttls.get(&lease).map_or("?".into(), |t| format!("{t}s"))
        );
    }
    Ok(())
}
