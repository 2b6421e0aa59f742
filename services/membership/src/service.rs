//! Joining a cluster from a service's command line: the `--etcd`, `--cluster`, `--group` and
//! `--etcd-ttl-s` flags every service shares, registration with a live load probe, and the
//! etcd state as a `grpc.health.v1` entry.
//!
//! Invariant: without `--etcd` (or `EAGLE_ETCD`) nothing here runs and a service behaves
//! exactly as on a single machine with static addresses.

use std::time::Duration;

use etcd_client::Client;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::client::{connect, EtcdConfig, EtcdHealth, Result};
use crate::record::{Kind, Load, MemberRecord};
use crate::register::{LoadProbe, PrefixProbe, Registration};

/// The health-check service name that reports etcd: SERVING while etcd answers, NOT_SERVING
/// while it does not (the service itself keeps serving on its last known view).
pub const ETCD_HEALTH_SERVICE: &str = "eagle.etcd";

#[derive(clap::Args, Clone, Debug, Default)]
pub struct EtcdFlags {
    /// etcd endpoints (comma-separated, e.g. http://127.0.0.1:2379): register in and read
    /// membership from etcd. Without it, addresses are static (the single-machine default).
    #[arg(long = "etcd", env = "EAGLE_ETCD")]
    pub etcd: Option<String>,
    /// The cluster's name in etcd: every key lives under /eagle/<cluster>/.
    #[arg(long, env = "EAGLE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// This member's group (ranks of one tensor-parallel worker share it; default: derived
    /// from the listening address).
    #[arg(long, env = "EAGLE_GROUP")]
    pub group: Option<String>,
    /// Lease time-to-live in seconds: a member that dies vanishes this long after.
    #[arg(long, env = "EAGLE_ETCD_TTL_S", default_value_t = 5)]
    pub etcd_ttl_s: i64,
    /// The address others reach this service at (default: the bound address).
    #[arg(long, env = "EAGLE_ADVERTISE")]
    pub advertise: Option<String>,
    /// TLS to etcd (give https:// endpoints): the CA (PEM) that signed etcd's certificate.
    #[arg(long, env = "EAGLE_ETCD_CA")]
    pub etcd_ca: Option<std::path::PathBuf>,
    /// This process's certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "EAGLE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "EAGLE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<std::path::PathBuf>,
}

impl EtcdFlags {
    /// The etcd settings, or None without `--etcd`.
    pub fn config(&self) -> Option<EtcdConfig> {
        self.etcd.as_deref().map(|e| {
            let mut c = EtcdConfig::new(e, &self.cluster);
            c.ttl_s = self.etcd_ttl_s.max(1);
            c.tls = self.etcd_ca.clone().map(|ca| crate::client::EtcdTls {
                ca,
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
            });
            c
        })
    }

    /// The group name, or one derived from `addr`.
    pub fn group_or(&self, addr: &str) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("g-{}", addr.replace([':', '.', '[', ']'], "-")))
    }
}

/// A service's membership: its registration and the shared etcd health.
pub struct Joined {
    pub client: Client,
    pub config: EtcdConfig,
    pub health: EtcdHealth,
    pub registration: Registration,
}

impl Joined {
    /// Leaves the cluster at once (revokes the lease).
    pub async fn leave(self) {
        self.registration.shutdown().await;
    }
}

/// Registers `rec` in etcd and keeps it there with live load figures; reports etcd's state on
/// `reporter` when given.
pub async fn join(
    cfg: EtcdConfig,
    rec: MemberRecord,
    load: LoadProbe,
    prefixes: Option<PrefixProbe>,
    reporter: Option<HealthReporter>,
) -> Result<Joined> {
    let client = connect(&cfg).await?;
    let health = EtcdHealth::default();
    let registration =
        Registration::start(client.clone(), &cfg, rec, load, prefixes, health.clone()).await;
    if let Some(r) = reporter {
        report_health(r, health.clone());
    }
    Ok(Joined {
        client,
        config: cfg,
        health,
        registration,
    })
}

/// Mirrors `health` on the [`ETCD_HEALTH_SERVICE`] entry of a `grpc.health.v1` service.
pub fn report_health(reporter: HealthReporter, health: EtcdHealth) {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ok = health.is_reachable();
            if last != Some(ok) {
                let status = if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                reporter
                    .set_service_status(ETCD_HEALTH_SERVICE, status)
                    .await;
                last = Some(ok);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// What a service says about itself when it registers.
pub struct ServiceInfo<'a> {
    pub kind: Kind,
    pub model: &'a str,
    pub device: &'a str,
    pub capacity_bytes: u64,
    pub rank: u32,
    pub tp: u32,
    /// A worker's prefix cache summary, published with its record.
    pub prefixes: Option<PrefixProbe>,
}

/// Registers a service bound at `bound` when `flags` name an etcd; None otherwise. `sessions`
/// reads its live sessions (its load).
pub async fn join_service(
    flags: &EtcdFlags,
    info: ServiceInfo<'_>,
    bound: std::net::SocketAddr,
    sessions: impl Fn() -> u32 + Send + Sync + 'static,
    reporter: &HealthReporter,
) -> Result<Option<Joined>> {
    let Some(cfg) = flags.config() else {
        return Ok(None);
    };
    let addr = flags.advertise.clone().unwrap_or_else(|| bound.to_string());
    let rec = MemberRecord {
        kind: info.kind,
        group: flags.group_or(&addr),
        rank: info.rank,
        tp: info.tp.max(1),
        addr,
        model: info.model.to_string(),
        device: info.device.to_string(),
        capacity_bytes: info.capacity_bytes,
        healthy: true,
        pid: std::process::id(),
        load: Load::default(),
        started_at: 0,
        prefixes: String::new(),
    };
    let load: LoadProbe = std::sync::Arc::new(move || Load {
        active_sessions: sessions(),
        queue_depth: 0,
    });
    join(cfg, rec, load, info.prefixes, Some(reporter.clone()))
        .await
        .map(Some)
}
