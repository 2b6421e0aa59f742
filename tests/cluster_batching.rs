//! Continuous batching through the real cluster: many streams share the worker's target passes
//! and the draft service's head passes, and each still gets exactly what it gets alone; a long
//! prompt is prefilled in chunks between the other streams' steps instead of stalling them; a
//! stream dropped inside a batch frees its session while the rest go on.

use std::time::{Duration, Instant};

use eagle_proto::v1::GenerateRequest;
use eagle_tests::http::get;
use eagle_tests::*;
use tokio_stream::StreamExt;

type Client = eagle_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>;

/// A streamed answer: its tokens, and when each chunk arrived.
struct Streamed {
    tokens: Vec<u32>,
    arrivals: Vec<Instant>,
}

async fn stream(mut c: Client, r: GenerateRequest) -> Streamed {
    let mut st = c.stream_generate(r).await.expect("stream").into_inner();
    let mut out = Streamed {
        tokens: Vec::new(),
        arrivals: Vec::new(),
    };
    while let Some(ch) = st.next().await {
        let ch = ch.expect("chunk");
        if !ch.token_ids.is_empty() {
            out.arrivals.push(Instant::now());
        }
        out.tokens.extend_from_slice(&ch.token_ids);
    }
    out
}

/// A service's metrics text.
fn metrics_of(service: &Service) -> String {
    let url = service
        .announced("metrics ")
        .expect("the service prints its metrics URL");
    let base = url.trim_end_matches("/metrics");
    let (status, body) = get(base, "/metrics");
    assert_eq!(status, 200);
    body
}

/// Passes (worker) or batches (draft service) that held more than one session so far, from
/// the histogram `name`.
fn shared(service: &Service, name: &str) -> f64 {
    let m = metrics_of(service);
    sample(&m, &format!("{name}_count")) - sample(&m, &format!("{name}_bucket{{le=\"1.0\"}}"))
}

/// The value of the sample whose line starts with `name` (labels included).
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in the metrics"))
}

