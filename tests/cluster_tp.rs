//! A tensor-parallel worker group in a real cluster: SmolLM2-135M (9 heads, 3 KV heads) split
//! over three rank processes gives, through EAGLE with the shipped head, the unsharded engine's
//! greedy tokens, also for eight concurrent streams sharing the group's batched passes; a degree
//! that does not divide the heads is refused at start; killing a rank
//! mid-request fails the request with UNAVAILABLE within seconds, and the worker reports
//! itself unhealthy.

use std::time::{Duration, Instant};

use eagle_tests::*;
use tokio_stream::StreamExt;
use tonic::Code;

fn tp3() -> ClusterOpts {
    ClusterOpts {
        worker_args: vec!["--tp".into(), "3".into()],
        head: Some(shipped_head()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp3_eagle_greedy_equals_the_unsharded_engine() {
    let cluster = TestCluster::start(tp3());
    let mut c = cluster.client().await;
    let mut accepted = Vec::new();
    for prompt in &PROMPTS[..4] {
        let req = chat_request(prompt, 40);
        let want = reference_tokens(&req);
        let r = c.generate(req).await.unwrap().into_inner();
        assert_eq!(
            r.token_ids, want,
            "TP 3 EAGLE vs unsharded vanilla on {prompt:?}"
        );
        accepted.push(r.stats.unwrap().mean_accepted);
    }
    eprintln!("TP 3 mean accepted per step: {accepted:?}");
    assert!(
        accepted.iter().any(|&a| a > 1.2),
        "the shipped head's drafts are accepted through the group: {accepted:?}"
    );

    // A multi-turn session: every rank keeps its shard of the cache between turns and reuses
    // the same prefix, so the second turn prefills only its new tokens and still comes out
    // token for token.
    let turn = |msgs: &[(&str, &str)]| chat_turn(msgs, "tp-session", 24);
    let q = "Name a large city.";
    let r1 = c.generate(turn(&[("user", q)])).await.unwrap().into_inner();
    let req = turn(&[
        ("user", q),
        ("assistant", &r1.text),
        ("user", "And another?"),
    ]);
    let r2 = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        r2.token_ids,
        reference_tokens(&req),
        "second turn through TP 3"
    );
    let cached = r2.stats.unwrap().cached_prompt_tokens;
    assert!(cached >= r1.usage.unwrap().prompt_tokens, "{cached} cached");
}

/// Continuous batching across the group: rank 0 sends each batched pass (prompts begun, chunks,
/// decodes and trees of several sessions) to the other ranks, and all eight concurrent
/// streams still give the unsharded engine's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp3_serves_eight_concurrent_streams_in_shared_passes() {
    let mut opts = tp3();
    opts.worker_args
        .extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
    let cluster = TestCluster::start(opts);
    let c = cluster.client().await;
    let reqs: Vec<_> = (0..8)
        .map(|i| {
            let mut r = chat_request(PROMPTS[i % PROMPTS.len()], 32);
            if i % 2 == 1 {
                r.speculation.as_mut().unwrap().enabled = Some(false);
            }
            r
        })
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(reference_tokens).collect();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let mut c = c.clone();
            tokio::spawn(async move { c.generate(r).await.unwrap().into_inner().token_ids })
        })
        .collect();
    for (i, (t, w)) in tasks.into_iter().zip(&want).enumerate() {
        assert_eq!(&t.await.unwrap(), w, "stream {i} of 8 through TP 3");
    }
    let url = cluster.worker.announced("metrics ").expect("metrics URL");
    let (_, body) = eagle_tests::http::get(url.trim_end_matches("/metrics"), "/metrics");
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let shared =
        value("eagle_batch_sessions_count") - value("eagle_batch_sessions_bucket{le=\"1.0\"}");
    assert!(shared > 0.0, "no pass of the group held two sessions");
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

#[test]
fn a_degree_that_does_not_divide_the_heads_is_refused_at_start() {
    let out = std::process::Command::new(bin("eagle-worker"))
        .args(["--model", &smollm2().display().to_string(), "--tp", "2"])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tensor-parallel degree 2 does not divide the 9 attention heads")
            && err.contains("1, 3, 9"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_rank_fails_the_request_quickly_and_the_group_reports_unhealthy() {
    let cluster = TestCluster::start(tp3());
    let pid: i32 = cluster
        .worker
        .lines
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| l.strip_prefix("rank 2 pid "))
        .expect("the worker names its ranks' processes")
        .parse()
        .unwrap();
    let mut c = cluster.client().await;
    let mut s = c
        .stream_generate(chat_request("Tell me a very long story.", 400))
        .await
        .unwrap()
        .into_inner();
    s.next().await.unwrap().unwrap();
    // SAFETY: signalling a process of this test's own cluster.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let t0 = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream does not hang")
    .expect("the stream ends with an error, not a clean finish");
    let took = t0.elapsed();
    eprintln!("rank killed -> {:?} after {took:?}", status.code());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The worker stays up, says it is unhealthy, and refuses new work at once.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", cluster.worker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let t0 = Instant::now();
    loop {
        let st = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if st == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "health still {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let e = c
        .generate(chat_request("Hello?", 8))
        .await
        .expect_err("a broken group serves nothing");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}
