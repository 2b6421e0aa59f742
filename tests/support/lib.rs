//! The end-to-end harness: starts the real service binaries (built by `cargo build --release
//! --workspace`, which `scripts/test.sh` runs first) on free loopback ports, and talks to them
//! over gRPC. Every process is killed when its handle drops, so a failing test leaks nothing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use eagle_engine::chat::Message;
use eagle_engine::{Engine, GenerateRequest, LoadOptions, Mode};
use eagle_proto::common::Empty;
use eagle_proto::draft::draft_client::DraftClient;
use eagle_proto::v1::generation_client::GenerationClient;
use eagle_proto::v1::{generate_request::Input, ChatMessage, ChatMessages, Sampling, Speculation};
use eagle_proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;

pub mod etcd;
pub mod http;
pub mod otlp;

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the workspace's binaries are: next to the `deps` folder holding this test.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .expect("deps dir")
        .parent()
        .expect("profile dir");
    dir.to_path_buf()
}

/// The weights every process of these tests runs: f32, the reference engine's dtype, so each
/// cluster answer is compared token for token with [`reference_engine`]. Set once for every
/// child (`EAGLE_DTYPE`, which all binaries read), before the first one starts. The default
/// mode's (`auto`: quantized blocks) losslessness is the engine tests' and the Helm test's.
pub const TEST_DTYPE: &str = "f32";

/// Besides the dtype, every coordinator of these tests speculates at every step
/// (`EAGLE_ALWAYS_SPECULATE`): they check the speculative path itself (trees drafted, accepted,
/// verified, falling back when the draft side fails), which the choice by load would skip with
/// the tests' weak random head. The choice by load is tested where a cluster's env turns it
/// back on (`cluster_batching.rs`).
pub fn bin(name: &str) -> PathBuf {
    static PIN_ENV: std::sync::Once = std::sync::Once::new();
    PIN_ENV.call_once(|| {
        std::env::set_var("EAGLE_DTYPE", TEST_DTYPE);
        std::env::set_var("EAGLE_ALWAYS_SPECULATE", "true");
    });
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

fn eagle_home() -> PathBuf {
    std::env::var_os("EAGLE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/eagle")
        })
}

/// The SmolLM2-135M GGUF (fetched by `eagle fetch smollm2-135m`). Panics with the command to
/// run when it is missing: these tests never pass vacuously.
pub fn smollm2() -> PathBuf {
    if let Some(p) = std::env::var_os("EAGLE_TEST_GGUF") {
        return PathBuf::from(p);
    }
    let p = eagle_home().join("models/smollm2-135m").join(SMOLLM2_FILE);
    assert!(
        p.exists(),
        "{} is missing: run `cargo run --release -p eagle-cli -- fetch smollm2-135m`",
        p.display()
    );
    p
}

/// A randomly initialised head for SmolLM2 (the same one for every test of a run).
pub fn random_head() -> PathBuf {
    static HEAD: OnceLock<PathBuf> = OnceLock::new();
    HEAD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("eagle-test-head-{}", std::process::id()));
        let out = Command::new(bin("eagle"))
            .args(["head", "init", "--seed", "7", "--out"])
            .arg(&dir)
            .arg("--model")
            .arg(smollm2())
            .output()
            .expect("run eagle head init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .clone()
}

/// The processes whose parent is `pid`.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            // pid (comm) state ppid ...
            if let Some(rest) = stat.rsplit_once(") ") {
                let ppid: u32 = rest.1.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
                if ppid == pid {
                    out.push(p);
                }
            }
        }
    }
    out
}

/// Whether `pid` has exited (gone, or a zombie waiting for its parent).
pub fn is_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

/// SIGTERM to an `eagle cluster up`: it must exit successfully within 30 s and leave none of
/// `pids` (its processes, taken before) running. A worker's tensor-parallel ranks are its own
/// children, not `up`'s: they leave when they see their group close, which may end a moment
/// after `up` has reaped the worker (seen once in a full CI run), so each pid gets 5 s to go.
pub fn stop_cluster_up(up: &mut KillOnDrop, pids: &[u32]) {
    let status =
        terminate_child(&mut up.0, Duration::from_secs(30)).expect("cluster up did not stop");
    assert!(status.success(), "{status}");
    let t0 = Instant::now();
    for &pid in pids {
        while !is_gone(pid) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            is_gone(pid),
            "process {pid} is still running 5 s after cluster up exited"
        );
    }
}

/// Runs `cmd` to its end and asserts it succeeded (its stderr in the message); its output.
pub fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `eagle cluster up --port 0 --model SMOLLM2 --head RANDOM_HEAD ARGS`, logs at `warn`, stdout
/// piped (for its `ready` / `http` / `metrics` / `ca` lines) and stderr inherited: what the
/// tests that start a whole local cluster run (change stderr where the log is read).
pub fn cluster_up_command(args: &[&str]) -> Command {
    cluster_up_command_on(0, args)
}

