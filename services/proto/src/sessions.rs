//! A table of live sessions, shared by the worker (KV caches) and the draft service (head
//! caches).
//!
//! Invariants: the bytes held by all sessions never exceed the configured cap (a session that
//! would pass it is refused with `RESOURCE_EXHAUSTED`); a session idle longer than the idle
//! timeout is reclaimed, so a coordinator that vanished leaks nothing for long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

struct Entry<S> {
    sess: Arc<Mutex<S>>,
    bytes: u64,
    last_used: Instant,
}

pub struct SessionTable<S> {
    inner: Mutex<HashMap<String, Entry<S>>>,
    limit_bytes: u64,
    idle: Duration,
}

impl<S: Send + 'static> SessionTable<S> {
    pub fn new(limit_bytes: u64, idle: Duration) -> Arc<Self> {
        Arc::new(SessionTable {
            inner: Mutex::new(HashMap::new()),
            limit_bytes,
            idle,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<S>>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session holding `bytes`.
    pub fn insert(&self, id: &str, sess: S, bytes: u64) -> Result<Arc<Mutex<S>>, Status> {
        if id.is_empty() || id.len() > 128 {
            return Err(Status::invalid_argument(
                "session_id must be 1 to 128 bytes long",
            ));
        }
        let mut map = self.lock();
        if map.contains_key(id) {
            return Err(Status::already_exists(format!(
                "session {id:?} is already open"
            )));
        }
        let held: u64 = map.values().map(|e| e.bytes).sum();
        if held + bytes > self.limit_bytes {
            return Err(Status::resource_exhausted(format!(
                "session {id:?} needs {} MiB of cache; {} of {} MiB are held by {} sessions",
                bytes >> 20,
                held >> 20,
                self.limit_bytes >> 20,
                map.len()
            )));
        }
        let sess = Arc::new(Mutex::new(sess));
        map.insert(
            id.to_string(),
            Entry {
                sess: sess.clone(),
                bytes,
                last_used: Instant::now(),
            },
        );
        Ok(sess)
    }

    /// The session `id`, marked as used now.
    pub fn get(&self, id: &str) -> Result<Arc<Mutex<S>>, Status> {
        let mut map = self.lock();
        match map.get_mut(id) {
            Some(e) => {
                e.last_used = Instant::now();
                Ok(e.sess.clone())
            }
            None => Err(crate::status::unknown_session(id)),
        }
    }

    /// Runs `f` on session `id` and the shared `model`, off the async threads (model math
    /// blocks them), inside the caller's span.
    pub async fn run<M, T>(
        &self,
        id: &str,
        model: &Arc<M>,
        f: impl FnOnce(&M, &mut S) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status>
    where
        M: Send + Sync + 'static,
        T: Send + 'static,
    {
        let sess = self.get(id)?;
        let model = model.clone();
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let mut s = sess.lock().unwrap_or_else(|p| p.into_inner());
            f(&model, &mut s)
        })
        .await
        .map_err(|e| Status::internal(format!("session task failed: {e}")))?
    }

    /// Changes the bytes held by session `id` (its cache grew), within the cap.
    pub fn resize(&self, id: &str, bytes: u64) -> Result<(), Status> {
        let mut map = self.lock();
        let held: u64 = map
            .iter()
            .filter(|(k, _)| k.as_str() != id)
            .map(|(_, e)| e.bytes)
            .sum();
        let Some(e) = map.get_mut(id) else {
            return Err(crate::status::unknown_session(id));
        };
        if held + bytes > self.limit_bytes {
            return Err(Status::resource_exhausted(format!(
                "session {id:?} needs {} MiB of cache; {} of {} MiB are held by other sessions",
                bytes >> 20,
                held >> 20,
                self.limit_bytes >> 20
            )));
        }
        e.bytes = bytes;
        Ok(())
    }

    /// Whether session `id` is live.
    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Removes a session; false if it was not there.
    pub fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    /// Removes sessions idle past the timeout; returns how many.
    pub fn reap(&self) -> usize {
        let mut map = self.lock();
        let before = map.len();
        let idle = self.idle;
        map.retain(|id, e| {
            let keep = e.last_used.elapsed() < idle;
            if !keep {
                tracing::warn!(session = %id, "reclaiming a session idle for {idle:?}");
            }
            keep
        });
        before - map.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.lock().values().map(|e| e.bytes).sum()
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Reaps idle sessions in the background, checking every quarter of the timeout.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let table = Arc::downgrade(self);
        let every = (self.idle / 4).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match table.upgrade() {
                    Some(t) => {
                        t.reap();
                    }
                    None => break,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_duplicates_and_idle_reclaim() {
        let t = SessionTable::<u32>::new(100, Duration::from_millis(50));
        t.insert("a", 1, 60).unwrap();
        assert_eq!(
            t.insert("a", 2, 1).unwrap_err().code(),
            tonic::Code::AlreadyExists
        );
        let e = t.insert("b", 2, 50).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        t.insert("b", 2, 40).unwrap();
        assert_eq!((t.len(), t.bytes()), (2, 100));
        std::thread::sleep(Duration::from_millis(60));
        t.get("b").unwrap();
        assert_eq!(t.reap(), 1);
        assert_eq!(t.get("a").unwrap_err().code(), tonic::Code::NotFound);
        assert_eq!(
            t.resize("b", 101).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        t.resize("b", 100).unwrap();
        assert_eq!(t.bytes(), 100);
        assert!(t.contains("b"));
        assert!(t.remove("b"));
        assert!(t.is_empty());
    }
}
