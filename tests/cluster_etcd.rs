//! etcd membership end to end, against a real etcd server started by each test: members appear
//! and vanish with their leases (a killed worker within its TTL, a stopped one at once), new
//! sessions are balanced across groups and routed around a dead one, a multi-turn session's
//! next turn reuses its group's KV cache (prefilling only the new tokens) with the same tokens
//! as a fresh request, an etcd restart or stall under load fails no request, two ranks rendezvous,
//! `eagle cluster status --json` lists the members, `eagle cluster up --etcd local` starts
//! a cluster of two groups registered in an etcd of its own, and a tensor-parallel group
//! registers all its ranks and reuses a session's cache on every rank.

use std::time::{Duration, Instant};

use eagle_membership::{connect, rendezvous, EtcdConfig, EtcdHealth, MembershipView};
use eagle_proto::v1::generation_client::GenerationClient;
use eagle_proto::v1::GenerateRequest;
use eagle_tests::etcd::Etcd;
use eagle_tests::*;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const TTL_S: u64 = 2;

fn env(etcd: &Etcd, cluster: &str, group: Option<&str>, ttl_s: u64) -> Vec<(String, String)> {
    let mut v = vec![
        ("EAGLE_ETCD".to_string(), etcd.url.clone()),
        ("EAGLE_CLUSTER".to_string(), cluster.to_string()),
        ("EAGLE_ETCD_TTL_S".to_string(), ttl_s.to_string()),
    ];
    if let Some(g) = group {
        v.push(("EAGLE_GROUP".to_string(), g.to_string()));
    }
    v
}

fn start_worker(etcd: &Etcd, cluster: &str, group: &str) -> Service {
    Service::start(
        group,
        &bin("eagle-worker"),
        &base_args("127.0.0.1:0"),
        &env(etcd, cluster, Some(group), TTL_S),
    )
}

fn start_coordinator(etcd: &Etcd, cluster: &str) -> Service {
    let mut args = base_args("127.0.0.1:0");
    args.extend(["--route-wait-ms".to_string(), "3000".to_string()]);
    Service::start(
        "coordinator",
        &bin("eagle-coordinator"),
        &args,
        &env(etcd, cluster, None, TTL_S),
    )
}

async fn view(etcd: &Etcd, cluster: &str) -> MembershipView {
    let cfg = EtcdConfig::new(&etcd.url, cluster);
    let client = connect(&cfg).await.expect("connect to etcd");
    MembershipView::start(client, &cfg, EtcdHealth::default()).await
}

/// Polls `cond` every 50 ms; returns how long it took, or panics after `within`.
async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

async fn client(c: &Service) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{}", c.addr))
        .await
        .expect("connect to the coordinator")
}