/// [`cluster_up_command`] with the coordinator on `port` (0: a free one, announced on stdout).
pub fn cluster_up_command_on(port: u16, args: &[&str]) -> Command {
    let mut c = Command::new(bin("eagle"));
    c.args(["cluster", "up", "--port", &port.to_string(), "--model"])
        .arg(smollm2())
        .arg("--head")
        .arg(random_head())
        .args(args)
        .env("EAGLE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// A process's command line, its arguments joined by spaces ("" once it is gone).
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A child process killed on drop, so a test that fails leaves nothing running (an
/// `eagle cluster up` takes its children with it).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A service process; killed on drop.
pub struct Service {
    pub name: String,
    pub child: Child,
    pub addr: String,
    /// Every line the service printed on stdout so far.
    pub lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `bin` and waits for its `listening ADDR` line.
    pub fn start(name: &str, bin: &Path, args: &[String], env: &[(String, String)]) -> Service {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("EAGLE_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line.clone());
                if !sent {
                    if let Some(a) = line.strip_prefix("listening ") {
                        let _ = tx.send(a.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("{name} did not start listening (its log is above)");
            }
        };
        Service {
            name: name.to_string(),
            child,
            addr,
            lines,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The rest of the first stdout line that starts with `prefix` (e.g. `"http "`).
    pub fn announced(&self, prefix: &str) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix(prefix).map(|r| r.trim().to_string()))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns whether it exited within `within`.
    pub fn terminate(&mut self, within: Duration) -> bool {
        terminate_child(&mut self.child, within).is_some()
    }
}

/// Sends `child` SIGTERM and waits at most `within` for it to exit; its exit status, if it did.
pub fn terminate_child(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How to start a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOpts {
    pub draft: bool,
    /// Extra worker flags (e.g. `--tp 3`).
    pub worker_args: Vec<String>,
    /// The draft service's head (default: the random test head).
    pub head: Option<PathBuf>,
    pub coordinator_args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            draft: true,
            worker_args: Vec::new(),
            head: None,
            coordinator_args: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A worker, an optional draft service and a coordinator, each its own process.
pub struct TestCluster {
    pub worker: Service,
    pub draft: Option<Service>,
    pub coordinator: Service,
    pub opts: ClusterOpts,
}

pub const MODEL_NAME: &str = "smollm2-135m";

pub fn base_args(listen: &str) -> Vec<String> {
    vec![
        "--model".into(),
        smollm2().display().to_string(),
        "--model-name".into(),
        MODEL_NAME.into(),
        "--listen".into(),
        listen.into(),
    ]
}

impl TestCluster {
    pub fn start(opts: ClusterOpts) -> TestCluster {
        let mut worker_args = base_args("127.0.0.1:0");
        worker_args.extend(opts.worker_args.iter().cloned());
        let worker = Service::start("worker", &bin("eagle-worker"), &worker_args, &opts.env);
        let draft = opts.draft.then(|| {
            let head = opts.head.clone().unwrap_or_else(random_head);
            start_draft_with("127.0.0.1:0", &head, &opts.env)
        });
        let mut args = base_args("127.0.0.1:0");
        args.extend(["--worker".into(), worker.addr.clone()]);
        if let Some(d) = &draft {
            args.extend(["--draft".into(), d.addr.clone()]);
        }
        args.extend(opts.coordinator_args.iter().cloned());
        let coordinator =
            Service::start("coordinator", &bin("eagle-coordinator"), &args, &opts.env);
        TestCluster {
            worker,
            draft,
            coordinator,
            opts,
        }
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::connect(format!("http://{}", self.coordinator.addr))
            .await
            .expect("connect to the coordinator")
    }

    pub async fn worker_client(&self) -> WorkerClient<Channel> {
        WorkerClient::connect(format!("http://{}", self.worker.addr))
            .await
            .expect("connect to the worker")
    }

    pub async fn draft_client(&self) -> DraftClient<Channel> {
        let d = self.draft.as_ref().expect("a draft service");
        DraftClient::connect(format!("http://{}", d.addr))
            .await
            .expect("connect to the draft service")
    }

    /// Live sessions on the worker and the draft service (0 for a draft service that is gone).
    pub async fn sessions(&self) -> (u32, u32) {
        let w = self
            .worker_client()
            .await
            .info(Empty {})
            .await
            .expect("worker info")
            .into_inner()
            .active_sessions;
        let d = match &self.draft {
            Some(_) => match self.draft_client().await.info(Empty {}).await {
                Ok(i) => i.into_inner().active_sessions,
                Err(_) => 0,
            },
            None => 0,
        };
        (w, d)
    }

    /// Waits until no session is live anywhere; panics after `within`.
    pub async fn expect_no_sessions(&self, within: Duration) {
        let t0 = Instant::now();
        loop {
            let s = self.sessions().await;
            if s == (0, 0) {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "sessions still live after {within:?}: worker {}, draft {}",
                s.0,
                s.1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Starts a draft service with the random head on `listen`.
pub fn start_draft(listen: &str, env: &[(String, String)]) -> Service {
    start_draft_with(listen, &random_head(), env)
}

/// Starts a draft service with `head` on `listen`.
pub fn start_draft_with(listen: &str, head: &Path, env: &[(String, String)]) -> Service {
    let mut args = base_args(listen);
    args.extend(["--head".into(), head.display().to_string()]);
    Service::start("draft", &bin("eagle-draft"), &args, env)
}

/// The trained SmolLM2-135M head shipped in the repository.
pub fn shipped_head() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../heads/smollm2-135m")
}

/// A raw-prompt request, greedy unless changed.
pub fn prompt_request(prompt: &str, max_new: u32) -> eagle_proto::v1::GenerateRequest {
    eagle_proto::v1::GenerateRequest {
        model: String::new(),
        input: Some(Input::Prompt(prompt.into())),
        sampling: Some(Sampling {
            max_new_tokens: Some(max_new),
            ..Default::default()
        }),
        speculation: Some(Speculation::default()),
        session_id: String::new(),
    }
}

/// A one-message chat request, greedy unless changed.
pub fn chat_request(user: &str, max_new: u32) -> eagle_proto::v1::GenerateRequest {
    chat_turn(&[("user", user)], "", max_new)
}

/// A chat request of several messages (role, content) in session `session` ("" for none),
/// greedy unless changed.
pub fn chat_turn(
    msgs: &[(&str, &str)],
    session: &str,
    max_new: u32,
) -> eagle_proto::v1::GenerateRequest {
    eagle_proto::v1::GenerateRequest {
        input: Some(Input::Messages(ChatMessages {
            messages: msgs
                .iter()
                .map(|(r, c)| ChatMessage {
                    role: r.to_string(),
                    content: c.to_string(),
                })
                .collect(),
        })),
        session_id: session.into(),
        ..prompt_request("", max_new)
    }
}

/// The in-process engine with no head (vanilla decoding is the reference), loaded once.
pub fn reference_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::load(
            &LoadOptions {
                model: smollm2(),
                head: None,
                dtype: DType::F32,
                quant: eagle_engine::Quant::None,
                device: Device::Cpu,
            },
            &mut |_, _| {},
        )
        .expect("load the reference engine")
    })
}

/// Vanilla greedy tokens for a request built by [`prompt_request`] or [`chat_request`].
pub fn reference_tokens(req: &eagle_proto::v1::GenerateRequest) -> Vec<u32> {
    let e = reference_engine();
    let prompt = match req.input.as_ref().expect("input") {
        Input::Prompt(p) => e.tokenizer.encode(p, e.tokenizer.add_bos()).unwrap(),
        Input::Messages(m) => e
            .chat_prompt(
                &m.messages
                    .iter()
                    .map(|x| Message::new(x.role.clone(), x.content.clone()))
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
    };
    let max_new = req
        .sampling
        .as_ref()
        .and_then(|s| s.max_new_tokens)
        .unwrap_or(128) as usize;
    let mut r = GenerateRequest::new(prompt, max_new);
    r.mode = Mode::Vanilla;
    e.generate(&r).expect("reference generation").tokens
}

/// Twenty-four prompts of different kinds, for equality checks.
pub const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a ten-year-old.",
    "List three prime numbers greater than 50.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "What is 17 times 23?",
    "Write a SQL query that counts rows in a table named users.",
    "Name the planets of the solar system.",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "Describe a cat in the style of a weather report.",
    "How do I reverse a list in Python?",
    "Café, naïve, résumé: why do these words have accents?",
    "数学是什么？",
    "What are the benefits of regular exercise?",
    "Write a limerick about a programmer.",
    "Compare TCP and UDP.",
    "What does DNA stand for?",
    "Tell me a fun fact about octopuses.",
    "import numpy as np\n\n# compute the mean of an array\n",
];

/// A random EAGLE-3 head for SmolLM2 in the published layout (`midlayer.*`, fc [H, 3H], its
/// own 2,048-token LM head), written by `scripts/make-eagle3-head.py`; the same one for every
/// test of a run.
pub fn eagle3_head() -> PathBuf {
    static HEAD: OnceLock<PathBuf> = OnceLock::new();
    HEAD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("eagle-test-eagle3-{}", std::process::id()));
        let c = &reference_engine().target.cfg;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-eagle3-head.py");
        let dims = [
            ("--hidden", c.hidden_size),
            ("--intermediate", c.intermediate_size),
            ("--heads", c.num_heads),
            ("--kv-heads", c.num_kv_heads),
            ("--head-dim", c.head_dim),
            ("--vocab", c.vocab_size),
            ("--draft-vocab", 2048),
        ];
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg("--out").arg(&dir);
        for (flag, v) in dims {
            cmd.args([flag, &v.to_string()]);
        }
        cmd.args(["--rope-theta", &c.rope_theta.to_string(), "--seed", "2"]);
        succeed(&mut cmd);
        dir
    })
    .clone()
}
