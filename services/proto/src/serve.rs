//! What every eagle-serve gRPC server shares: binding a listener (port 0 picks a free port;
//! the bound address is printed as `listening ADDR` on stdout for whoever started the
//! process), health checking and reflection, and shutdown on SIGINT or SIGTERM.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

/// Binds `addr` and announces the bound address on stdout. Accepted connections have Nagle's
/// algorithm off: a step's small messages must not wait for delayed ACKs (40 ms on Linux).
pub async fn bind(
    addr: &str,
) -> std::io::Result<(
    impl Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
    SocketAddr,
)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    println!("listening {local}");
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    });
    Ok((incoming, local))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

/// SIGINT or SIGTERM, seen by every server of a process that serves more than one (gRPC and
/// HTTP): each waits on its own clone.
#[derive(Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    /// Starts listening for the signals; call inside the runtime.
    pub fn on_signal() -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    /// Resolves once a signal came.
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|&stop| stop).await;
    }
}

/// The standard `grpc.health.v1` service, and a reporter to mark services serving.
pub fn health() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Server reflection over every eagle-serve service.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid")
}

/// A gRPC server builder, with TLS when `tls` is given: clients must present a certificate
/// the CA signed, unless `public` (the public API, where client certificates are optional).
pub fn server(
    tls: Option<&crate::tls::Tls>,
    public: bool,
) -> Result<tonic::transport::Server, tonic::transport::Error> {
    let b = tonic::transport::Server::builder();
    match tls {
        Some(t) => b.tls_config(t.server(public)),
        None => Ok(b),
    }
}
