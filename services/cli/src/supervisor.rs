//! The local cluster's supervisor: a service process that dies is started again, with backoff
//! and a restart budget, while the others keep serving.
//!
//! Invariants:
//! - A restarted service listens where it listened before (its first run's `listening` and
//!   `http` addresses are pinned into its arguments), so peers that know it by address (the
//!   coordinator without etcd) reach it again; with etcd it registers again by itself.
//! - Only SIGINT/SIGTERM or an exhausted budget (more than `max_restarts` exits of one service
//!   within `window`) stop the cluster. A process started without a way to restart it (a local
//!   etcd) stops the cluster when it exits, as before.
//! - A restart in progress is a task holding the new child; stopping the cluster aborts it, and
//!   the child (kill-on-drop) dies with it.
//!
//! Source: the restart policies of process supervisors (systemd's `Restart=` with
//! `StartLimitBurst` / `StartLimitIntervalSec`, Erlang/OTP's intensity and period).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::process::Child;
use tokio::task::JoinHandle;

/// How a service is started again.
#[derive(Clone, Debug)]
pub struct Restart {
    pub bin: PathBuf,
    pub args: Vec<String>,
}

impl Restart {
    /// `args` with the value after `flag` set to `value` (added when missing).
    pub fn pin(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_string(),
            _ => self.args.extend([flag.to_string(), value.to_string()]),
        }
    }
}

/// How many restarts one service may use, and over what time.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub max_restarts: u32,
    pub window: Duration,
}

impl Policy {
    /// The wait before restart `n` (1-based): 0.5 s, doubling, at most 10 s.
    pub fn backoff(n: u32) -> Duration {
        Duration::from_millis(500u64 << n.saturating_sub(1).min(5)).min(Duration::from_secs(10))
    }
}

/// One supervised process.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub restart: Option<Restart>,
    /// When it exited, within the policy's window.
    exits: Vec<Instant>,
    /// A restart under way: the new child once it listens.
    pending: Option<JoinHandle<anyhow::Result<Child>>>,
}

impl Proc {
    pub fn new(name: String, child: Child, restart: Option<Restart>) -> Self {
        Proc {
            name,
            child,
            restart,
            exits: Vec::new(),
            pending: None,
        }
    }

    /// Stops a restart under way (its new child is killed as it drops).
    pub fn abort_restart(&mut self) {
        if let Some(p) = self.pending.take() {
            p.abort();
        }
    }
}

/// Starting a service again: resolves to its child once it listens.
pub type Starting = Pin<Box<dyn Future<Output = anyhow::Result<Child>> + Send>>;

/// Checks every process once: schedules restarts for those that exited, takes in those that
/// came back. Returns why the cluster must stop, if it must.
pub async fn check(
    procs: &mut [Proc],
    policy: Policy,
    start: impl Fn(String, Restart) -> Starting,
) -> Option<anyhow::Error> {
    for p in procs.iter_mut() {
        let failed_start = match &mut p.pending {
            Some(h) if h.is_finished() => {
                let r = h.await.map_err(anyhow::Error::from).and_then(|r| r);
                p.pending = None;
                match r {
                    Ok(child) => {
                        eprintln!("{} is back (pid {})", p.name, child.id().unwrap_or(0));
                        p.child = child;
                        continue;
                    }
                    Err(e) => Some(format!("its restart failed: {e:#}")),
                }
            }
            Some(_) => continue,
            None => None,
        };
        let why = match failed_start {
            Some(w) => w,
            None => match p.child.try_wait() {
                Ok(Some(status)) => status.to_string(),
                _ => continue,
            },
        };
        let Some(restart) = p.restart.clone() else {
            return Some(anyhow::anyhow!("{} exited unexpectedly ({why})", p.name));
        };
        let now = Instant::now();
        p.exits.retain(|t| now.duration_since(*t) < policy.window);
        p.exits.push(now);
        let n = p.exits.len() as u32;
        if n > policy.max_restarts {
            return Some(anyhow::anyhow!(
                "{} exited ({why}) {n} times within {:?}: past the restart budget \
                 (--max-restarts {}); stopping the cluster",
                p.name,
                policy.window,
                policy.max_restarts
            ));
        }
        let wait = Policy::backoff(n);
        eprintln!(
            "{} exited ({why}); restarting it in {:.1} s (restart {n} of {} within {:?})",
            p.name,
            wait.as_secs_f64(),
            policy.max_restarts,
            policy.window
        );
        let starting = start(p.name.clone(), restart);
        p.pending = Some(tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            starting.await
        }));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let b: Vec<u64> = (1..=7)
            .map(|n| Policy::backoff(n).as_millis() as u64)
            .collect();
        assert_eq!(b, vec![500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn pin_replaces_or_adds_a_flag() {
        let mut r = Restart {
            bin: "x".into(),
            args: vec!["--listen".into(), "127.0.0.1:0".into()],
        };
        r.pin("--listen", "127.0.0.1:4000");
        r.pin("--http-addr", "127.0.0.1:8000");
        assert_eq!(
            r.args,
            [
                "--listen",
                "127.0.0.1:4000",
                "--http-addr",
                "127.0.0.1:8000"
            ]
        );
    }
}
