//! TLS between eagle-serve's processes (tonic over rustls): each presents a certificate and
//! verifies its peers against one CA (mutual TLS).
//!
//! Invariants:
//! - With TLS on, an internal service (worker, draft service) accepts only clients whose
//!   certificate the CA signed; a client without one, or with one from another CA, fails the
//!   handshake before any request is read.
//! - The public API (the coordinator's gRPC and HTTP ports) presents its certificate; client
//!   certificates are optional there (API keys authenticate clients).
//! - Every outgoing channel of the process (to workers, the draft service) uses `https://`, the
//!   CA, and the process's own certificate, set once at start ([`set_client`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// TLS flags, shared by every binary.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsFlags {
    /// PEM file of the CA that signs every process's certificate: peers are verified against
    /// it. Together with --tls-cert and --tls-key, turns TLS on for every port of the process.
    #[arg(long, env = "EAGLE_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this process's certificate (server and client authentication).
    #[arg(long, env = "EAGLE_TLS_CERT", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of this process's private key.
    #[arg(long, env = "EAGLE_TLS_KEY", requires = "tls_ca")]
    pub tls_key: Option<PathBuf>,
}

/// The PEM files of a process's TLS setup, read.
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

fn read(path: &Path, what: &str) -> std::io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("reading the TLS {what} {}: {e}", path.display()),
        )
    })
}

impl TlsFlags {
    /// The files, read; None when TLS is off.
    pub fn load(&self) -> std::io::Result<Option<Tls>> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Tls {
                ca: read(ca, "CA")?,
                cert: read(cert, "certificate")?,
                key: read(key, "key")?,
            })),
            _ => Ok(None),
        }
    }
}

impl Tls {
    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }

    /// The server side: this process's certificate; clients must present one the CA signed,
    /// unless `clients_optional` (the public API).
    pub fn server(&self, clients_optional: bool) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(clients_optional)
    }

    /// The client side: trust the CA, present this process's certificate.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
    }
}

fn invalid(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("TLS {what}: {e}"))
}

/// rustls configurations from the same files, for the transports that are not gRPC: the HTTPS
/// API and the tensor-parallel group's TCP links.
impl Tls {
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(&self) -> std::io::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca) {
            roots
                .add(ca.map_err(|e| invalid("CA", e))?)
                .map_err(|e| invalid("CA", e))?;
        }
        Ok(roots)
    }

    fn chain(&self) -> std::io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let certs = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| invalid("key", e))?;
        Ok((certs, key))
    }

    /// A rustls server: this process's certificate; clients must present one the CA signed,
    /// unless `clients_optional` (then one they do present must still verify).
    pub fn rustls_server(&self, clients_optional: bool) -> std::io::Result<rustls::ServerConfig> {
        let provider = Self::provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider.clone());
        let verifier = if clients_optional {
            verifier.allow_unauthenticated()
        } else {
            verifier
        };
        let verifier = verifier
            .build()
            .map_err(|e| invalid("client verifier", e))?;
        let (certs, key) = self.chain()?;
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| invalid("certificate", e))
    }

    /// A rustls client: trusts the CA, presents this process's certificate.
    pub fn rustls_client(&self) -> std::io::Result<rustls::ClientConfig> {
        let (certs, key) = self.chain()?;
        rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("versions", e))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(|e| invalid("certificate", e))
    }
}

static CLIENT: OnceLock<Tls> = OnceLock::new();

/// Makes every channel this process opens afterwards ([`endpoint`]) use TLS with `tls`.
pub fn set_client(tls: Tls) {
    let _ = CLIENT.set(tls);
}

/// An endpoint for `addr` (`host:port` or a URL): `https://` with this process's TLS when it
/// is on, `http://` otherwise; short connect timeout, Nagle off.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::Status> {
    endpoint_with(addr, CLIENT.get().map(Tls::client))
}

/// A client of the public API that trusts the CA in `ca_pem` (no client certificate).
pub fn trusting(ca_pem: &[u8]) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem))
}

/// An endpoint for `addr` with `tls` (then `https://`) or without (`http://` unless the URL
/// says otherwise).
pub fn endpoint_with(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Endpoint, tonic::Status> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let url = match &tls {
        Some(_) => format!("https://{bare}"),
        None if addr.contains("://") => addr.to_string(),
        None => format!("http://{bare}"),
    };
    let bad = |e: &dyn std::fmt::Display| {
        tonic::Status::invalid_argument(format!("bad address {addr:?}: {e}"))
    };
    let mut ep = Endpoint::from_shared(url)
        .map_err(|e| bad(&e))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(t) = tls {
        ep = ep.tls_config(t).map_err(|e| bad(&e))?;
    }
    Ok(ep)
}
