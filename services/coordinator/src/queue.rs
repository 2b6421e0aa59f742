//! Admission control: an actor that owns the counts of running and waiting requests, fed by
//! commands over a channel (the shape of text-generation-inference's queue).
//!
//! Invariants: at most `max_running` requests hold a [`Permit`] at once; at most `max_waiting`
//! wait for one, in arrival order, and a request arriving past that is refused at once with
//! `RESOURCE_EXHAUSTED`. A permit returns its slot when dropped, so a request that ends in any
//! way (done, failed, cancelled) frees it; a waiter whose client has gone is skipped.

use std::collections::VecDeque;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

enum Command {
    Admit {
        span: tracing::Span,
        reply: oneshot::Sender<Result<Permit, Status>>,
    },
    Done,
    Stats(oneshot::Sender<QueueStats>),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub running: usize,
    pub waiting: usize,
}

/// The right to run one request; dropping it frees the slot.
pub struct Permit {
    tx: mpsc::UnboundedSender<Command>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Done);
    }
}

#[derive(Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<Command>,
}

struct Waiter {
    span: tracing::Span,
    reply: oneshot::Sender<Result<Permit, Status>>,
}

impl Queue {
    /// Starts the actor (inside a tokio runtime).
    pub fn start(max_running: usize, max_waiting: usize) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Command>();
        let permit_tx = tx.clone();
        tokio::spawn(async move {
            let mut running = 0usize;
            let mut waiting: VecDeque<Waiter> = VecDeque::new();
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Admit { span, reply } => {
                        if running < max_running {
                            running += 1;
                            span.in_scope(|| tracing::debug!("admitted"));
                            // A send that fails drops the permit, which sends Done.
                            let _ = reply.send(Ok(Permit {
                                tx: permit_tx.clone(),
                            }));
                        } else if waiting.len() < max_waiting {
                            waiting.push_back(Waiter { span, reply });
                        } else {
                            let _ = reply.send(Err(Status::resource_exhausted(format!(
                                "the server is busy: {running} requests running and \
                                 {max_waiting} waiting; retry later"
                            ))));
                        }
                    }
                    Command::Done => {
                        running = running.saturating_sub(1);
                        while let Some(w) = waiting.pop_front() {
                            if w.reply.is_closed() {
                                continue;
                            }
                            running += 1;
                            w.span
                                .in_scope(|| tracing::debug!("admitted from the queue"));
                            // A send that fails drops the permit, which sends Done again.
                            let _ = w.reply.send(Ok(Permit {
                                tx: permit_tx.clone(),
                            }));
                            break;
                        }
                    }
                    Command::Stats(reply) => {
                        let _ = reply.send(QueueStats {
                            running,
                            waiting: waiting.len(),
                        });
                    }
                }
                let m = crate::metrics::metrics();
                m.running.set(running as i64);
                m.waiting.set(waiting.len() as i64);
            }
        });
        Queue { tx }
    }

    /// Waits for a slot, or is refused at once when the queue is full.
    pub async fn admit(&self) -> Result<Permit, Status> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Admit {
                span: tracing::Span::current(),
                reply,
            })
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the server is shutting down"))?
    }

    pub async fn stats(&self) -> QueueStats {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Stats(tx)).is_err() {
            return QueueStats::default();
        }
        rx.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_queues_refuses_and_frees() {
        let q = Queue::start(1, 1);
        let first = q.admit().await.unwrap();
        let q2 = q.clone();
        let second = tokio::spawn(async move { q2.admit().await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            q.stats().await,
            QueueStats {
                running: 1,
                waiting: 1
            }
        );
        let third = q.admit().await.err().expect("the queue is full");
        assert_eq!(third.code(), tonic::Code::ResourceExhausted);
        drop(first);
        second.await.unwrap().unwrap();
        // The second permit was dropped when its task ended.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(q.stats().await, QueueStats::default());
    }
}
