//! A tensor-parallel group over TCP, star-shaped: every rank holds one connection to rank 0.
//!
//! - All-reduce: the other ranks send their vectors to rank 0, which adds them to its own in
//!   rank order (0, 1, 2, ...) and sends the sum back. One order of addition for every rank
//!   means every rank gets the same bits.
//! - All-gather: rank 0 collects the blocks in rank order and sends the whole to every rank.
//! - Commands: rank 0 sends the same bytes to every rank; the others receive them in order.
//!
//! Every frame is `[tag: u8][len: u64 LE][payload]`; a frame with the wrong tag or length is a
//! protocol error. With TLS (`lead_with` / `join_with`), every connection is mutual TLS
//! (rustls; `link.rs`) before the first byte of the group's protocol: rank 0 accepts only ranks
//! whose certificate its CA signed, and a rank only a rank 0 whose certificate it did. A peer that closes its socket, or is silent past the timeout during a
//! collective, breaks the group: every later call fails at once with an error naming the rank,
//! so callers turn it into `UNAVAILABLE` instead of hanging.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::link::Link;

use eagle_engine::parallel::collective::group_error;
use eagle_engine::parallel::Collective;
use eagle_engine::{EngineError, Result};

const HELLO: &[u8; 8] = b"EAGLETP1";
const TAG_COMMAND: u8 = b'C';
const TAG_REDUCE: u8 = b'R';
const TAG_GATHER: u8 = b'G';

enum Links {
    /// Rank 0: the stream to rank `i + 1` at index `i`.
    Leader(Vec<Link>),
    Follower(Link),
}

pub struct TcpGroup {
    rank: usize,
    world: usize,
    links: Mutex<Links>,
    /// Clones of the sockets, to shut them down from another thread while a call blocks.
    handles: Vec<TcpStream>,
    /// Why the group is broken, once it is.
    broken: Mutex<Option<String>>,
    timeout: Duration,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TcpGroup(rank {} of {})", self.rank, self.world)
    }
}

fn io_err(what: impl std::fmt::Display, e: std::io::Error) -> EngineError {
    group_error(format!("{what}: {e}"))
}

impl TcpGroup {
    /// Rank 0: accepts the other `world - 1` ranks on `listener` (each says its rank), waiting
    /// at most `wait`. `timeout` bounds every later collective.
    pub fn lead(
        listener: &TcpListener,
        world: usize,
        wait: Duration,
        timeout: Duration,
    ) -> Result<TcpGroup> {
        Self::lead_with(listener, world, wait, timeout, None)
    }

