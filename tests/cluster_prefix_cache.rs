//! Automatic prefix caching through the real cluster: requests that share a prefix with earlier
//! ones (a system prompt, the same prompt again, nothing) get exactly the tokens of plain
//! greedy decoding, seeded sampling gives the same tokens cold and warm, eviction under a small
//! budget changes nothing but speed, and the cached tokens the API reports (gRPC and the
//! OpenAI usage) equal what the worker's metrics say it reused.

use eagle_proto::v1::GenerateRequest;
use eagle_tests::http::{get, post_json};
use eagle_tests::*;
use serde_json::json;

type Client = eagle_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>;

/// A system prompt of a few hundred tokens, shared by several requests.
const SYSTEM: &str = "You are a careful assistant for a small public library. You answer \
questions about opening hours, borrowing rules, the reading room, the children's corner, \
events, printing and the catalogue. Opening hours: Monday to Friday from nine to seven, \
Saturday from ten to four, closed on Sundays and public holidays. Members may borrow up to \
twelve items for three weeks and renew them twice online unless another member reserved \
them. Late returns cost twenty cents a day per item, capped at five euros. The reading room \
is silent; laptops are welcome, phone calls are not. Printing costs ten cents a page in black \
and white and fifty in colour. The children's corner hosts a story hour every Wednesday at \
four. Answer briefly and kindly, and say so when you do not know.";

fn metric(service: &Service, name: &str) -> f64 {
    let url = service.announced("metrics ").expect("a metrics URL");
    let (status, body) = get(url.trim_end_matches("/metrics"), "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}"))
}

async fn run(c: &mut Client, r: &GenerateRequest) -> (Vec<u32>, u32) {
    let out = c.generate(r.clone()).await.expect("generate").into_inner();
    let cached = out.usage.expect("usage").cached_prompt_tokens;
    assert_eq!(cached, out.stats.expect("stats").cached_prompt_tokens);
    (out.token_ids, cached)
}