fn prompt_ids(msgs: &[(&str, &str)]) -> Vec<u32> {
    let e = reference_engine();
    let m: Vec<_> = msgs
        .iter()
        .map(|(r, c)| eagle_engine::chat::Message::new(*r, *c))
        .collect();
    e.chat_prompt(&m).unwrap()
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ranks_rendezvous() {
    let etcd = Etcd::start();
    let cfg = EtcdConfig::new(&etcd.url, "rdv");
    let c = connect(&cfg).await.unwrap();
    let t = Duration::from_secs(10);
    let (c0, c1) = (c.clone(), c.clone());
    let r0 =
        tokio::spawn(async move { rendezvous(&c0, "rdv", "tp0", 0, 2, "10.0.0.1:7000", t).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r1 =
        tokio::spawn(async move { rendezvous(&c1, "rdv", "tp0", 1, 2, "10.0.0.2:7000", t).await });
    let want = vec!["10.0.0.1:7000".to_string(), "10.0.0.2:7000".to_string()];
    assert_eq!(
        r0.await.unwrap().unwrap(),
        want,
        "rank 0 sees both, in rank order"
    );
    assert_eq!(
        r1.await.unwrap().unwrap(),
        want,
        "rank 1 sees both, in rank order"
    );
    // A rank whose peers never come fails at its deadline instead of waiting forever.
    let t0 = Instant::now();
    let e = rendezvous(&c, "rdv", "tp1", 0, 3, "a", Duration::from_millis(800)).await;
    assert!(e.is_err(), "an incomplete group must not rendezvous");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_leases_kv_placement_and_failover() {
    let etcd = Etcd::start();
    let cl = "t1";
    let (g0, g1) = std::thread::scope(|s| {
        let a = s.spawn(|| start_worker(&etcd, cl, "g0"));
        let b = s.spawn(|| start_worker(&etcd, cl, "g1"));
        (a.join().unwrap(), b.join().unwrap())
    });
    // The draft service's lease is long, so only a revocation can remove it quickly.
    let mut draft = start_draft("127.0.0.1:0", &env(&etcd, cl, Some("d0"), 30));
    let coord = start_coordinator(&etcd, cl);
    let v = std::sync::Arc::new(view(&etcd, cl).await);

    // Members appear, with their process ids.
    wait_for(
        "two groups and a draft service",
        Duration::from_secs(10),
        || v.groups(Some(MODEL_NAME)).len() == 2 && v.drafts(MODEL_NAME).len() == 1,
    )
    .await;
    let pids: Vec<u32> = v.members().iter().map(|m| m.rec.pid).collect();
    for s in [&g0, &g1, &draft] {
        assert!(pids.contains(&(s.pid() as u32)), "{} is registered", s.name);
    }
    let out = succeed(std::process::Command::new(bin("eagle")).args([
        "cluster",
        "status",
        "--etcd",
        &etcd.url,
        "--cluster",
        cl,
        "--json",
    ]));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<u64> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(listed.len(), 3, "{st}");
    assert!(listed.contains(&(g0.pid() as u64)) && listed.contains(&(g1.pid() as u64)));
    assert_eq!(st["groups"].as_array().unwrap().len(), 2, "{st}");

    // Two sessions at once go to different groups: b is streaming a long answer while a is
    // placed (started together, a short b could end before a is routed on a busy machine).
    let mut c = client(&coord).await;
    let q1 = "Name three colours.";
    let mut b = prompt_request("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", 160);
    b.session_id = "b".into();
    let mut busy = c.stream_generate(b).await.unwrap().into_inner();
    busy.next().await.expect("a chunk").expect("no error");
    let ra = c
        .generate(chat_turn(&[("user", q1)], "a", 24))
        .await
        .unwrap()
        .into_inner();
    // b's placement is recorded when its turn ends.
    while let Some(chunk) = busy.next().await {
        chunk.expect("b streams to its end");
    }
    wait_for("both placements in etcd", Duration::from_secs(5), || {
        v.placement("a").is_some() && v.placement("b").is_some()
    })
    .await;
    let home = v.placement("a").unwrap().group;
    assert_ne!(
        home,
        v.placement("b").unwrap().group,
        "balanced across groups"
    );

    // Later turns of session a go back to its group and prefill only the new tokens, with the
    // tokens of a fresh request.
    let mut conv: Vec<(String, String)> = vec![("user".into(), q1.into())];
    // What the worker's cache surely holds: the prompt and every generated token but the
    // last (the last chosen token is run only by the next step).
    let mut cache: Vec<u32> = prompt_ids(&[("user", q1)]);
    cache.extend_from_slice(&ra.token_ids[..ra.token_ids.len() - 1]);
    conv.push(("assistant".into(), ra.text.clone()));
    let (mut saved, mut total) = (0u32, ra.usage.unwrap().prompt_tokens);
    for q in ["And three more?", "Which is warmest?", "Why?"] {
        conv.push(("user".into(), q.into()));
        let msgs: Vec<(&str, &str)> = conv.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let req = chat_turn(&msgs, "a", 24);
        let r = c.generate(req.clone()).await.unwrap().into_inner();
        let stats = r.stats.unwrap();
        let prompt = prompt_ids(&msgs);
        let lcp = common_prefix(&prompt, &cache) as u32;
        assert!(
            stats.cached_prompt_tokens >= lcp && lcp > 0,
            "turn {}: {} cached, {lcp} known to match",
            conv.len() / 2,
            stats.cached_prompt_tokens
        );
        assert!(stats.cached_prompt_tokens < prompt.len() as u32);
        assert_eq!(
            r.token_ids,
            reference_tokens(&req),
            "same tokens as a fresh request"
        );
        saved += stats.cached_prompt_tokens;
        total += r.usage.unwrap().prompt_tokens;
        cache = prompt;
        cache.extend_from_slice(&r.token_ids[..r.token_ids.len() - 1]);
        conv.push(("assistant".into(), r.text));
        assert_eq!(v.placement("a").map(|p| p.group), Some(home.clone()));
    }
    println!(
        "MEASURE kv placement: 4 turns, {saved} of {total} prompt tokens reused from the cache"
    );

    // A request in flight on a group that dies fails with UNAVAILABLE; it does not hang.
    conv.push(("user".into(), "Tell me a very long story.".into()));
    let msgs: Vec<(&str, &str)> = conv.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    let mut stream = c
        .stream_generate(chat_turn(&msgs, "a", 400))
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let (mut dead, live) = if home == "g0" { (g0, g1) } else { (g1, g0) };
    dead.kill();
    let killed = Instant::now();
    // When the dead group leaves the view (its lease expires).
    let gone = {
        let v = v.clone();
        tokio::spawn(async move {
            while v.groups(Some(MODEL_NAME)).len() != 1 {
                assert!(
                    killed.elapsed() < Duration::from_secs(TTL_S + 8),
                    "the dead group stays"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            killed.elapsed()
        })
    };
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the in-flight request ends promptly");
    assert_eq!(end.map(|e| e.code()), Some(Code::Unavailable));

    // The session's next turn succeeds on the surviving group, from scratch, same tokens.
    conv.pop();
    conv.push(("user".into(), "Summarise our chat.".into()));
    let msgs: Vec<(&str, &str)> = conv.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
    let req = chat_turn(&msgs, "a", 24);
    let t0 = Instant::now();
    let r = c.generate(req.clone()).await.unwrap().into_inner();
    let (started, turn) = (t0.duration_since(killed), t0.elapsed());
    assert_eq!(r.token_ids, reference_tokens(&req));
    assert_eq!(
        r.stats.unwrap().cached_prompt_tokens,
        0,
        "re-prefilled elsewhere"
    );
    let gone = gone.await.unwrap();
    assert_eq!(v.groups(Some(MODEL_NAME))[0].name, live.name);
    println!(
        "MEASURE failover: a turn sent {:.0} ms after the kill -9 succeeded on the other group \
         (in {:.0} ms, 24 tokens, first prefill refused then restarted); the dead member left \
         the etcd view {:.0} ms after the kill (lease TTL {TTL_S} s)",
        started.as_secs_f64() * 1e3,
        turn.as_secs_f64() * 1e3,
        gone.as_secs_f64() * 1e3
    );
    for p in &PROMPTS[..2] {
        let req = chat_request(p, 12);
        let r = c.generate(req.clone()).await.unwrap().into_inner();
        assert_eq!(r.token_ids, reference_tokens(&req));
    }

    // A service that stops gracefully leaves at once (its lease is 30 s).
    let t0 = Instant::now();
    assert!(draft.terminate(Duration::from_secs(10)));
    wait_for("the draft service leaves", Duration::from_secs(3), || {
        v.drafts(MODEL_NAME).is_empty()
    })
    .await;
    let t = t0.elapsed();
    println!(
        "MEASURE graceful leave: the draft service's member vanished {:.0} ms after SIGTERM",
        t.as_secs_f64() * 1e3
    );
    let req = chat_request(PROMPTS[2], 12);
    let r = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        r.token_ids,
        reference_tokens(&req),
        "plain decoding without a draft"
    );
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_restart_or_stall_under_load_fails_no_request() {
    let mut etcd = Etcd::start();
    let cl = "t2";
    // Short session lifetimes, to see a KV placement expire with its cache at the end.
    let short = ("EAGLE_IDLE_TIMEOUT_S".to_string(), "2".to_string());
    let mut wenv = env(&etcd, cl, Some("g0"), TTL_S);
    wenv.push(short.clone());
    let w = Service::start("g0", &bin("eagle-worker"), &base_args("127.0.0.1:0"), &wenv);
    let mut cenv = env(&etcd, cl, None, TTL_S);
    cenv.push(("EAGLE_SESSION_TTL_S".to_string(), "2".to_string()));
    let coord = Service::start(
        "coordinator",
        &bin("eagle-coordinator"),
        &base_args("127.0.0.1:0"),
        &cenv,
    );
    let c = client(&coord).await;
    let req = chat_request(PROMPTS[0], 8);
    let want = reference_tokens(&req);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (mut c, req, stop) = (c.clone(), req.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.generate(req.clone()).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().token_ids, want);
                        ok += 1;
                    }
                    Err(e) => failed.push(format!("{:?}: {}", e.code(), e.message())),
                }
            }
            (ok, failed)
        })
    };
    let chan = tonic::transport::Endpoint::from_shared(format!("http://{}", coord.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(chan);
    let etcd_status = |h: &mut tonic_health::pb::health_client::HealthClient<Channel>| {
        let mut h = h.clone();
        async move {
            h.check(tonic_health::pb::HealthCheckRequest {
                service: eagle_membership::ETCD_HEALTH_SERVICE.into(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
        }
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(etcd_status(&mut health).await, serving);

    // etcd goes away for longer than the lease TTL, then comes back.
    etcd.kill();
    let t0 = Instant::now();
    while etcd_status(&mut health).await != not_serving {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "health shows the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(TTL_S + 1)).await;
    etcd.restart();
    let t0 = Instant::now();
    while etcd_status(&mut health).await != serving {
        assert!(t0.elapsed() < Duration::from_secs(20), "health recovers");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Membership recovers: the worker is registered again.
    let v = view(&etcd, cl).await;
    wait_for(
        "the worker registered again",
        Duration::from_secs(10),
        || v.groups(Some(MODEL_NAME)).len() == 1,
    )
    .await;
    assert_eq!(v.members()[0].rec.pid, w.pid() as u32);
    tokio::time::sleep(Duration::from_secs(TTL_S + 1)).await;
    assert_eq!(
        v.groups(Some(MODEL_NAME)).len(),
        1,
        "still there after the old lease's TTL"
    );

    // etcd stalls (SIGSTOP: connections stay open, nothing answers) past the lease TTL.
    etcd.pause();
    let t0 = Instant::now();
    while etcd_status(&mut health).await != not_serving {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "health shows the stall"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "MEASURE a stalled etcd shows in health after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(TTL_S + 1)).await;
    etcd.resume();
    let t0 = Instant::now();
    while etcd_status(&mut health).await != serving {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "health recovers after the stall"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        "the worker registered after the stall",
        Duration::from_secs(10),
        || v.groups(Some(MODEL_NAME)).len() == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert!(ok >= 5, "only {ok} requests ran");

    // A session's placement expires with its cache (both after 2 s idle). Read from etcd's
    // history (a watch from the revision before the request), so the check sees the put and
    // the lease's delete however briefly the record lived on a loaded machine.
    let cfg = EtcdConfig::new(&etcd.url, cl);
    let mut ec = connect(&cfg).await.expect("connect to etcd");
    let key = cfg.keys().placement("x");
    let before = ec
        .get(key.clone(), None)
        .await
        .expect("read the placement key")
        .header()
        .expect("a response header")
        .revision();
    let r = c
        .clone()
        .generate(GenerateRequest {
            session_id: "x".into(),
            ..req.clone()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().token_ids, reference_tokens(&req));
    let answered = Instant::now();
    let mut events = ec
        .watch(
            key,
            Some(etcd_client::WatchOptions::new().with_start_revision(before + 1)),
        )
        .await
        .expect("watch the placement key");
    let (mut put, mut deleted) = (false, false);
    while !deleted {
        let msg = tokio::time::timeout(Duration::from_secs(15), events.message())
            .await
            .expect("the placement is put, then deleted by its lease, within 15 s")
            .expect("the watch stream")
            .expect("the watch stays open");
        for ev in msg.events() {
            match ev.event_type() {
                etcd_client::EventType::Put => put = true,
                etcd_client::EventType::Delete => {
                    assert!(put, "the placement was deleted before it was put");
                    deleted = true;
                }
            }
        }
    }
    println!(
        "MEASURE the placement expired {:.1} s after the answer",
        answered.elapsed().as_secs_f64()
    );
    let mut wc =
        eagle_proto::worker::worker_client::WorkerClient::connect(format!("http://{}", w.addr))
            .await
            .unwrap();
    let t0 = Instant::now();
    while wc
        .info(eagle_proto::common::Empty {})
        .await
        .unwrap()
        .into_inner()
        .active_sessions
        != 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the worker reclaims the cache"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn cluster_up_with_a_local_etcd_and_status() {
    use std::process::Command;
    let (mut up, addrs, url) =
        cluster_up_local_etcd(&["--groups", "2", "--cluster", "up1", "--no-http"], 1);
    let addr = addrs[0].clone();

    succeed(
        Command::new(bin("eagle"))
            .args([
                "client",
                "--addr",
                &addr,
                "--chat",
                "--json",
                "--max-new-tokens",
                "8",
            ])
            .args(["--session-id", "s1", "--prompt", "Hello!"]),
    );

    let t0 = Instant::now();
    let st = loop {
        let out = succeed(Command::new(bin("eagle")).args([
            "cluster",
            "status",
            "--etcd",
            &url,
            "--cluster",
            "up1",
            "--json",
        ]));
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if !st["placements"].as_array().unwrap().is_empty() || t0.elapsed() > Duration::from_secs(5)
        {
            break st;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        st["members"].as_array().unwrap().len(),
        3,
        "two workers and a draft: {st}"
    );
    assert_eq!(st["groups"].as_array().unwrap().len(), 2, "{st}");
    let p = &st["placements"].as_array().unwrap()[0];
    assert_eq!(p["session"], "s1", "{st}");
    assert!(p["cached_tokens"].as_u64().unwrap() > 0, "{st}");

    stop_cluster_up(&mut up, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp_ranks_rendezvous_through_etcd_and_serve_as_one_group() {
    let etcd = Etcd::start();
    let cl = "tp";
    let e = env(&etcd, cl, Some("gtp"), TTL_S);
    // Ranks 1 and 2 started by hand with no address for rank 0: they find it in etcd.
    let mut ranks: Vec<std::process::Child> = (1..3)
        .map(|r| {
            let mut cmd = std::process::Command::new(bin("eagle-worker"));
            cmd.args(base_args("127.0.0.1:0"))
                .args(["--tp", "3", "--tp-rank", &r.to_string()])
                .env("EAGLE_LOG", "warn")
                .stdout(std::process::Stdio::null());
            for (k, v) in &e {
                cmd.env(k, v);
            }
            cmd.spawn().unwrap()
        })
        .collect();
    let mut args = base_args("127.0.0.1:0");
    args.extend(["--tp", "3", "--tp-no-spawn"].map(String::from));
    let _rank0 = Service::start("rank 0", &bin("eagle-worker"), &args, &e);
    let _draft = start_draft("127.0.0.1:0", &env(&etcd, cl, Some("d0"), TTL_S));
    let coord = start_coordinator(&etcd, cl);
    let v = view(&etcd, cl).await;
    wait_for(
        "a complete group of three ranks",
        Duration::from_secs(10),
        || {
            v.groups(Some(MODEL_NAME))
                .iter()
                .any(|g| g.tp == 3 && g.ranks.len() == 3)
        },
    )
    .await;
    let mut c = client(&coord).await;
    let req = chat_turn(&[("user", "What is the capital of France?")], "", 24);
    let r = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        r.token_ids,
        reference_tokens(&req),
        "through the TP 3 group"
    );

    // A rank dies: rank 0's heartbeat notices and it leaves etcd at once, so the group is gone
    // from the membership before the dead rank's lease would lapse.
    ranks[1].kill().unwrap();
    let took = wait_for(
        "the broken group leaves",
        Duration::from_millis(1500),
        || v.groups(Some(MODEL_NAME)).is_empty(),
    )
    .await;
    eprintln!("rank killed -> group out of the membership in {took:?}");
    let e = c.generate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    for mut r in ranks {
        let _ = r.kill();
        let _ = r.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tp_group_registers_every_rank_and_reuses_its_cache() {
    let etcd = Etcd::start();
    let cl = "tp";
    let mut args = base_args("127.0.0.1:0");
    args.extend(["--tp".to_string(), "3".to_string()]);
    let _w = Service::start(
        "tp3",
        &bin("eagle-worker"),
        &args,
        &env(&etcd, cl, None, TTL_S),
    );
    let _d = start_draft("127.0.0.1:0", &env(&etcd, cl, Some("d0"), TTL_S));
    let coord = start_coordinator(&etcd, cl);
    let v = view(&etcd, cl).await;
    wait_for(
        "a complete group of three ranks",
        Duration::from_secs(10),
        || {
            v.groups(Some(MODEL_NAME))
                .iter()
                .any(|g| g.tp == 3 && g.ranks.len() == 3)
        },
    )
    .await;

    // A later turn reuses the cache on every rank and gives a fresh request's tokens.
    let mut c = client(&coord).await;
    let q = "Name three colours.";
    let r1 = c
        .generate(chat_turn(&[("user", q)], "t", 16))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r1.token_ids,
        reference_tokens(&chat_turn(&[("user", q)], "", 16))
    );
    let msgs = [
        ("user", q),
        ("assistant", r1.text.as_str()),
        ("user", "And three more?"),
    ];
    let req = chat_turn(&msgs, "t", 16);
    let r2 = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(r2.token_ids, reference_tokens(&req));
    let cached = r2.stats.unwrap().cached_prompt_tokens;
    assert!(cached >= r1.usage.unwrap().prompt_tokens, "{cached} cached");
}

/// Workers publish their prefix cache summaries in etcd, and a coordinator that never saw the
/// earlier requests (a second one, or one restarted) routes by them: a prompt whose prefix a
/// busy group holds goes there rather than to an idle group, and reuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_routes_by_the_prefixes_workers_publish() {
    let etcd = Etcd::start();
    let cluster = "prefixes";
    let _g1 = start_worker(&etcd, cluster, "g1");
    let _g2 = start_worker(&etcd, cluster, "g2");
    let v = view(&etcd, cluster).await;
    wait_for("two groups", Duration::from_secs(60), || {
        v.groups(None).len() == 2
    })
    .await;
    let first = start_coordinator(&etcd, cluster);
    let mut c1 = client(&first).await;
    let system = "You are the reference desk of a public library. ".repeat(40);
    let ask = |q: &str| {
        let mut r = chat_turn(&[("system", system.as_str()), ("user", q)], "", 8);
        r.speculation.as_mut().unwrap().enabled = Some(false);
        r
    };
    // In a session, so that the busy request below reaches the same group whatever the
    // groups' loads in etcd say by then.
    let mut first_turn = ask("Where are the atlases?");
    first_turn.session_id = "desk".into();
    let out = c1.generate(first_turn).await.unwrap();
    assert_eq!(out.into_inner().usage.unwrap().cached_prompt_tokens, 0);
    // The group that answered publishes the prompt's blocks.
    let holder = || {
        v.groups(None)
            .into_iter()
            .find(|g| !g.ranks[0].rec.prefixes.is_empty())
            .map(|g| g.name)
    };
    wait_for(
        "a published prefix summary",
        Duration::from_secs(10),
        || holder().is_some(),
    )
    .await;
    let holder = holder().unwrap();
    // Keep the holder busy with a long answer through the first coordinator.
    let mut busy = prompt_request("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", 600);
    busy.speculation.as_mut().unwrap().enabled = Some(false);
    busy.session_id = "desk".into();
    let mut stream = c1.stream_generate(busy).await.unwrap().into_inner();
    let _ = stream.next().await.expect("a chunk").expect("no error");
    wait_for("the holder's load in etcd", Duration::from_secs(10), || {
        v.groups(None)
            .iter()
            .any(|g| g.name == holder && g.load.active_sessions > 0)
    })
    .await;
    // A second coordinator has seen none of it, and still finds the prefix.
    let second = start_coordinator(&etcd, cluster);
    let mut c2 = client(&second).await;
    let r = ask("Where are the newspapers?");
    let out = c2.generate(r.clone()).await.unwrap().into_inner();
    let cached = out.usage.unwrap().cached_prompt_tokens;
    assert!(
        cached >= 320,
        "routed to {holder}, which holds the prefix: {cached} cached"
    );
    assert_eq!(out.token_ids, reference_tokens(&r));
    drop(stream);
}

/// `eagle cluster up --etcd local --groups 2 --coordinators 2`: a 4-turn conversation whose
/// turns alternate between the two coordinators reaches its KV on every later turn, with a
/// session id (its placement in etcd) and without one (the prefix cache and the prefixes the
/// workers publish); a session busy on one coordinator is refused by the other (`ABORTED`);
/// after the group holding the session is killed, the next turn succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_alternating_between_two_coordinators_reach_their_kv() {
    let (mut up, addrs, url) = cluster_up_local_etcd(
        &[
            "--groups",
            "2",
            "--coordinators",
            "2",
            "--cluster",
            "two",
            "--no-http",
            "--no-metrics",
        ],
        2,
    );
    assert_ne!(addrs[0], addrs[1]);
    let cfg = EtcdConfig::new(&url, "two");
    let v = MembershipView::start(
        connect(&cfg).await.expect("etcd"),
        &cfg,
        EtcdHealth::default(),
    )
    .await;
    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(
            GenerationClient::connect(format!("http://{a}"))
                .await
                .unwrap(),
        );
    }
    let system = "You answer questions about a city's museums, briefly. ".repeat(12);
    for session in ["conv", ""] {
        let mut msgs: Vec<(String, String)> = vec![("system".into(), system.clone())];
        for turn in 0..4 {
            // What the other coordinator learns goes through etcd: the session's placement,
            // or the blocks the worker publishes. A client's next turn comes after a moment;
            // here, after etcd has it.
            if turn > 0 {
                let m: Vec<(&str, &str)> =
                    msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
                if session.is_empty() {
                    let first = eagle_proto::prefix::block_keys(&prompt_ids(&m))[0];
                    wait_for("the published prefix", Duration::from_secs(10), || {
                        v.groups(None).iter().any(|g| {
                            eagle_proto::prefix::unpack(&g.ranks[0].rec.prefixes).contains(&first)
                        })
                    })
                    .await;
                } else {
                    wait_placement(&v, session).await;
                }
            }
            msgs.push((
                "user".into(),
                format!("Question {turn}: which museum opens first?"),
            ));
            let m: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            let out = clients[turn % 2]
                .generate(chat_turn(&m, session, 12))
                .await
                .unwrap_or_else(|e| panic!("turn {turn} of {session:?}: {e}"))
                .into_inner();
            let cached = out.usage.unwrap().cached_prompt_tokens;
            if turn > 0 {
                assert!(cached > 0, "turn {turn} of {session:?} reused nothing");
            }
            msgs.push(("assistant".into(), out.text));
        }
    }
    // Two coordinators never run one session's turns at once: the second is refused.
    let mut long = chat_turn(
        &[("user", "Count from 1 to 300, one number a line.")],
        "lock",
        400,
    );
    long.speculation.as_mut().unwrap().enabled = Some(false);
    let mut running = clients[0].stream_generate(long).await.unwrap().into_inner();
    let _ = running.next().await.expect("a chunk").expect("no error");
    let refused = clients[1]
        .generate(chat_turn(&[("user", "Hello?")], "lock", 4))
        .await
        .expect_err("a second coordinator must refuse a busy session");
    assert_eq!(refused.code(), Code::Aborted, "{refused}");
    drop(running);

    // Kill the group that holds the session; its next turn succeeds all the same.
    let holder = wait_placement(&v, "conv").await;
    let pid = v
        .members()
        .into_iter()
        .find(|m| m.rec.group == holder && m.rec.rank == 0)
        .expect("the holder's record")
        .rec
        .pid;
    // SAFETY: a signal to a process this test's cluster started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = clients[0]
        .generate(chat_turn(&[("user", "And after the museum?")], "conv", 8))
        .await
        .expect("the next turn after the holder died");
    assert!(!out.into_inner().token_ids.is_empty());
    stop_cluster_up(&mut up, &[]);
}

/// `eagle cluster up --etcd local ARGS`, its stderr passed through: the process, the addresses
/// of its first `coordinators` `ready` lines, and the local etcd's URL.
fn cluster_up_local_etcd(args: &[&str], coordinators: usize) -> (KillOnDrop, Vec<String>, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut all = vec!["--etcd", "local"];
    all.extend(args);
    let mut up = KillOnDrop(
        cluster_up_command(&all)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = up.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(u) = line.strip_prefix("started a local etcd at ") {
                let _ = tx.send(u.trim().to_string());
            }
            eprintln!("{line}");
        }
    });
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let addrs = (0..coordinators)
        .map(|_| {
            let l = lines.next().expect("a line").unwrap();
            l.strip_prefix("ready ")
                .unwrap_or_else(|| panic!("expected `ready ADDR`, got {l:?}"))
                .to_string()
        })
        .collect();
    let url = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the local etcd's address");
    (up, addrs, url)
}

/// The group etcd records for `session`'s KV, once it is there.
async fn wait_placement(v: &MembershipView, session: &str) -> String {
    let t0 = Instant::now();
    loop {
        if let Some(p) = v.placement(session) {
            return p.group;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no placement for {session}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