    /// [`TcpGroup::lead`], over TLS with `tls` (which must require client certificates).
    pub fn lead_with(
        listener: &TcpListener,
        world: usize,
        wait: Duration,
        timeout: Duration,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<TcpGroup> {
        let deadline = Instant::now() + wait;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("group listener", e))?;
        let mut slots: Vec<Option<Link>> = (1..world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((s, peer)) => match hello(s, world, timeout, tls.clone()) {
                    // A stray or stale connection is dropped; formation goes on.
                    Err(why) => tracing::warn!("ignoring a connection from {peer}: {why}"),
                    Ok((rank, _)) if slots[rank - 1].is_some() => {
                        tracing::warn!("ignoring a second rank {rank} from {peer}")
                    }
                    Ok((rank, s)) => slots[rank - 1] = Some(s),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| s.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        return Err(group_error(format!(
                            "ranks {} did not join within {wait:?}",
                            missing.join(", ")
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(io_err("accepting ranks", e)),
            }
        }
        let streams: Vec<Link> = slots.into_iter().map(Option::unwrap).collect();
        let handles = streams
            .iter()
            .map(|s| s.tcp().try_clone().map_err(|e| io_err("group socket", e)))
            .collect::<Result<_>>()?;
        Ok(TcpGroup {
            rank: 0,
            world,
            links: Mutex::new(Links::Leader(streams)),
            handles,
            broken: Mutex::new(None),
            timeout,
        })
    }

    /// Waits until every rank has reached this point, for at most `wait` (longer than the
    /// collectives' timeout: ranks may take very different times to load their shards).
    pub fn barrier(&self, wait: Duration) -> Result<()> {
        let set = |t: Duration| {
            for h in &self.handles {
                let _ = h.set_read_timeout(Some(t));
            }
        };
        set(wait);
        let r = self.all_reduce_sum(&mut [0.0]);
        set(self.timeout);
        r
    }

    /// Rank `rank` of `world`: connects to rank 0 at `addr`, retrying for at most `wait`.
    pub fn join(
        addr: impl ToSocketAddrs + std::fmt::Display,
        rank: usize,
        world: usize,
        wait: Duration,
        timeout: Duration,
    ) -> Result<TcpGroup> {
        Self::join_with(addr, rank, world, wait, timeout, None)
    }

    /// [`TcpGroup::join`], over TLS with `tls` (which must present a client certificate);
    /// rank 0's certificate must name the host of `addr`.
    pub fn join_with(
        addr: impl ToSocketAddrs + std::fmt::Display,
        rank: usize,
        world: usize,
        wait: Duration,
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<TcpGroup> {
        let deadline = Instant::now() + wait;
        let s = loop {
            match TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("rank 0 at {addr} not there yet: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(io_err(format!("joining rank 0 at {addr}"), e)),
            }
        };
        s.set_nodelay(true).map_err(|e| io_err("group socket", e))?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| io_err("group socket", e))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| io_err("group socket", e))?;
        let handle = s.try_clone().map_err(|e| io_err("group socket", e))?;
        let mut s = match tls {
            Some(cfg) => Link::client(s, cfg, &addr.to_string())
                .map_err(|e| io_err(format!("TLS with rank 0 at {addr}"), e))?,
            None => Link::Plain(s),
        };
        let mut hello = Vec::with_capacity(16);
        hello.extend_from_slice(HELLO);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        s.write_all(&hello)
            .and_then(|()| s.flush())
            .map_err(|e| io_err("hello", e))?;
        Ok(TcpGroup {
            rank,
            world,
            links: Mutex::new(Links::Follower(s)),
            handles: vec![handle],
            broken: Mutex::new(None),
            timeout,
        })
    }

    /// This end's address of the connection to rank 0 (ranks other than 0), or of the first
    /// rank's connection (rank 0).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self.handles.first() {
            Some(h) => h.local_addr(),
            None => Err(std::io::Error::new(
                ErrorKind::NotConnected,
                "a group of one",
            )),
        }
    }

    /// Breaks the group: every blocked and later call fails with `why`.
    pub fn shutdown(&self, why: &str) {
        let mut b = self.broken.lock().unwrap();
        if b.is_none() {
            *b = Some(why.to_string());
        }
        for h in &self.handles {
            let _ = h.shutdown(Shutdown::Both);
        }
    }

    /// Why the group is broken, if it is.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap().clone()
    }

    fn links(&self) -> Result<MutexGuard<'_, Links>> {
        if let Some(why) = self.broken() {
            return Err(group_error(why));
        }
        Ok(self.links.lock().unwrap())
    }

    /// Records a failure as the group's breakage (the first one wins) and returns it.
    fn fail(&self, e: EngineError) -> EngineError {
        let msg = e.to_string();
        self.shutdown(&msg);
        group_error(self.broken().unwrap_or(msg))
    }

    /// Rank 0: sends `bytes` to every other rank.
    pub fn broadcast(&self, bytes: &[u8]) -> Result<()> {
        let mut links = self.links()?;
        let Links::Leader(peers) = &mut *links else {
            return Err(group_error("only rank 0 sends commands"));
        };
        for (i, p) in peers.iter_mut().enumerate() {
            write_frame(p, TAG_COMMAND, bytes)
                .map_err(|e| self.fail(io_err(format!("sending to rank {}", i + 1), e)))?;
        }
        Ok(())
    }

    /// Other ranks: the next command, waiting as long as it takes; `None` once rank 0 has
    /// closed the group.
    pub fn receive(&self) -> Result<Option<Vec<u8>>> {
        self.receive_within(None)
    }

    /// [`TcpGroup::receive`], failing (and breaking the group) when rank 0 says nothing for
    /// `within` (rank 0 heartbeats an idle group, so silence means it or its host is gone).
    pub fn receive_within(&self, within: Option<Duration>) -> Result<Option<Vec<u8>>> {
        let mut links = self.links()?;
        let Links::Follower(s) = &mut *links else {
            return Err(group_error("rank 0 does not receive commands"));
        };
        s.tcp()
            .set_read_timeout(within)
            .map_err(|e| io_err("group socket", e))?;
        let frame = read_frame(s, TAG_COMMAND, None);
        s.tcp()
            .set_read_timeout(Some(self.timeout))
            .map_err(|e| io_err("group socket", e))?;
        match frame {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(self.fail(io_err("receiving from rank 0", e))),
        }
    }

    /// The star exchange behind both collectives: rank 0 gets every rank's payload (its own
    /// first) and answers each rank with `combine`'s result.
    fn exchange(
        &self,
        tag: u8,
        mine: &[f32],
        expect: usize,
        combine: impl FnOnce(Vec<Vec<f32>>) -> Vec<f32>,
        answer_len: usize,
    ) -> Result<Vec<f32>> {
        let mut links = self.links()?;
        match &mut *links {
            Links::Leader(peers) => {
                let mut parts = Vec::with_capacity(self.world);
                parts.push(mine.to_vec());
                for (i, p) in peers.iter_mut().enumerate() {
                    let b = read_frame(p, tag, Some(expect * 4)).map_err(|e| {
                        self.fail(io_err(format!("rank {} in a collective", i + 1), e))
                    })?;
                    parts.push(from_bytes(&b));
                }
                let out = combine(parts);
                let bytes = to_bytes(&out);
                for (i, p) in peers.iter_mut().enumerate() {
                    write_frame(p, tag, &bytes).map_err(|e| {
                        self.fail(io_err(format!("rank {} in a collective", i + 1), e))
                    })?;
                }
                Ok(out)
            }
            Links::Follower(s) => {
                write_frame(s, tag, &to_bytes(mine))
                    .map_err(|e| self.fail(io_err("rank 0 in a collective", e)))?;
                let b = read_frame(s, tag, Some(answer_len * 4))
                    .map_err(|e| self.fail(io_err("rank 0 in a collective", e)))?;
                Ok(from_bytes(&b))
            }
        }
    }
}

