//! The cluster gives exactly the in-process engine's tokens: at T = 0, `Generate`,
//! `StreamGenerate` (concatenated) and vanilla greedy decoding in-process agree token for token
//! on every prompt; at T > 0 a fixed seed reproduces itself through both calls.

use eagle_proto::v1::{FinishReason, GenerateRequest};
use eagle_tests::*;
use tokio_stream::StreamExt;

struct Outcome {
    text: String,
    tokens: Vec<u32>,
    finish: i32,
    generated: u32,
    steps: u32,
    fallback: u32,
}

async fn unary(
    c: &mut eagle_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    r: GenerateRequest,
) -> Outcome {
    let x = c.generate(r).await.expect("generate").into_inner();
    let (u, s) = (x.usage.unwrap(), x.stats.unwrap());
    Outcome {
        text: x.text,
        tokens: x.token_ids,
        finish: x.finish_reason,
        generated: u.generated_tokens,
        steps: s.steps,
        fallback: s.fallback_steps,
    }
}

async fn stream(
    c: &mut eagle_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    r: GenerateRequest,
) -> Outcome {
    let mut st = c.stream_generate(r).await.expect("stream").into_inner();
    let mut o = Outcome {
        text: String::new(),
        tokens: Vec::new(),
        finish: 0,
        generated: 0,
        steps: 0,
        fallback: 0,
    };
    let mut finals = 0;
    while let Some(ch) = st.next().await {
        let ch = ch.expect("chunk");
        o.text.push_str(&ch.text);
        o.tokens.extend_from_slice(&ch.token_ids);
        if let (Some(u), Some(s)) = (ch.usage, ch.stats) {
            finals += 1;
            o.finish = ch.finish_reason;
            o.generated = u.generated_tokens;
            o.steps = s.steps;
            o.fallback = s.fallback_steps;
        }
    }
    assert_eq!(finals, 1, "exactly one final chunk");
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generate_and_stream_equal_the_engine() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut c = cluster.client().await;
    let tok = &reference_engine().tokenizer;
    let mut accepted_any = false;
    for (i, p) in PROMPTS.iter().enumerate() {
        let req = if i % 2 == 0 {
            chat_request(p, 24)
        } else {
            prompt_request(p, 24)
        };
        let want = reference_tokens(&req);
        let u = unary(&mut c, req.clone()).await;
        let s = stream(&mut c, req.clone()).await;
        assert_eq!(
            u.tokens, want,
            "Generate differs from the engine on prompt {i} {p:?}"
        );
        assert_eq!(
            s.tokens, want,
            "StreamGenerate differs from the engine on prompt {i} {p:?}"
        );
        let text = tok.decode(&want).unwrap();
        assert_eq!(u.text, text, "prompt {i}: Generate's text");
        assert_eq!(s.text, text, "prompt {i}: the streamed text");
        assert_eq!(u.generated as usize, want.len());
        assert_eq!((u.finish, s.finish), (s.finish, u.finish));
        let expected = if want.len() == 24 {
            FinishReason::Length
        } else {
            FinishReason::Eos
        };
        assert_eq!(u.finish, expected as i32, "prompt {i}: finish reason");
        assert_eq!(u.fallback, 0, "prompt {i}: the draft service is up");
        assert!(u.steps >= 1 && u.steps as usize <= want.len() + 1);
        accepted_any |= (u.steps as usize) <= want.len();

        // Plain decoding through the cluster is the same text too.
        let mut plain = req.clone();
        plain.speculation.as_mut().unwrap().enabled = Some(false);
        if i % 6 == 0 {
            let v = unary(&mut c, plain).await;
            assert_eq!(v.tokens, want, "prompt {i}: speculation off");
            assert_eq!(v.steps as usize, want.len() + usize::from(want.len() < 24));
        }
    }
    assert!(
        accepted_any,
        "the random head never had a draft token accepted"
    );
    cluster
        .expect_no_sessions(std::time::Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_with_a_seed_reproduces_itself() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut c = cluster.client().await;
    let mut differs = false;
    for p in &PROMPTS[..3] {
        let mut req = chat_request(p, 24);
        let s = req.sampling.as_mut().unwrap();
        s.temperature = Some(0.9);
        s.top_p = Some(0.95);
        s.seed = 42;
        let a = unary(&mut c, req.clone()).await;
        let b = unary(&mut c, req.clone()).await;
        let st = stream(&mut c, req.clone()).await;
        assert_eq!(a.tokens, b.tokens, "same seed, same tokens ({p:?})");
        assert_eq!(
            a.tokens, st.tokens,
            "Generate and StreamGenerate agree ({p:?})"
        );
        req.sampling.as_mut().unwrap().seed = 43;
        differs |= unary(&mut c, req).await.tokens != a.tokens;
    }
    assert!(
        differs,
        "another seed changed nothing: sampling is not random"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text_and_end_the_generation() {
    let cluster = TestCluster::start(ClusterOpts::default());
    let mut c = cluster.client().await;
    let tok = &reference_engine().tokenizer;
    let req = chat_request("Name the planets of the solar system.", 48);
    let want = reference_tokens(&req);
    let full = tok.decode(&want).unwrap();
    // A stop string from the middle of the reference text.
    let words: Vec<&str> = full.split_whitespace().collect();
    let stop = words[words.len() / 2].to_string();
    let cut = full.find(&stop).unwrap();
    let mut r = req.clone();
    r.sampling.as_mut().unwrap().stop = vec![stop.clone(), "never appears ~~~".into()];
    let u = unary(&mut c, r.clone()).await;
    let s = stream(&mut c, r).await;
    assert_eq!(
        u.text,
        full[..cut],
        "text cut before the stop string {stop:?}"
    );
    assert_eq!(
        s.text, u.text,
        "the stream holds back what could start a stop string"
    );
    assert_eq!(u.finish, FinishReason::Stop as i32);
    assert_eq!(s.finish, FinishReason::Stop as i32);
    assert!(u.tokens.len() < want.len() && want.starts_with(&u.tokens));
    assert_eq!(u.tokens, s.tokens);
}

/// An EAGLE-3 head through the real services: the worker sends three layers' outputs
/// (`--draft-features eagle3`, 3H values per token), the draft service fuses them, and the
/// text is the engine's greedy text. A worker left sending the last features is refused by the
/// draft service (the feature width does not match the head), and the coordinator decodes
/// plainly: the text stays the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eagle3_head_serves_losslessly_and_a_mismatched_worker_falls_back() {
    for (features, fallback) in [(Some("eagle3"), false), (None, true)] {
        let cluster = TestCluster::start(ClusterOpts {
            head: Some(eagle3_head()),
            worker_args: features
                .map(|f| vec!["--draft-features".to_string(), f.to_string()])
                .unwrap_or_default(),
            ..ClusterOpts::default()
        });
        let mut c = cluster.client().await;
        for p in &PROMPTS[..3] {
            let req = chat_request(p, 24);
            let want = reference_tokens(&req);
            let u = unary(&mut c, req.clone()).await;
            assert_eq!(u.tokens, want, "EAGLE-3 head, features {features:?}, {p:?}");
            assert_eq!(
                u.fallback > 0,
                fallback,
                "features {features:?}: {} plain fallback steps",
                u.fallback
            );
            let s = stream(&mut c, req).await;
            assert_eq!(s.tokens, want);
        }
        cluster
            .expect_no_sessions(std::time::Duration::from_secs(5))
            .await;
    }
}
