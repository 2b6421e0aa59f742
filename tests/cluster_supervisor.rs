//! `eagle cluster up` keeps serving when a child dies: the supervisor starts it again at the
//! same address (with backoff, within a restart budget). With etcd and two worker groups the
//! other group serves meanwhile and the restarted worker registers again; a tensor-parallel
//! rank that dies breaks its group, whose rank 0 then exits (`--tp-exit-on-break`) and is
//! started again whole. Without etcd the coordinator finds the restarted worker where it was,
//! and a restarted draft service brings speculation back. No request ever gets a wrong token;
//! SIGTERM still stops everything, and so does an exhausted restart budget.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eagle_proto::v1::generation_client::GenerationClient;
use eagle_tests::*;
use tonic::Code;

/// `eagle cluster up ARGS` with its stderr kept (and echoed); returns it and the gRPC address.
fn cluster_up(args: &[&str]) -> (KillOnDrop, String, Arc<Mutex<Vec<String>>>) {
    let mut up = KillOnDrop(
        cluster_up_command(&[&["--no-http"], args].concat())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let (stderr, seen) = (up.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            seen.lock().unwrap().push(line);
        }
    });
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a line").unwrap();
    let addr = ready
        .strip_prefix("ready ")
        .expect("ready ADDR")
        .to_string();
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    (up, addr, log)
}

/// The child of `parent` whose command line contains every one of `needles`.
fn child_with(parent: u32, needles: &[&str]) -> u32 {
    *child_pids(parent)
        .iter()
        .find(|&&p| {
            let c = cmdline(p);
            needles.iter().all(|n| c.contains(n))
        })
        .unwrap_or_else(|| panic!("no child of {parent} runs {needles:?}"))
}