/// Reads a rank's hello on a fresh connection (after the TLS handshake, with `tls`): its
/// rank, and the stream set up for the group.
fn hello(
    s: TcpStream,
    world: usize,
    timeout: Duration,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<(usize, Link)> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut s = match tls {
        Some(cfg) => Link::server(s, cfg)?,
        None => Link::Plain(s),
    };
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello)?;
    let rank = u32::from_le_bytes(hello[8..12].try_into().unwrap()) as usize;
    let their_world = u32::from_le_bytes(hello[12..16].try_into().unwrap()) as usize;
    if &hello[..8] != HELLO || their_world != world || rank == 0 || rank >= world {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "not rank 1..{world} of a group of {world} (says rank {rank} of {their_world})"
            ),
        ));
    }
    let tcp = s.tcp();
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(timeout))?;
    // A peer that stops reading (stopped, or its host gone) must not block a send for ever.
    tcp.set_write_timeout(Some(timeout))?;
    Ok((rank, s))
}

impl Drop for TcpGroup {
    fn drop(&mut self) {
        for h in &self.handles {
            let _ = h.shutdown(Shutdown::Both);
        }
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, x: &mut [f32]) -> Result<()> {
        let n = x.len();
        let sum = self.exchange(
            TAG_REDUCE,
            x,
            n,
            |parts| {
                let mut acc = parts[0].clone();
                for p in &parts[1..] {
                    for (a, b) in acc.iter_mut().zip(p) {
                        *a += b;
                    }
                }
                acc
            },
            n,
        )?;
        x.copy_from_slice(&sum);
        Ok(())
    }

    fn all_gather(&self, x: &[f32]) -> Result<Vec<f32>> {
        let n = x.len();
        self.exchange(TAG_GATHER, x, n, |parts| parts.concat(), n * self.world)
    }
}

fn write_frame(s: &mut Link, tag: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(payload)?;
    s.flush()
}

