//! Connecting to etcd, deadlines on every call, and the process-wide etcd health flag.
//!
//! Invariant: no call into etcd waits longer than its deadline, so a stopped or partitioned
//! etcd never stalls serving; whoever sees a call fail marks etcd unreachable (with the time it
//! started), and whoever sees one succeed clears the mark.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, ConnectOptions};

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd: {what} did not answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("etcd: {0}")]
    Call(#[from] etcd_client::Error),
    #[error("bad record at {key}: {source}")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("rendezvous of group {group}: {have} of {world} ranks after {timeout:?}")]
    Rendezvous {
        group: String,
        have: usize,
        world: u32,
        timeout: Duration,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, MembershipError>;

/// Where etcd is and how this process uses it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// `http://host:port` or `host:port`; several for an etcd cluster.
    pub endpoints: Vec<String>,
    /// The cluster's name: every key lives under `/eagle/<cluster>/`.
    pub cluster: String,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Lease time-to-live of a member's registration, in seconds.
    pub ttl_s: i64,
    /// TLS to etcd (`https://` endpoints): the CA that signed etcd's certificate, and this
    /// process's certificate and key where etcd requires client certificates.
    pub tls: Option<EtcdTls>,
}

/// PEM files for TLS to etcd.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl EtcdTls {
    fn options(&self) -> Result<etcd_client::TlsOptions> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                MembershipError::Invalid(format!("reading {} for etcd TLS: {e}", p.display()))
            })
        };
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?));
        if let (Some(c), Some(k)) = (&self.cert, &self.key) {
            o = o.identity(etcd_client::Identity::from_pem(read(c)?, read(k)?));
        }
        Ok(o)
    }
}

impl EtcdConfig {
    /// From a comma-separated endpoint list.
    pub fn new(endpoints: &str, cluster: &str) -> Self {
        EtcdConfig {
            endpoints: endpoints
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            cluster: cluster.to_string(),
            timeout: Duration::from_secs(2),
            ttl_s: 5,
            tls: None,
        }
    }

    pub fn keys(&self) -> crate::Keys {
        crate::Keys::new(&self.cluster)
    }
}

/// A client for `cfg`'s endpoints. Connections are made lazily and remade after failures, so
/// this succeeds while etcd is down; calls then fail within their deadlines.
pub async fn connect(cfg: &EtcdConfig) -> Result<Client> {
    if cfg.endpoints.is_empty() {
        return Err(MembershipError::Invalid("no etcd endpoint given".into()));
    }
    // No HTTP/2 keep-alive pings: etcd answers pings on a connection without streams (or more
    // often than every 5 s) by closing it. A stopped etcd is noticed by the deadlines of the
    // lease keep-alives and of the watch's progress requests instead.
    let mut opts = ConnectOptions::new().with_connect_timeout(cfg.timeout);
    if let Some(t) = &cfg.tls {
        opts = opts.with_tls(t.options()?);
    }
    let endpoints = cfg.endpoints.join(",");
    deadline("connect", cfg.timeout, async {
        Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|source| MembershipError::Etcd { endpoints, source })
    })
    .await
}

/// Runs `fut` with a deadline.
pub async fn deadline<T, E>(
    what: &str,
    timeout: Duration,
    fut: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T>
where
    MembershipError: From<E>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(MembershipError::from),
        Err(_) => Err(MembershipError::Timeout {
            what: what.to_string(),
            timeout,
        }),
    }
}

/// Whether etcd answers, as seen by this process's registration and watcher.
#[derive(Clone, Debug, Default)]
pub struct EtcdHealth {
    since: Arc<Mutex<Option<SystemTime>>>,
}

impl EtcdHealth {
    /// A call succeeded.
    pub fn reachable(&self) {
        let mut s = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = s.take() {
            let secs = t.elapsed().map_or(0.0, |d| d.as_secs_f64());
            tracing::warn!("etcd reachable again after {secs:.1} s");
        }
    }

    /// A call failed.
    pub fn unreachable(&self, err: &MembershipError) {
        let mut s = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            tracing::warn!(error = %err, "etcd unreachable; serving on the last known membership");
            *s = Some(SystemTime::now());
        }
    }

    /// Since when etcd has been unreachable; None while it answers.
    pub fn unreachable_since(&self) -> Option<SystemTime> {
        *self.since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_reachable(&self) -> bool {
        self.unreachable_since().is_none()
    }

    /// "ok", or "etcd unreachable since <unix seconds> (N s)".
    pub fn describe(&self) -> String {
        match self.unreachable_since() {
            None => "ok".into(),
            Some(t) => format!(
                "etcd unreachable since unix time {} ({:.0} s)",
                t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                t.elapsed().map_or(0.0, |d| d.as_secs_f64())
            ),
        }
    }
}

/// Backoff between retries: 100 ms doubling to 2 s.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(4)).min(Duration::from_secs(2))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
