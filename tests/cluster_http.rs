//! The HTTP API against real processes, for what its Python tests (tests/http: the official
//! `openai` client and a browser) cannot see from outside: a client that closes a stream
//! mid-answer, or drops a unary call, frees its sessions on the worker and the draft service
//! (read from their `Info`); a cluster whose worker is gone answers 503 with OpenAI's error
//! object; and API keys guard the public API on gRPC and HTTP (UNAUTHENTICATED / 401, a
//! per-key limit), with health checks and the page left open.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use eagle_tests::*;
use serde_json::json;

fn http_cluster() -> (TestCluster, String) {
    let c = TestCluster::start(ClusterOpts {
        coordinator_args: vec!["--http-addr".into(), "127.0.0.1:0".into()],
        ..Default::default()
    });
    let url = c
        .coordinator
        .announced("http ")
        .expect("the coordinator printed `http URL`");
    (c, url)
}

/// A long answer: counting goes on well past the point where the test hangs up.
fn long_request(stream: bool) -> serde_json::Value {
    json!({
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": stream,
    })
}

/// Sends `body` to `/v1/completions` on a connection the caller keeps.
fn send(url: &str, body: &serde_json::Value) -> TcpStream {
    let host = url.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_sessions() {
    let (c, url) = http_cluster();

    // A stream closed after a few chunks.
    let s = send(&url, &long_request(true));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut r = BufReader::new(s);
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 4 {
        line.clear();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "the stream ended early"
        );
        if line.starts_with("data: {") {
            assert!(!line.contains("\"error\""), "{line}");
            chunks += 1;
        }
    }
    assert_eq!(
        c.sessions().await,
        (1, 1),
        "the request holds a session on the worker and the draft service while it streams"
    );
    drop(r);
    c.expect_no_sessions(Duration::from_secs(10)).await;

    // A unary call dropped while it runs.
    let s = send(&url, &long_request(false));
    let t0 = std::time::Instant::now();
    while c.sessions().await != (1, 1) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the unary call never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(s);
    c.expect_no_sessions(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_is_503_with_an_error_object() {
    let (mut c, url) = http_cluster();
    c.worker.kill();
    let (status, body) = eagle_tests::http::post_json(
        &url,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    );
    assert_eq!(status, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "service_unavailable_error", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("worker"),
        "{v}"
    );
    // The process itself still answers.
    let (status, body) = eagle_tests::http::get(&url, "/health");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_public_api() {
    let dir = std::env::temp_dir().join(format!("eagle-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, "# test keys\nkey-alpha\nkey-beta\n").unwrap();
    let c = TestCluster::start(ClusterOpts {
        coordinator_args: vec![
            "--http-addr".into(),
            "127.0.0.1:0".into(),
            "--api-keys-file".into(),
            file.display().to_string(),
            "--max-running-per-key".into(),
            "1".into(),
        ],
        ..Default::default()
    });
    let url = c.coordinator.announced("http ").unwrap();
    let req = chat_request("What is the capital of France?", 8);
    let with_key = |key: Option<&str>| {
        let mut r = tonic::Request::new(req.clone());
        if let Some(k) = key {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        r
    };

    // gRPC: no key and a wrong key are UNAUTHENTICATED, naming no key; a good key is served.
    let mut g = c.client().await;
    for key in [None, Some("key-gamma")] {
        let e = g.generate(with_key(key)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        assert!(!e.message().contains("key-"), "{}", e.message());
    }
    let ok = g.generate(with_key(Some("key-alpha"))).await.unwrap();
    assert_eq!(ok.into_inner().token_ids, reference_tokens(&req));

    // Health stays open.
    let chan = tonic::transport::Endpoint::from_shared(format!("http://{}", c.coordinator.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let h = tonic_health::pb::health_client::HealthClient::new(chan)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(h.is_ok(), "{h:?}");

    // One request at a time per key: a second one of key-alpha is refused while its first
    // streams; key-beta has its own allowance.
    let mut long = req.clone();
    long.input = Some(eagle_proto::v1::generate_request::Input::Prompt(
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,".into(),
    ));
    long.sampling.as_mut().unwrap().max_new_tokens = Some(3000);
    let mut r = tonic::Request::new(long);
    r.metadata_mut()
        .insert("authorization", "Bearer key-alpha".parse().unwrap());
    let mut first = g.clone().stream_generate(r).await.unwrap().into_inner();
    use tokio_stream::StreamExt;
    first.next().await.unwrap().unwrap();
    let e = g.generate(with_key(Some("key-alpha"))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    g.generate(with_key(Some("key-beta"))).await.unwrap();
    drop(first);
    c.expect_no_sessions(Duration::from_secs(10)).await;
    g.generate(with_key(Some("key-alpha")))
        .await
        .expect("the key's slot is free again once its stream is closed");

    // HTTP: the same keys; the page and /health stay open.
    let (status, body) = eagle_tests::http::get(&url, "/v1/models");
    assert_eq!(status, 401, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    assert_eq!(eagle_tests::http::get(&url, "/health").0, 200);
    assert_eq!(eagle_tests::http::get(&url, "/").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}