fn read_frame(s: &mut Link, tag: u8, len: Option<usize>) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let n = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
    if head[0] != tag || len.is_some_and(|l| l != n) || n > 1 << 32 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "protocol error: frame {:?} of {n} bytes, expected {:?} of {len:?}",
                head[0] as char, tag as char
            ),
        ));
    }
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn to_bytes(x: &[f32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(x.len() * 4);
    for v in x {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(world: usize) -> Vec<Arc<TcpGroup>> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(5);
        let joins: Vec<_> = (1..world)
            .map(|r| std::thread::spawn(move || TcpGroup::join(addr, r, world, t, t).unwrap()))
            .collect();
        let mut g = vec![Arc::new(TcpGroup::lead(&l, world, t, t).unwrap())];
        g.extend(joins.into_iter().map(|j| Arc::new(j.join().unwrap())));
        g
    }

    /// A fresh CA and a certificate it signs for 127.0.0.1.
    fn certs(name: &str) -> eagle_proto::tls::Tls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {name}"));
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        eagle_proto::tls::Tls {
            ca: ca.pem().into_bytes(),
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        }
    }

    #[test]
    fn collectives_run_over_mutual_tls_and_strangers_are_refused() {
        let (a, b) = (certs("a"), certs("b"));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(5);
        let client = |c: &eagle_proto::tls::Tls| Some(Arc::new(c.rustls_client().unwrap()));
        // A rank certified by another CA comes first: refused, and formation goes on.
        let stranger = {
            let c = client(&b);
            std::thread::spawn(move || TcpGroup::join_with(addr, 1, 2, t, t, c))
        };
        std::thread::sleep(Duration::from_millis(200));
        let rank1 = {
            let c = client(&a);
            std::thread::spawn(move || TcpGroup::join_with(addr, 1, 2, t, t, c).unwrap())
        };
        let server = Some(Arc::new(a.rustls_server(false).unwrap()));
        let g0 = Arc::new(TcpGroup::lead_with(&l, 2, t, t, server).unwrap());
        let g1 = Arc::new(rank1.join().unwrap());
        assert!(stranger.join().unwrap().is_err(), "a stranger joined");
        let h = {
            let g1 = g1.clone();
            std::thread::spawn(move || {
                let mut x = vec![1.0f32, 2.0];
                g1.all_reduce_sum(&mut x).unwrap();
                x
            })
        };
        let mut x = vec![10.0f32, 20.0];
        g0.all_reduce_sum(&mut x).unwrap();
        assert_eq!(x, vec![11.0, 22.0]);
        assert_eq!(h.join().unwrap(), vec![11.0, 22.0]);
        g0.broadcast(b"step").unwrap();
        assert_eq!(g1.receive().unwrap().as_deref(), Some(&b"step"[..]));
    }

    #[test]
    fn collectives_agree_on_every_rank() {
        let g = group(3);
        let handles: Vec<_> = g
            .iter()
            .map(|r| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let k = r.rank() as f32;
                    let mut x = vec![k, 0.1 * k, 1e-8 * k];
                    r.all_reduce_sum(&mut x).unwrap();
                    let all = r.all_gather(&[k, k]).unwrap();
                    (x, all)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (x, all) in &out {
            assert_eq!(x, &out[0].0, "same bits everywhere");
            assert_eq!(x[0], 3.0);
            assert_eq!(all, &vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        }
    }

    #[test]
    fn commands_reach_every_rank_in_order_and_close_cleanly() {
        let mut g = group(3);
        g[0].broadcast(b"one").unwrap();
        g[0].broadcast(b"two").unwrap();
        for r in &g[1..] {
            assert_eq!(r.receive().unwrap().unwrap(), b"one");
            assert_eq!(r.receive().unwrap().unwrap(), b"two");
        }
        let leader = g.remove(0);
        drop(leader);
        assert_eq!(g[0].receive().unwrap(), None);
    }

    #[test]
    fn a_dead_rank_fails_the_collective_at_once_and_for_good() {
        let mut g = group(3);
        let gone = g.pop().unwrap(); // rank 2
        drop(gone);
        let t = Instant::now();
        let mut x = vec![1.0];
        let r1 = g[1].clone();
        let side = std::thread::spawn(move || r1.all_reduce_sum(&mut [1.0]));
        let e = g[0].all_reduce_sum(&mut x).unwrap_err().to_string();
        assert!(e.contains("rank 2"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        // Rank 1 is told too (rank 0 shut its sockets), and later calls fail at once.
        assert!(side.join().unwrap().is_err());
        assert!(g[0].all_gather(&[1.0]).is_err());
        assert!(g[0].broken().is_some());
    }

    #[test]
    fn a_silent_rank_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = Duration::from_secs(5);
        let j = std::thread::spawn(move || TcpGroup::join(addr, 1, 2, t, t).unwrap());
        let g = TcpGroup::lead(&l, 2, t, Duration::from_millis(300)).unwrap();
        let _follower = j.join().unwrap(); // alive but never calls the collective
        let start = Instant::now();
        assert!(g.all_reduce_sum(&mut [1.0]).is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
