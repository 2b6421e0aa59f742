//! Bad input gets a clear error with the right status code, and never hurts a service: every
//! validation rule of the public API, malformed and wrong-typed messages, internal calls with
//! inconsistent arguments, and a full queue. After each, the services still answer and no
//! session is left behind.

use std::time::Duration;

use eagle_proto::common::{Empty, Features, SessionRef, Tree};
use eagle_proto::draft::{DraftRequest, OpenRequest};
use eagle_proto::v1::generate_request::Input;
use eagle_proto::v1::{ChatMessage, ChatMessages, GenerateRequest, GenerateResponse};
use eagle_proto::worker::{DecodeRequest, PrefillRequest, VerifyRequest};
use eagle_tests::*;
use tonic::Code;

fn expect(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {}", e.message());
    assert!(
        e.message().contains(needle),
        "{what}: the message {:?} does not mention {needle:?}",
        e.message()
    );
}

/// A request with the wrong wire types: the prompt (a string) as bytes that are not UTF-8,
/// and the sampling message (field 4) as a number.
#[derive(Clone, PartialEq, prost::Message)]
struct Malformed {
    #[prost(bytes = "vec", tag = "2")]
    prompt: Vec<u8>,
    #[prost(fixed32, tag = "4")]
    sampling: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_status() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut c = cluster.client().await;
    let ok = || prompt_request("Hello", 4);
    let with = |f: &dyn Fn(&mut GenerateRequest)| {
        let mut r = ok();
        f(&mut r);
        r
    };
    let inv = Code::InvalidArgument;
    let cases: Vec<(GenerateRequest, &str, &str)> = vec![
        (
            with(&|r| r.input = None),
            "prompt or chat messages",
            "no input",
        ),
        (prompt_request("", 4), "prompt is empty", "empty prompt"),
        (
            with(&|r| r.input = Some(Input::Messages(ChatMessages { messages: vec![] }))),
            "messages is empty",
            "no messages",
        ),
        (
            with(&|r| {
                r.input = Some(Input::Messages(ChatMessages {
                    messages: vec![ChatMessage {
                        role: "wizard".into(),
                        content: "hi".into(),
                    }],
                }))
            }),
            "messages[0].role",
            "unknown role",
        ),
        (
            with(&|r| r.model = "llama-9000".into()),
            "unknown model",
            "unknown model",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().max_new_tokens = Some(0)),
            "max_new_tokens",
            "zero tokens",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().max_new_tokens = Some(1_000_000)),
            "exceeds the model's context",
            "over the context",
        ),
        (
            prompt_request(&"word ".repeat(300_000), 4),
            "limit",
            "over-long prompt",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().temperature = Some(-0.5)),
            "temperature",
            "negative temperature",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().temperature = Some(f32::NAN)),
            "temperature",
            "NaN temperature",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().top_p = Some(0.0)),
            "top_p",
            "top_p 0",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().top_p = Some(1.5)),
            "top_p",
            "top_p 1.5",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().stop = vec!["x".into(); 9]),
            "stop strings",
            "too many stop strings",
        ),
        (
            with(&|r| r.sampling.as_mut().unwrap().stop = vec![String::new()]),
            "stop[0]",
            "an empty stop string",
        ),
        (
            with(&|r| r.speculation.as_mut().unwrap().total_token = Some(1)),
            "total_token",
            "a one-node tree",
        ),
        (
            with(&|r| r.speculation.as_mut().unwrap().depth = Some(0)),
            "depth",
            "depth 0",
        ),
    ];
    for (req, needle, what) in cases {
        expect(c.generate(req.clone()).await, inv, needle, what);
        expect(c.stream_generate(req).await.map(|_| ()), inv, needle, what);
    }

    // Malformed bytes: refused, and the coordinator lives on.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.coordinator.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    raw.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<Malformed, GenerateResponse>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/eagle.v1.Generation/Generate");
    let r = raw
        .unary(
            tonic::Request::new(Malformed {
                prompt: vec![0xff, 0xfe, 0x80],
                sampling: 7,
            }),
            path,
            codec,
        )
        .await;
    let e = r.expect_err("a malformed message is refused");
    assert!(
        matches!(e.code(), Code::Internal | Code::InvalidArgument),
        "malformed: {e:?}"
    );
    let good = c
        .generate(ok())
        .await
        .expect("the coordinator still serves");
    assert!(!good.into_inner().token_ids.is_empty());
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_services_refuse_inconsistent_calls() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut w = cluster.worker_client().await;
    let mut d = cluster.draft_client().await;
    let inv = Code::InvalidArgument;

    let prefill = |tokens: Vec<u32>, capacity: u32| PrefillRequest {
        session_id: "s1".into(),
        tokens,
        capacity,
        sampling: None,
        reuse_cache: false,
    };
    expect(
        w.prefill(prefill(vec![], 8)).await,
        inv,
        "no tokens",
        "empty prefill",
    );
    expect(
        w.prefill(prefill(vec![1, 9_999_999], 8)).await,
        inv,
        "vocabulary",
        "token range",
    );
    expect(
        w.prefill(prefill(vec![1, 2, 3], 2)).await,
        inv,
        "capacity",
        "capacity",
    );
    expect(
        w.verify(VerifyRequest {
            session_id: "nope".into(),
            tree: Some(Tree {
                tokens: vec![1],
                parents: vec![-1],
                draft_probs: vec![],
            }),
        })
        .await,
        Code::NotFound,
        "nope",
        "unknown session",
    );

    let step = w
        .prefill(prefill(vec![1, 2, 3], 32))
        .await
        .expect("prefill")
        .into_inner();
    let last = step.tokens[0];
    let bad_tree = Tree {
        tokens: vec![last, 5, 6],
        parents: vec![-1, 2, 0],
        draft_probs: vec![],
    };
    expect(
        w.verify(VerifyRequest {
            session_id: "s1".into(),
            tree: Some(bad_tree),
        })
        .await,
        inv,
        "parents come first",
        "a cyclic tree",
    );
    expect(
        w.decode(DecodeRequest {
            session_id: "s1".into(),
            token: last + 1,
        })
        .await,
        Code::FailedPrecondition,
        "last token",
        "decode from the wrong token",
    );
    let huge = Tree {
        tokens: std::iter::once(last).chain(0..40).collect(),
        parents: std::iter::once(-1).chain(0..40).collect(),
        draft_probs: vec![],
    };
    expect(
        w.verify(VerifyRequest {
            session_id: "s1".into(),
            tree: Some(huge),
        })
        .await,
        Code::OutOfRange,
        "room",
        "a tree past the session's capacity",
    );
    expect(
        w.prefill(prefill(vec![1], 8)).await,
        Code::AlreadyExists,
        "already open",
        "same id",
    );
    w.release(SessionRef {
        session_id: "s1".into(),
    })
    .await
    .unwrap();

    // Draft side: features that do not match their tokens or the model.
    let feats = step.features.clone().unwrap();
    let open = |tokens: Vec<u32>, features: Option<Features>| OpenRequest {
        session_id: "d1".into(),
        capacity: 64,
        sampling: None,
        spec: None,
        cost_tokens: vec![],
        cost_seconds: vec![],
        tokens,
        features,
    };
    let mut short = feats.clone();
    short.data.truncate(short.data.len() - 3);
    expect(
        d.open(open(vec![2, 3, last], Some(short))).await,
        inv,
        "bytes",
        "truncated features",
    );
    let mut wide = feats.clone();
    wide.hidden += 1;
    expect(
        d.open(open(vec![2, 3, last], Some(wide))).await,
        inv,
        "hidden size",
        "wrong width",
    );
    expect(
        d.open(open(vec![2, last], Some(feats.clone()))).await,
        inv,
        "feature rows",
        "row count",
    );
    expect(
        d.open(open(vec![2, 3, last], None)).await,
        inv,
        "without features",
        "no features",
    );
    let mut bad_spec = open(vec![2, 3, last], Some(feats.clone()));
    bad_spec.spec = Some(eagle_proto::common::SpecParams {
        total_token: 0,
        depth: 0,
        top_k: 0,
    });
    expect(
        d.open(bad_spec).await,
        inv,
        "total_token",
        "bad speculation settings",
    );
    d.open(open(vec![2, 3, last], Some(feats)))
        .await
        .expect("a good open");
    expect(
        d.draft(DraftRequest {
            session_id: "d1".into(),
            commit_tokens: vec![],
            commit_features: None,
            root: last + 1,
            ..Default::default()
        })
        .await,
        inv,
        "root",
        "a root that is not the last committed token",
    );
    expect(
        d.draft(DraftRequest {
            session_id: "d1".into(),
            root: last,
            batch_rows: f32::NAN,
            ..Default::default()
        })
        .await,
        inv,
        "batch load",
        "a batch load that is not a number",
    );
    expect(
        d.draft(DraftRequest {
            session_id: "d1".into(),
            root: last,
            batch_rows: 1e9,
            ..Default::default()
        })
        .await,
        inv,
        "batch load",
        "a batch load out of reason",
    );
    expect(
        d.draft(DraftRequest {
            session_id: "zzz".into(),
            commit_tokens: vec![],
            commit_features: None,
            root: 1,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "zzz",
        "unknown draft session",
    );
    d.close(SessionRef {
        session_id: "d1".into(),
    })
    .await
    .unwrap();

    // Both still serve, and hold nothing.
    w.info(Empty {}).await.expect("worker alive");
    d.info(Empty {}).await.expect("draft alive");
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted() {
    let cluster = TestCluster::start(ClusterOpts {
        coordinator_args: vec![
            "--max-running".into(),
            "1".into(),
            "--max-waiting".into(),
            "0".into(),
        ],
        ..Default::default()
    });
    let mut c = cluster.client().await;
    let mut long = c
        .stream_generate(chat_request("Write a long story about a dragon.", 400))
        .await
        .expect("first request")
        .into_inner();
    // Wait until it is running.
    let first = tokio_stream::StreamExt::next(&mut long).await;
    assert!(first.unwrap().is_ok());
    let mut c2 = cluster.client().await;
    expect(
        c2.generate(prompt_request("Hi", 4)).await,
        Code::ResourceExhausted,
        "busy",
        "a request past the queue",
    );
    drop(long);
    // The slot comes back once the first request notices its client left.
    let t0 = std::time::Instant::now();
    loop {
        match c2.generate(prompt_request("Hi", 4)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "the slot never came back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}
