//! Failures and load: a client that leaves frees its sessions; a draft service that dies mid-
//! request costs speed, not tokens, and speculation resumes when it returns; a dead worker
//! fails requests quickly with UNAVAILABLE; sixteen concurrent streams all come out right.

use std::time::{Duration, Instant};

use eagle_tests::*;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_sessions() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut c = cluster.client().await;
    // A stream dropped after two chunks.
    let mut s = c
        .stream_generate(chat_request("Tell me a very long story.", 500))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        s.next().await.unwrap().unwrap();
    }
    let (w, d) = cluster.sessions().await;
    assert_eq!((w, d), (1, 1), "one session on each side while streaming");
    drop(s);
    cluster.expect_no_sessions(Duration::from_secs(10)).await;

    // A unary call abandoned mid-way (its future dropped, as a client deadline does).
    let mut c2 = cluster.client().await;
    let call = c2.generate(chat_request("Tell me another very long story.", 500));
    assert!(tokio::time::timeout(Duration::from_millis(1500), call)
        .await
        .is_err());
    cluster.expect_no_sessions(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draft_service_dying_costs_speed_not_tokens() {
    let mut cluster = TestCluster::start(ClusterOpts {
        coordinator_args: vec!["--draft-retry-ms".into(), "300".into()],
        ..Default::default()
    });
    let req = chat_request("Explain how a bicycle works, step by step.", 64);
    let want = reference_tokens(&req);
    let mut c = cluster.client().await;
    let mut stream = c.stream_generate(req.clone()).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    let mut killed = false;
    let mut stats = None;
    while let Some(ch) = stream.next().await {
        let ch = ch.expect("the request survives the draft service");
        tokens.extend_from_slice(&ch.token_ids);
        if !killed && tokens.len() >= 8 {
            cluster.draft.as_mut().unwrap().kill();
            killed = true;
        }
        if ch.stats.is_some() {
            stats = ch.stats;
        }
    }
    assert!(killed, "the generation ended before the kill");
    assert_eq!(tokens, want, "same tokens with the draft service gone");
    let stats = stats.expect("final chunk");
    assert!(
        stats.fallback_steps > 0,
        "the fallback shows in the statistics"
    );

    // A new request while it is down: plain decoding, same tokens.
    let r = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.token_ids, want);
    assert!(r.stats.unwrap().fallback_steps > 0);

    // The draft service comes back on the same address: speculation resumes.
    let addr = cluster.draft.as_ref().unwrap().addr.clone();
    cluster.draft = Some(start_draft(&addr, &[]));
    let t0 = Instant::now();
    loop {
        let r = c.generate(req.clone()).await.unwrap().into_inner();
        assert_eq!(r.token_ids, want);
        if r.stats.unwrap().fallback_steps == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "speculation never resumed"
        );
    }
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_fails_requests_quickly_with_unavailable() {
    let mut cluster = TestCluster::start(ClusterOpts::default());
    let mut c = cluster.client().await;
    let mut stream = c
        .stream_generate(chat_request("Count from one to one hundred.", 400))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    cluster.worker.kill();
    let t0 = Instant::now();
    let mut failed = None;
    while let Some(ch) = stream.next().await {
        if let Err(e) = ch {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("the stream ends with an error, not a silent end");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    let t1 = Instant::now();
    let e = c.generate(prompt_request("Hi", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(t1.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_are_all_correct() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let reqs: Vec<_> = PROMPTS[..16].iter().map(|p| chat_request(p, 16)).collect();
    let wants: Vec<_> = reqs.iter().map(reference_tokens).collect();
    let mut tasks = Vec::new();
    for r in reqs {
        let mut c = cluster.client().await;
        tasks.push(tokio::spawn(async move {
            let mut s = c.stream_generate(r).await.unwrap().into_inner();
            let mut toks = Vec::new();
            while let Some(ch) = s.next().await {
                toks.extend_from_slice(&ch.unwrap().token_ids);
            }
            toks
        }));
    }
    for (i, (t, want)) in tasks.into_iter().zip(wants).enumerate() {
        assert_eq!(t.await.unwrap(), want, "stream {i}");
    }
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_idle_reclaim() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let cluster = TestCluster::start(ClusterOpts {
        env: vec![("EAGLE_IDLE_TIMEOUT_S".into(), "1".into())],
        ..Default::default()
    });
    let services = [
        (&cluster.coordinator.addr, "eagle.v1.Generation"),
        (&cluster.worker.addr, "eagle.worker.v1.Worker"),
        (
            &cluster.draft.as_ref().unwrap().addr,
            "eagle.draft.v1.Draft",
        ),
    ];
    for (addr, name) in services {
        let url = format!("http://{addr}");
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut h = HealthClient::new(channel.clone());
        let st = h
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.status, ServingStatus::Serving as i32, "{name}");
        let mut r = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let msg = resp.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("{name}: no service list");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(
            names.contains(&name),
            "{name} not listed by reflection: {names:?}"
        );
    }

    // A session left open by a vanished caller is reclaimed after the idle timeout.
    let mut w = cluster.worker_client().await;
    w.prefill(eagle_proto::worker::PrefillRequest {
        session_id: "orphan".into(),
        tokens: vec![1, 2, 3],
        capacity: 16,
        sampling: None,
        reuse_cache: false,
    })
    .await
    .unwrap();
    assert_eq!(cluster.sessions().await.0, 1);
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}
