//! Multi-turn sessions without etcd (placement in the coordinator's memory) and the worker's
//! cache reuse itself: a reused prefix gives the same next token and the same feature bits as
//! a fresh prefill, only the matching prefix is kept, the cache grows when a turn needs more
//! room, a later turn reuses the cache with the tokens of a fresh request, a session takes one
//! request at a time, and a bad session id is refused.

use std::time::Duration;

use eagle_proto::common::Empty;
use eagle_proto::worker::PrefillRequest;
use eagle_tests::*;
use tokio_stream::StreamExt;
use tonic::Code;

fn prefill(id: &str, tokens: &[u32], capacity: u32, reuse: bool) -> PrefillRequest {
    PrefillRequest {
        session_id: id.into(),
        tokens: tokens.to_vec(),
        capacity,
        sampling: None,
        reuse_cache: reuse,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reuse_their_cache_and_lose_nothing() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut w = cluster.worker_client().await;

    // The worker: a reused prefix gives the same bits as a fresh prefill.
    let e = reference_engine();
    let a = e
        .tokenizer
        .encode("The quick brown fox jumps over", true)
        .unwrap();
    let b = e
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog and runs", true)
        .unwrap();
    assert!(b.starts_with(&a[..a.len() - 1]));
    w.prefill(prefill("r", &a, 16, false)).await.unwrap();
    let again = w.prefill(prefill("r", &a, 16, false)).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "reuse only when asked");
    let reused = w
        .prefill(prefill("r", &b, 64, true))
        .await
        .expect("reuse, growing the cache from 16 to 64 slots")
        .into_inner();
    let fresh = w
        .prefill(prefill("f", &b, 64, false))
        .await
        .unwrap()
        .into_inner();
    let keep = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert_eq!(reused.cached_tokens as usize, keep);
    assert_eq!(fresh.cached_tokens, 0);
    assert_eq!(reused.tokens, fresh.tokens, "same next token");
    let (rf, ff) = (reused.features.unwrap(), fresh.features.unwrap());
    assert_eq!(
        rf.rows as usize,
        b.len(),
        "features cover every prompt token"
    );
    assert_eq!(rf.data, ff.data, "the same feature bits");
    // The whole prompt cached: all but its last token are kept (its logits are needed).
    let same = w
        .prefill(prefill("r", &b, 64, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.cached_tokens as usize, b.len() - 1);
    assert_eq!(same.tokens, fresh.tokens);
    for id in ["r", "f"] {
        w.release(eagle_proto::common::SessionRef {
            session_id: id.into(),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        w.info(Empty {}).await.unwrap().into_inner().active_sessions,
        0
    );

    // Through the coordinator: the second turn reuses the first's cache, same tokens.
    let mut c = cluster.client().await;
    let q = "Name a large city.";
    let r1 = c
        .generate(chat_turn(&[("user", q)], "s", 16))
        .await
        .unwrap()
        .into_inner();
    let follow = [
        ("user", q),
        ("assistant", r1.text.as_str()),
        ("user", "And another?"),
    ];
    let req = chat_turn(&follow, "s", 16);
    let r2 = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(r2.token_ids, reference_tokens(&req));
    let cached = r2.stats.unwrap().cached_prompt_tokens;
    assert!(cached >= r1.usage.unwrap().prompt_tokens, "{cached} cached");
    let (ws, _) = cluster.sessions().await;
    assert_eq!(
        ws, 1,
        "the session's cache stays on the worker between turns"
    );

    // An unrelated prompt under the same session id still comes out right.
    let req = chat_turn(&[("user", "What is 2 + 2?")], "s", 12);
    let r = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.token_ids, reference_tokens(&req));

    // One request per session at a time.
    let mut long = c
        .stream_generate(chat_turn(
            &[("user", "Tell me a very long story.")],
            "s",
            400,
        ))
        .await
        .unwrap()
        .into_inner();
    long.next().await.unwrap().unwrap();
    let busy = c
        .generate(chat_turn(&[("user", "Hi")], "s", 4))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::Aborted, "{}", busy.message());
    drop(long);

    let bad = c
        .generate(chat_turn(&[("user", "Hi")], "no spaces", 4))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("session_id"), "{}", bad.message());

    // A cancelled turn frees its cache (the next turn starts afresh).
    let t0 = std::time::Instant::now();
    while cluster.sessions().await.0 != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the cancelled turn's cache is freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
