//! One connection between two ranks: plain TCP, or TLS over it (rustls, both ends presenting
//! certificates). The group's framing reads and writes a [`Link`] the same either way; socket
//! options (timeouts, shutdown) go to the TCP stream underneath.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};

pub(crate) enum Link {
    Plain(TcpStream),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
}

fn tls_err(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl Link {
    /// The accepting end (rank 0): completes the handshake, which fails for a peer without a
    /// certificate `cfg`'s verifier accepts.
    pub(crate) fn server(
        mut tcp: TcpStream,
        cfg: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Link> {
        let mut conn = ServerConnection::new(cfg).map_err(tls_err)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(Link::Server(Box::new(StreamOwned::new(conn, tcp))))
    }

    /// The connecting end (ranks above 0) to rank 0 at `addr` (`host:port`): completes the
    /// handshake, which fails unless rank 0's certificate names `host` and `cfg` trusts it.
    pub(crate) fn client(
        mut tcp: TcpStream,
        cfg: Arc<rustls::ClientConfig>,
        addr: &str,
    ) -> std::io::Result<Link> {
        let host = addr
            .rsplit_once(':')
            .map_or(addr, |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}"))
        })?;
        let mut conn = ClientConnection::new(cfg, name).map_err(tls_err)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(Link::Client(Box::new(StreamOwned::new(conn, tcp))))
    }

    /// The TCP stream underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Server(s) => &s.sock,
            Link::Client(s) => &s.sock,
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Server(s) => s.read(buf),
            Link::Client(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Server(s) => s.write(buf),
            Link::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Server(s) => s.flush(),
            Link::Client(s) => s.flush(),
        }
    }
}