fn batching_cluster(env: &[(&str, &str)]) -> TestCluster {
    TestCluster::start(ClusterOpts {
        worker_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
        coordinator_args: vec!["--max-running".into(), "16".into()],
        // The draft service's metrics too (the worker's flag above wins over this).
        env: [("EAGLE_METRICS_ADDR", "127.0.0.1:0")]
            .iter()
            .chain(env)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
}

/// Raw-text prompts that greedy decoding continues for a long time (counting, listing).
fn counting_prompt(i: usize) -> String {
    let start = 10 + 37 * i;
    let nums: Vec<String> = (start..start + 6).map(|n| n.to_string()).collect();
    format!("{},", nums.join(", "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_equal_each_stream_alone() {
    let cluster = batching_cluster(&[]);
    let c = cluster.client().await;
    // 8 greedy requests (half chat, half raw prompts, speculation on for some) and 8 seeded
    // sampled ones.
    let mut reqs = Vec::new();
    for i in 0..16 {
        let p = PROMPTS[i % PROMPTS.len()];
        let mut r = if i.is_multiple_of(2) {
            chat_request(p, 32)
        } else {
            prompt_request(p, 32)
        };
        if i % 4 == 3 {
            r.speculation.as_mut().unwrap().enabled = Some(false);
        }
        if i >= 8 {
            let s = r.sampling.as_mut().unwrap();
            s.temperature = Some(0.8);
            s.top_p = Some(0.95);
            s.seed = 1000 + i as u64;
        }
        reqs.push(r);
    }
    // Alone: the engine in-process for greedy, the cluster one request at a time for seeded.
    let mut want = Vec::new();
    for r in &reqs {
        want.push(if r.sampling.as_ref().unwrap().seed == 0 {
            reference_tokens(r)
        } else {
            stream(c.clone(), r.clone()).await.tokens
        });
    }
    let draft = cluster.draft.as_ref().unwrap();
    let (passes_before, drafts_before) = (
        shared(&cluster.worker, "eagle_batch_sessions"),
        shared(draft, "eagle_draft_batch_sessions"),
    );
    let tasks: Vec<_> = reqs
        .iter()
        .map(|r| tokio::spawn(stream(c.clone(), r.clone())))
        .collect();
    for (i, (t, w)) in tasks.into_iter().zip(&want).enumerate() {
        let got = t.await.unwrap();
        assert_eq!(
            &got.tokens, w,
            "request {i} differs among 16 concurrent streams from the same request alone"
        );
    }
    assert!(
        shared(&cluster.worker, "eagle_batch_sessions") > passes_before,
        "no target pass held more than one session: the streams were not batched"
    );
    // The seeded streams speculate whatever the load: their trees are drafted together.
    assert!(
        shared(draft, "eagle_draft_batch_sessions") > drafts_before,
        "no draft batch held more than one session: the drafts were not batched"
    );
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_prefilled_between_the_short_streams_steps() {
    // The serving default (quantized blocks): this test compares the cluster with itself, and
    // a 1,500-token prompt in f32 takes most of a minute here.
    // The prefix cache off: the long prompt is sent twice and must be prefilled both times.
    let cluster = batching_cluster(&[("EAGLE_DTYPE", "auto"), ("EAGLE_PREFIX_CACHE_MB", "0")]);
    let c = cluster.client().await;
    // Common words, one token each: a prompt of about 1,500 tokens.
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then",
    ];
    let text: Vec<&str> = (0..1500)
        .map(|i| words[(i * 7 + i / 10) % words.len()])
        .collect();
    let text = text.join(" ");
    let tok = &reference_engine().tokenizer;
    let n = tok.encode(&text, tok.add_bos()).unwrap().len();
    assert!((1400..=1700).contains(&n), "the long prompt has {n} tokens");
    let long = |max_new| {
        let mut r = prompt_request(&text, max_new);
        r.speculation.as_mut().unwrap().enabled = Some(false);
        r
    };
    // The long prompt alone: how long its prefill (time to first token) takes.
    let t0 = Instant::now();
    let solo = stream(c.clone(), long(1)).await;
    let solo_prefill = solo.arrivals[0] - t0;
    // 8 short streams that keep going, then the long prompt among them.
    let shorts: Vec<_> = (0..8)
        .map(|i| {
            let mut r = prompt_request(&counting_prompt(i), 400);
            r.speculation.as_mut().unwrap().enabled = Some(i % 2 == 0);
            tokio::spawn(stream_for(c.clone(), r, Duration::from_secs(60)))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = Instant::now();
    let mixed = stream(c.clone(), long(1)).await;
    let first = mixed.arrivals[0];
    assert_eq!(mixed.tokens, solo.tokens, "the long prompt's first token");
    let mut worst = Duration::ZERO;
    let mut during = 0;
    for (i, s) in shorts.into_iter().enumerate() {
        let s = s.await.unwrap();
        let times: Vec<Instant> = s
            .arrivals
            .iter()
            .copied()
            .filter(|&t| t >= sent && t <= first)
            .collect();
        assert!(
            times.len() >= 2,
            "short stream {i} produced {} chunks while the long prompt was prefilled",
            times.len()
        );
        during += times.len();
        // The longest silence of this stream across the prefill, edges included.
        let mut edges = vec![sent];
        edges.extend(&times);
        edges.push(first);
        for w in edges.windows(2) {
            worst = worst.max(w[1] - w[0]);
        }
    }
    eprintln!(
        "long prompt alone: {solo_prefill:?} to its first token; among 8 streams: {:?}; \
         {during} short-stream chunks meanwhile, longest gap {worst:?}",
        first - sent
    );
    assert!(
        worst < solo_prefill / 2,
        "a short stream stalled {worst:?} while a prompt whose prefill takes {solo_prefill:?} \
         alone ran: it was not prefilled in chunks"
    );
    cluster.expect_no_sessions(Duration::from_secs(10)).await;
}

/// Streams `r` for at most `limit`, then drops the stream (the client goes away).
async fn stream_for(c: Client, r: GenerateRequest, limit: Duration) -> Streamed {
    let mut out = Streamed {
        tokens: Vec::new(),
        arrivals: Vec::new(),
    };
    let _ = tokio::time::timeout(limit, async {
        let mut c = c;
        let mut st = c.stream_generate(r).await.expect("stream").into_inner();
        while let Some(ch) = st.next().await {
            let ch = ch.expect("chunk");
            if !ch.token_ids.is_empty() {
                out.arrivals.push(Instant::now());
            }
            out.tokens.extend_from_slice(&ch.token_ids);
        }
    })
    .await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_dropped_inside_a_batch_free_their_sessions_and_the_rest_go_on() {
    let cluster = batching_cluster(&[]);
    let c = cluster.client().await;
    let reqs: Vec<GenerateRequest> = (0..8)
        .map(|i| prompt_request(&counting_prompt(i), 160))
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(reference_tokens).collect();
    // Four streams are dropped after their first tokens, four run to the end.
    let spawn = |i: usize| {
        let (c, r) = (c.clone(), reqs[i].clone());
        tokio::spawn(async move {
            if i.is_multiple_of(2) {
                let mut c = c;
                let mut st = c.stream_generate(r).await.expect("stream").into_inner();
                let first = st.next().await.expect("a first chunk").expect("chunk");
                drop(st);
                first.token_ids
            } else {
                stream(c, r).await.tokens
            }
        })
    };
    let tasks: Vec<_> = (0..8).map(spawn).collect();
    let (mut dropped, mut running) = (Vec::new(), Vec::new());
    for (i, t) in tasks.into_iter().enumerate() {
        if i.is_multiple_of(2) {
            dropped.push(t.await.unwrap());
        } else {
            running.push(t);
        }
    }
    // The dropped streams' sessions leave the worker while the others still run.
    let t0 = Instant::now();
    loop {
        let (worker, _) = cluster.sessions().await;
        if worker <= 4 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{worker} sessions on the worker 3 s after four of eight streams were dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        running.iter().all(|t| !t.is_finished()),
        "the other streams ended before the check: it proves nothing"
    );
    for (k, got) in dropped.iter().enumerate() {
        let w = &want[2 * k];
        assert!(
            !got.is_empty() && w.starts_with(got),
            "stream {}'s first chunk",
            2 * k
        );
    }
    for (k, t) in running.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(
            got,
            want[2 * k + 1],
            "stream {}, which ran beside dropped ones",
            2 * k + 1
        );
    }
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}

/// Speculation by load through the cluster. With the choice on (these tests' harness turns it
/// off) and the random test head, whose trees gain nothing, greedy requests with automatic
/// trees decode plainly once the estimate is warm, say so in their statistics, and still equal
/// the engine; a request that asked for a fixed tree size speculates at every step anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_gives_way_to_plain_steps_where_it_does_not_pay() {
    let cluster = batching_cluster(&[("EAGLE_ALWAYS_SPECULATE", "false")]);
    let mut c = cluster.client().await;
    let mut load_plain = 0;
    // Until the means have seen enough steps to turn speculation off (at most 12 requests).
    for i in 0..12 {
        if i >= 6 && load_plain > 0 {
            break;
        }
        let r = prompt_request(&counting_prompt(i), 24);
        let got = c.generate(r.clone()).await.expect("generate").into_inner();
        assert_eq!(got.token_ids, reference_tokens(&r), "request {i}");
        let s = got.stats.unwrap();
        assert_eq!(s.fallback_steps, 0, "request {i}: the draft service is up");
        load_plain += s.load_plain_steps;
    }
    assert!(
        load_plain > 0,
        "the random head's trees never pay, yet no step was decoded plainly by load"
    );
    let mut r = prompt_request(&counting_prompt(7), 24);
    r.speculation.as_mut().unwrap().total_token = Some(8);
    let got = c.generate(r.clone()).await.expect("generate").into_inner();
    assert_eq!(got.token_ids, reference_tokens(&r));
    assert_eq!(
        got.stats.unwrap().load_plain_steps,
        0,
        "a fixed tree size is the caller's choice"
    );
    cluster.expect_no_sessions(Duration::from_secs(5)).await;
}
