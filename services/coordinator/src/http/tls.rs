//! The HTTP API over TLS (rustls): the coordinator's certificate; client certificates are
//! optional (API keys authenticate clients), and one the CA did not sign is refused.
//!
//! Invariant: handshakes run concurrently, each within a deadline, so a client that opens a
//! connection and never completes its handshake holds up no one else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eagle_proto::tls::Tls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Accepted connections, their TLS handshake done.
pub struct TlsListener {
    done: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` in the background and shakes hands with each client.
    pub fn new(tcp: TcpListener, tls: &Tls) -> std::io::Result<Self> {
        let mut cfg = tls.rustls_server(true)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let local = tcp.local_addr()?;
        let (tx, done) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (conn, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = conn.set_nodelay(true);
                if tx.is_closed() {
                    break;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(conn)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { done, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.done.recv().await {
            Some(c) => c,
            // The accepting task never ends while this listener lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