fn kill9(pid: u32) {
    // SAFETY: a signal to a process this test's cluster started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

fn wait_log(log: &Mutex<Vec<String>>, needle: &str, within: Duration) {
    let t0 = Instant::now();
    while !log.lock().unwrap().iter().any(|l| l.contains(needle)) {
        assert!(
            t0.elapsed() < within,
            "no {needle:?} in the log within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Run = (Instant, Result<(), Code>);
type Runs = Arc<Mutex<Vec<Run>>>;

/// Requests of `runs` that ended well after `since`.
fn served_after(runs: &[Run], since: Instant) -> usize {
    runs.iter().filter(|(t, r)| *t > since && r.is_ok()).count()
}

/// Requests in a loop until stopped, each one's end and outcome recorded.
struct RequestLoop {
    started: Instant,
    stop: Arc<AtomicBool>,
    runs: Runs,
    task: tokio::task::JoinHandle<()>,
}

impl RequestLoop {
    fn start(addr: &str) -> Self {
        let started = Instant::now();
        let url = format!("http://{addr}");
        let stop = Arc::new(AtomicBool::new(false));
        let runs: Runs = Arc::default();
        let (stopped, record) = (stop.clone(), runs.clone());
        let task = tokio::spawn(async move {
            let req = chat_request("Hello!", 8);
            let want = reference_tokens(&req);
            let mut c = GenerationClient::connect(url).await.unwrap();
            while !stopped.load(Ordering::Relaxed) {
                let r = match c.generate(req.clone()).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().token_ids, want, "a wrong token");
                        Ok(())
                    }
                    Err(e) => Err(e.code()),
                };
                record.lock().unwrap().push((Instant::now(), r));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RequestLoop {
            started,
            stop,
            runs,
            task,
        }
    }

    /// Waits (at most 60 s) until `n` requests ended well after `since`; says whether they did.
    /// A slow machine takes longer per request, so checks wait for counts, not fixed times.
    async fn wait_served(&self, since: Instant, n: usize) -> bool {
        let t0 = Instant::now();
        while served_after(&self.runs.lock().unwrap(), since) < n {
            if t0.elapsed() > Duration::from_secs(60) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Waits (at most 60 s) until 3 requests were served.
    async fn until_serving(&self) {
        assert!(
            self.wait_served(self.started, 3).await,
            "no requests served"
        );
    }

    /// Waits (at most 60 s) until `n` requests ended well after `killed` (stop_and_check
    /// reports how many there were if fewer).
    async fn until_served_after(&self, killed: Instant, n: usize) {
        self.wait_served(killed, n).await;
    }

    /// Stops the loop and checks a kill at `killed` cost at most 2 requests, each failing with
    /// UNAVAILABLE (`on`: where they ran), and at least 5 were served after it.
    async fn stop_and_check(self, killed: Instant, on: &str, measure: &str) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let runs = self.runs.lock().unwrap().clone();
        let failed: Vec<_> = runs.iter().filter_map(|(_, r)| r.err()).collect();
        assert!(
            failed.iter().all(|c| *c == Code::Unavailable),
            "only requests on {on} may fail, with UNAVAILABLE: {failed:?}"
        );
        assert!(failed.len() <= 2, "{} requests failed", failed.len());
        let after = served_after(&runs, killed);
        assert!(after >= 5, "only {after} requests succeeded after the kill");
        println!(
            "MEASURE {measure}: {} requests, {} failed, {after} served after the kill",
            runs.len(),
            failed.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_restarts_while_the_other_group_serves() {
    let (mut up, addr, log) = cluster_up(&["--etcd", "local", "--groups", "2", "--cluster", "sup"]);
    let load = RequestLoop::start(&addr);
    load.until_serving().await;

    let g0 = child_with(up.id(), &["eagle-worker", "--group g0"]);
    kill9(g0);
    let killed = Instant::now();
    wait_log(&log, "worker 0 exited", Duration::from_secs(10));
    wait_log(&log, "worker 0 is back", Duration::from_secs(120));
    let back = child_with(up.id(), &["eagle-worker", "--group g0"]);
    assert_ne!(back, g0, "a new process");
    load.until_served_after(killed, 5).await;
    load.stop_and_check(killed, "the dying worker", "worker restart")
        .await;
    let children = child_pids(up.id());
    stop_cluster_up(&mut up, &children);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_tp_rank_restarts_its_group_while_the_other_group_serves() {
    let args = [
        "--etcd",
        "local",
        "--groups",
        "2",
        "--tp",
        "3",
        "--cluster",
        "suptp",
    ];
    let (mut up, addr, log) = cluster_up(&args);
    let load = RequestLoop::start(&addr);
    load.until_serving().await;

    // Rank 1 of group g0, a child of g0's rank 0.
    let g0 = child_with(up.id(), &["eagle-worker", "--group g0"]);
    let rank1 = child_with(g0, &["--tp-rank 1"]);
    kill9(rank1);
    let killed = Instant::now();
    wait_log(&log, "worker 0 exited", Duration::from_secs(10));
    wait_log(&log, "worker 0 is back", Duration::from_secs(180));
    let back = child_with(up.id(), &["eagle-worker", "--group g0"]);
    assert_ne!(back, g0, "rank 0 was started again");
    assert_eq!(child_pids(back).len(), 2, "with its two other ranks");
    load.until_served_after(killed, 5).await;
    load.stop_and_check(killed, "the broken group", "TP rank death")
        .await;
    let children = child_pids(up.id());
    stop_cluster_up(&mut up, &children);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_the_worker_and_the_draft_service_come_back_at_their_address() {
    let (mut up, addr, log) = cluster_up(&["--workers", "1"]);
    let req = chat_request("Hello!", 8);
    let want = reference_tokens(&req);
    let mut c = GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(
        c.generate(req.clone())
            .await
            .unwrap()
            .into_inner()
            .token_ids,
        want
    );

    // The worker: requests fail with UNAVAILABLE until it is back, then succeed.
    kill9(child_with(up.id(), &["eagle-worker"]));
    wait_log(&log, "worker 0 exited", Duration::from_secs(10));
    let t0 = Instant::now();
    loop {
        match c.generate(req.clone()).await {
            Ok(r) => {
                assert_eq!(r.into_inner().token_ids, want);
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the worker never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "MEASURE served again {:.1} s after the worker was killed",
        t0.elapsed().as_secs_f64()
    );

    // The draft service: requests keep succeeding (plain steps), then speculate again.
    kill9(child_with(up.id(), &["eagle-draft"]));
    wait_log(&log, "draft service exited", Duration::from_secs(10));
    wait_log(&log, "draft service is back", Duration::from_secs(120));
    let t0 = Instant::now();
    loop {
        let r = c.generate(req.clone()).await.unwrap().into_inner();
        assert_eq!(r.token_ids, want);
        let s = r.stats.unwrap();
        if s.fallback_steps == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "speculation did not resume: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let children = child_pids(up.id());
    stop_cluster_up(&mut up, &children);
}

#[test]
fn past_its_restart_budget_the_cluster_stops() {
    let (mut up, _addr, log) = cluster_up(&["--workers", "1", "--max-restarts", "0"]);
    let children = child_pids(up.id());
    kill9(child_with(up.id(), &["eagle-worker"]));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the cluster did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{status}");
    wait_log(&log, "past the restart budget", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    for pid in children {
        assert!(is_gone(pid), "child {pid} outlived the cluster");
    }
}
