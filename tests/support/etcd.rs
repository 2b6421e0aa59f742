//! A real etcd server for tests: `/usr/bin/etcd` (or `etcd` on PATH) on free loopback ports
//! with its own temporary data folder; killed and its folder removed when dropped. It can be
//! killed and restarted on the same ports and data, or paused (SIGSTOP) and resumed, as etcd
//! outages look.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Etcd {
    pub url: String,
    peer_url: String,
    dir: PathBuf,
    child: Option<Child>,
    /// A command the server runs under (e.g. `ip netns exec NS`), if any.
    launcher: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn etcd_bin() -> PathBuf {
    let p = PathBuf::from("/usr/bin/etcd");
    if p.exists() {
        p
    } else {
        PathBuf::from("etcd")
    }
}

impl Etcd {
    /// Starts etcd and waits until it serves clients.
    pub fn start() -> Etcd {
        let (c, p) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("eagle-test-etcd-{}-{c}", std::process::id()));
        let mut e = Etcd {
            url: format!("http://127.0.0.1:{c}"),
            peer_url: format!("http://127.0.0.1:{p}"),
            dir,
            child: None,
            launcher: Vec::new(),
        };
        e.spawn();
        e
    }

    /// Starts etcd on `ip` (ports 2379 and 2380) under `launcher` (e.g. `ip netns exec NS`,
    /// to run it as a host of its own in a network namespace).
    pub fn start_at(ip: &str, launcher: &[String]) -> Etcd {
        let dir = std::env::temp_dir().join(format!("eagle-test-etcd-{}-{ip}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut e = Etcd {
            url: format!("http://{ip}:2379"),
            peer_url: format!("http://{ip}:2380"),
            dir,
            child: None,
            launcher: launcher.to_vec(),
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let mut cmd = match self.launcher.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(etcd_bin());
                c
            }
            None => Command::new(etcd_bin()),
        };
        let mut child = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.url])
            .args(["--advertise-client-urls", &self.url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("t={}", self.peer_url)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start etcd (Debian package etcd-server)");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && line.contains("ready to serve client requests") {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("etcd did not become ready within 30 s");
        }
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process hangs with its connections open, as a stalled server would.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