fn ask(question: &str) -> GenerateRequest {
    chat_turn(&[("system", SYSTEM), ("user", question)], "", 24)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_are_reused_and_change_no_output() {
    // 24 MiB: about 16 blocks of SmolLM2's KV, 4 per request, so the flood below evicts.
    let cluster = TestCluster::start(ClusterOpts {
        worker_args: vec![
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--prefix-cache-mb".into(),
            "24".into(),
        ],
        coordinator_args: vec!["--http-addr".into(), "127.0.0.1:0".into()],
        ..Default::default()
    });
    let mut c = cluster.client().await;
    let mut reported = 0u32;

    // Cold: nothing cached.
    let first = ask(PROMPTS[0]);
    let (tokens, cached) = run(&mut c, &first).await;
    assert_eq!(cached, 0);
    assert_eq!(tokens, reference_tokens(&first));
    // 100%: the same request again reuses whole blocks of its prompt and answers the same.
    let (again, cached) = run(&mut c, &first).await;
    assert!(cached >= 32, "the repeated prompt reused {cached} tokens");
    assert_eq!(cached % 32, 0, "whole blocks");
    assert_eq!(again, tokens);
    reported += cached;
    // Shared system prompt, another question.
    let second = ask(PROMPTS[6]);
    let (tokens2, cached2) = run(&mut c, &second).await;
    assert!(
        cached2 >= 32,
        "the shared system prompt reused {cached2} tokens"
    );
    assert_eq!(tokens2, reference_tokens(&second));
    reported += cached2;
    // Nothing shared.
    let other = prompt_request(
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        16,
    );
    let (tokens3, cached3) = run(&mut c, &other).await;
    assert_eq!(cached3, 0);
    assert_eq!(tokens3, reference_tokens(&other));

    // Seeded sampling: the same tokens cold and warm.
    let mut sampled = prompt_request(&format!("{SYSTEM}\n\nA short poem about the library:"), 24);
    let s = sampled.sampling.as_mut().unwrap();
    s.temperature = Some(0.9);
    s.top_p = Some(0.95);
    s.seed = 77;
    let (cold, cached) = run(&mut c, &sampled).await;
    assert_eq!(cached, 0);
    let (warm, cached) = run(&mut c, &sampled).await;
    assert!(cached >= 32);
    assert_eq!(warm, cold, "seeded sampling, cache on and off");
    reported += cached;

    // A flood of other long prompts evicts blocks; answers stay exact.
    for p in PROMPTS.iter().take(8) {
        let r = prompt_request(&format!("{p} {p} {p} {SYSTEM}"), 4);
        let (_, cached) = run(&mut c, &r).await;
        reported += cached;
    }
    assert!(
        metric(&cluster.worker, "eagle_prefix_cache_evicted_blocks_total") > 0.0,
        "the flood evicted blocks"
    );
    let bytes = metric(&cluster.worker, "eagle_prefix_cache_bytes");
    assert!(bytes <= metric(&cluster.worker, "eagle_prefix_cache_capacity_bytes"));
    let (after, cached) = run(&mut c, &second).await;
    assert_eq!(after, tokens2, "after eviction");
    reported += cached;

    // The OpenAI usage reports the reused tokens too.
    let url = cluster.coordinator.announced("http ").expect("an http URL");
    let body = json!({
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[6]}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let (status, text) = post_json(&url, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let usage_cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("usage.prompt_tokens_details.cached_tokens");
    assert!(usage_cached >= 32, "{v}");
    reported += usage_cached as u32;

    // What the API reported is what the worker reused.
    let hit = metric(&cluster.worker, "eagle_prefix_cache_hit_tokens_total");
    assert_eq!(hit, f64::from(reported));
}

/// Two workers behind one coordinator: a prompt whose prefix one worker holds goes there even
/// when that worker is busier (a running request) and the other is idle, and reuses the
/// prefix; least-loaded routing alone would have sent it to the idle worker, cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_goes_to_the_worker_that_holds_its_prefix() {
    use std::io::{BufRead, BufReader};
    use tokio_stream::StreamExt;

    let mut up = KillOnDrop(
        cluster_up_command(&["--workers", "2", "--no-http", "--no-metrics"])
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(up.0.stdout.take().unwrap()).lines();
    let ready = lines.next().expect("a line").unwrap();
    let addr = ready
        .strip_prefix("ready ")
        .expect("ready ADDR")
        .to_string();
    let mut c = Client::connect(format!("http://{addr}")).await.unwrap();

    // A long shared system prompt (about 480 tokens) lands on one worker.
    let long_system = format!("{SYSTEM}\n{SYSTEM}\n{SYSTEM}");
    let ask_long = |q: &str| chat_turn(&[("system", &long_system), ("user", q)], "", 8);
    let (_, cached) = run(&mut c, &ask_long(PROMPTS[0])).await;
    assert_eq!(cached, 0);
    // A long answer keeps that same worker (the first of two idle ones) busy...
    let mut busy = prompt_request("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", 400);
    busy.speculation.as_mut().unwrap().enabled = Some(false);
    let mut stream = c.stream_generate(busy).await.unwrap().into_inner();
    let first = stream.next().await.expect("a chunk").expect("no error");
    assert!(!first.token_ids.is_empty() || first.finish_reason == 0);
    // ...and the next request with the shared prefix still goes there, to its cached blocks.
    let second = ask_long(PROMPTS[6]);
    let (tokens, cached) = run(&mut c, &second).await;
    assert!(
        cached >= 320,
        "routed to the worker holding the prefix: {cached} cached"
    );
    assert_eq!(tokens, reference_tokens(&second));
    drop(stream);
    let _ = up.0.kill();
}

/// On the worker itself: a prompt restored from the prefix cache returns the very feature bits
/// (every prompt token's, the restored ones and those run) and the same next token as a cold
/// prefill of it; the restored KV then decodes the same next tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_kv_gives_the_bits_of_a_fresh_prefill() {
    use eagle_proto::worker::{DecodeRequest, PrefillRequest};
    let cold = TestCluster::start(ClusterOpts {
        draft: false,
        worker_args: vec!["--prefix-cache-mb".into(), "0".into()],
        ..Default::default()
    });
    let warm = TestCluster::start(ClusterOpts {
        draft: false,
        ..Default::default()
    });
    let e = reference_engine();
    let tokens = e
        .tokenizer
        .encode(&format!("{SYSTEM} What time does the library open?"), true)
        .unwrap();
    assert!(tokens.len() > 96);
    let req = |id: &str| PrefillRequest {
        session_id: id.into(),
        tokens: tokens.clone(),
        capacity: tokens.len() as u32 + 8,
        sampling: None,
        reuse_cache: false,
    };
    let mut steps = Vec::new();
    for (cluster, id) in [(&cold, "a"), (&warm, "a"), (&warm, "b")] {
        let mut w = cluster.worker_client().await;
        let step = w.prefill(req(id)).await.unwrap().into_inner();
        let next = w
            .decode(DecodeRequest {
                session_id: id.into(),
                token: step.tokens[0],
            })
            .await
            .unwrap()
            .into_inner();
        steps.push((step, next));
    }
    let (fresh, fresh_next) = &steps[0];
    assert_eq!(fresh.cached_tokens, 0);
    assert_eq!(
        steps[1].0.cached_tokens, 0,
        "the first prompt on the warm worker runs whole"
    );
    let (restored, restored_next) = &steps[2];
    assert!(restored.cached_tokens >= 96, "{}", restored.cached_tokens);
    assert_eq!(restored.tokens, fresh.tokens);
    let (f, r) = (
        fresh.features.as_ref().unwrap(),
        restored.features.as_ref().unwrap(),
    );
    assert_eq!(r.rows as usize, tokens.len());
    assert!(
        r.data == f.data,
        "restored features differ from a fresh prefill's"
    );
    assert_eq!(restored_next.tokens, fresh_next.tokens);
    assert!(
        restored_next.features.as_ref().unwrap().data == fresh_next.features.as_ref().unwrap().data
    );
}
