//! Telemetry end to end: `eagle cluster up` started with `OTEL_EXPORTER_OTLP_ENDPOINT` exports
//! every process's spans by OTLP/gRPC to a receiver run here (the `opentelemetry-proto` crate's
//! tonic trace service). One request's spans from the coordinator, the draft service and the
//! worker arrive under the caller's trace id, with the right parent chain, the RPC and
//! generative-AI attributes and each process's resource. Then the receiver stops: requests
//! still succeed, and the lost spans are counted in `eagle_trace_spans_dropped_total`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use eagle_proto::v1::generation_client::GenerationClient;
use eagle_tests::http::get;
use eagle_tests::otlp::{Received, Receiver};
use eagle_tests::*;

/// `eagle cluster up` exporting to `endpoint`; its gRPC address and the coordinator's metrics
/// URL.
fn cluster_up(endpoint: &str) -> (KillOnDrop, String, String) {
    let mut up = KillOnDrop(
        cluster_up_command(&["--no-http"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            // Export often, and give up on a dead collector quickly.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut metrics = None;
    while metrics.is_none() || addr.is_none() {
        let line = lines.next().expect("eagle cluster up ended early").unwrap();
        if let Some(a) = line.strip_prefix("ready ") {
            addr = Some(a.to_string());
        } else if let Some(u) = line.strip_prefix("metrics coordinator ") {
            metrics = Some(u.trim_end_matches("/metrics").to_string());
        }
    }
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    (up, addr.unwrap(), metrics.unwrap())
}

/// A request carrying the W3C trace context `traceparent`.
fn traced(trace_id: &str, parent: &str) -> tonic::Request<eagle_proto::v1::GenerateRequest> {
    let mut req = tonic::Request::new(chat_request("Name three rivers of Europe.", 16));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_and_a_dead_one_costs_nothing() {
    let receiver = Receiver::default();
    let (endpoint, stop) = receiver.serve("127.0.0.1:0").await;
    let (_up, addr, metrics) = tokio::task::block_in_place(|| cluster_up(&endpoint));
    let mut client = GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let (trace_id, caller) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let answer = client
        .generate(traced(trace_id, caller))
        .await
        .unwrap()
        .into_inner();
    let generated = answer.usage.unwrap().generated_tokens;
    assert!(generated > 0);

    // Every process's spans of the request arrive (batched, so wait a little).
    let wanted = [
        ("eagle-coordinator", "request"),
        ("eagle-coordinator", "verify"),
        ("eagle-worker", "worker.prefill"),
        ("eagle-worker", "worker.verify"),
        ("eagle-draft", "draft.open"),
        ("eagle-draft", "draft.draft"),
    ];
    let t0 = Instant::now();
    let spans: Vec<Received> = loop {
        let spans: Vec<Received> = receiver
            .spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        let seen: HashSet<(&str, &str)> = spans
            .iter()
            .map(|s| (s.resource["service.name"].as_str(), s.name.as_str()))
            .collect();
        // The request span ends last, after the step spans; wait for it and the rest.
        if wanted.iter().all(|w| seen.contains(w)) {
            break spans;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "spans missing after 30 s; got {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_id: HashMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.resource["service.name"] == service && s.name == name)
            .unwrap()
    };

    // The parent chain: worker.verify <- the coordinator's verify <- ... <- request <- caller.
    let request = find("eagle-coordinator", "request");
    assert_eq!(
        request.parent_span_id, caller,
        "the request adopts the caller's context"
    );
    for (service, name) in [
        ("eagle-worker", "worker.verify"),
        ("eagle-draft", "draft.draft"),
    ] {
        let s = find(service, name);
        let parent = by_id[s.parent_span_id.as_str()];
        assert_eq!(parent.resource["service.name"], "eagle-coordinator");
        let mut cur = parent;
        let mut hops = 0;
        while cur.span_id != request.span_id {
            cur = by_id
                .get(cur.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("{name}'s ancestry breaks at {}", cur.name));
            hops += 1;
            assert!(hops < 10);
        }
    }
    assert_eq!(
        by_id[find("eagle-worker", "worker.verify")
            .parent_span_id
            .as_str()]
        .name,
        "verify"
    );

    // Attributes: RPC and generative-AI semantic conventions, and ours.
    let a = &request.attributes;
    assert_eq!(a["rpc.system"], "grpc");
    assert_eq!(a["rpc.service"], "eagle.v1.Generation");
    assert_eq!(a["rpc.method"], "Generate");
    assert_eq!(a["rpc.grpc.status_code"], "0");
    assert_eq!(a["gen_ai.usage.output_tokens"], generated.to_string());
    assert!(a["gen_ai.usage.input_tokens"].parse::<u32>().unwrap() > 0);
    assert!(!a["gen_ai.request.model"].is_empty());
    assert_eq!(a["gen_ai.request.temperature"], "0");
    assert_eq!(a["gen_ai.request.max_tokens"], "16");
    assert!(a.contains_key("eagle.mean_accepted"));
    let v = &find("eagle-worker", "worker.verify").attributes;
    assert_eq!(
        (v["rpc.service"].as_str(), v["rpc.method"].as_str()),
        ("eagle.worker.v1.Worker", "Verify")
    );
    assert_eq!(v["rpc.grpc.status_code"], "0");
    let d = &find("eagle-draft", "draft.draft").attributes;
    assert_eq!(d["rpc.service"], "eagle.draft.v1.Draft");

    // Resources: one per process.
    let instances: HashSet<&str> = spans
        .iter()
        .map(|s| s.resource["service.instance.id"].as_str())
        .collect();
    assert_eq!(instances.len(), 3, "three processes: {instances:?}");
    assert_eq!(
        find("eagle-worker", "worker.verify").resource["eagle.rank"],
        "0"
    );

    // A collector that is down costs spans, nothing else.
    stop.stop().await;
    for i in 0..3 {
        let r = client
            .generate(traced(trace_id, caller))
            .await
            .unwrap_or_else(|e| panic!("request {i} with the collector down: {e}"));
        assert!(r.into_inner().usage.unwrap().generated_tokens > 0);
    }
    let t0 = Instant::now();
    loop {
        let (status, body) = tokio::task::block_in_place(|| get(&metrics, "/metrics"));
        assert_eq!(status, 200);
        let dropped: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix("eagle_trace_spans_dropped_total "))
            .expect("the dropped spans counter")
            .parse()
            .unwrap();
        if dropped > 0.0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no dropped span counted in 60 s with the collector down"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
