//! Mutual TLS between the services, and TLS on the public API.
//!
//! - Services started by hand with certificates from one CA (`eagle cluster certs`) serve the
//!   engine's tokens; an internal service refuses a client that presents no certificate, or one
//!   another CA signed; a coordinator holding another CA's certificate cannot use the worker.
//! - `eagle cluster up --tls --tp 3 --etcd local` (its three ranks joined by mutual TLS too,
//!   and every member talking to a local etcd that requires client certificates) serves `eagle
//!   client --tls-ca PATH` (its `ca PATH` line) the unsharded engine's tokens, and the HTTP API
//!   over HTTPS; a plain-text client gets nothing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use eagle_proto::common::Empty;
use eagle_proto::tls::{endpoint_with, trusting, Tls};
use eagle_proto::v1::generation_client::GenerationClient;
use eagle_proto::worker::worker_client::WorkerClient;
use eagle_tests::*;

/// A fresh CA and certificate in a temporary folder: (folder, files as flags, files read).
fn certs(name: &str) -> (PathBuf, Vec<String>, Tls) {
    let dir = std::env::temp_dir().join(format!("eagle-tls-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    succeed(
        Command::new(bin("eagle"))
            .args(["cluster", "certs", "--dir"])
            .arg(&dir),
    );
    let f = |n: &str| dir.join(n);
    let args = vec![
        "--tls-ca".into(),
        f("ca.pem").display().to_string(),
        "--tls-cert".into(),
        f("cert.pem").display().to_string(),
        "--tls-key".into(),
        f("key.pem").display().to_string(),
    ];
    let read = |n: &str| std::fs::read(f(n)).unwrap();
    let tls = Tls {
        ca: read("ca.pem"),
        cert: read("cert.pem"),
        key: read("key.pem"),
    };
    (dir, args, tls)
}

/// `Info` on the worker at `addr` through a client with `tls`.
async fn worker_info(addr: &str, tls: tonic::transport::ClientTlsConfig) -> Result<(), String> {
    let ep = endpoint_with(addr, Some(tls)).map_err(|e| e.to_string())?;
    let channel = ep.connect().await.map_err(|e| format!("{e:?}"))?;
    WorkerClient::new(channel)
        .info(Empty {})
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_verify_each_other_and_refuse_strangers() {
    let (dir_a, flags_a, tls_a) = certs("a");
    let (dir_b, flags_b, tls_b) = certs("b");
    let mut worker_args = base_args("127.0.0.1:0");
    worker_args.extend(flags_a.iter().cloned());
    let worker = Service::start("worker", &bin("eagle-worker"), &worker_args, &[]);
    let mut draft_args = base_args("127.0.0.1:0");
    draft_args.extend(["--head".into(), random_head().display().to_string()]);
    draft_args.extend(flags_a.iter().cloned());
    let draft = Service::start("draft", &bin("eagle-draft"), &draft_args, &[]);
    let mut coord_args = base_args("127.0.0.1:0");
    coord_args.extend(["--worker".into(), worker.addr.clone()]);
    coord_args.extend(["--draft".into(), draft.addr.clone()]);
    coord_args.extend(flags_a.iter().cloned());
    let coordinator = Service::start("coordinator", &bin("eagle-coordinator"), &coord_args, &[]);

    // The cluster serves over mutual TLS, speculation included, the engine's tokens.
    let req = chat_request("Name a colour.", 12);
    let want = tokio::task::block_in_place(|| reference_tokens(&req));
    let ep = endpoint_with(&coordinator.addr, Some(trusting(&tls_a.ca))).unwrap();
    let mut client = GenerationClient::new(ep.connect().await.unwrap());
    let got = client.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(got.token_ids, want);
    assert_eq!(
        got.stats.unwrap().fallback_steps,
        0,
        "the draft service was used"
    );

    // The public API does not take a client that trusts another CA, nor plain text.
    let wrong = endpoint_with(&coordinator.addr, Some(trusting(&tls_b.ca))).unwrap();
    assert!(
        wrong.connect().await.is_err(),
        "a client trusting CA b connected"
    );
    let plain = endpoint_with(&format!("http://{}", coordinator.addr), None).unwrap();
    match plain.connect().await {
        Err(_) => {}
        Ok(ch) => {
            let r = GenerationClient::new(ch).generate(req.clone()).await;
            assert!(r.is_err(), "a plain-text request was answered");
        }
    }

    // An internal service: the right certificate works; none, or another CA's, is refused.
    worker_info(&worker.addr, tls_a.client()).await.unwrap();
    let no_cert = worker_info(&worker.addr, trusting(&tls_a.ca)).await;
    assert!(
        no_cert.is_err(),
        "the worker served a client without a certificate"
    );
    let other = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&tls_a.ca))
        .identity(tonic::transport::Identity::from_pem(
            &tls_b.cert,
            &tls_b.key,
        ));
    let r = worker_info(&worker.addr, other).await;
    assert!(r.is_err(), "the worker served a certificate of another CA");

    // A coordinator holding CA b's certificate cannot use the worker: it gives up at start.
    let mut args = base_args("127.0.0.1:0");
    args.extend(["--worker".into(), worker.addr.clone()]);
    args.extend(["--startup-wait-s".into(), "3".into()]);
    args.extend(flags_b.iter().cloned());
    let mut stranger = KillOnDrop(
        Command::new(bin("eagle-coordinator"))
            .args(&args)
            .env("EAGLE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = stranger.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the stranger kept running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stranger.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("did not answer"), "{err}");

    drop((coordinator, draft, worker));
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

/// The stdout line of `up` that starts with `prefix`, read in order.
fn line_with(lines: &mut impl Iterator<Item = String>, prefix: &str) -> String {
    for l in lines.by_ref() {
        if let Some(rest) = l.strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
    panic!("eagle cluster up printed no `{prefix}` line");
}

#[test]
fn cluster_up_tls_serves_clients_that_trust_its_ca() {
    let mut up = KillOnDrop(
        cluster_up_command(&["--http-port", "0", "--tls", "--tp", "3", "--etcd", "local"])
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(up.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let addr = line_with(&mut lines, "ready ");
    let http = line_with(&mut lines, "http ");
    let ca = line_with(&mut lines, "ca ");
    std::thread::spawn(move || lines.for_each(drop));
    assert!(http.starts_with("https://"), "{http}");
    assert!(Path::new(&ca).exists());

    let client = |extra: &[&str]| {
        Command::new(bin("eagle"))
            .args(["client", "--addr", &addr, "--chat", "--json"])
            .args(["--max-new-tokens", "8", "--prompt", "Say hello."])
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = client(&["--tls-ca", &ca]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&ok.stdout).lines().last().unwrap()).unwrap();
    let want = reference_tokens(&chat_request("Say hello.", 8));
    let got: Vec<u32> = v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, want, "the TLS-joined group gives the engine's tokens");
    let plain = client(&[]);
    assert!(!plain.status.success(), "a plain-text client was answered");

    // The HTTP API over HTTPS, checked with curl trusting the CA (and refusing without it).
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(format!("{http}/health"))
            .output()
            .expect("curl")
    };
    let trusted = curl(&["--cacert", &ca]);
    assert_eq!(String::from_utf8_lossy(&trusted.stdout), "200");
    assert!(
        !curl(&[]).status.success(),
        "curl trusted the throwaway CA by default"
    );

    let pids = child_pids(up.id());
    let etcd = pids
        .iter()
        .map(|&p| cmdline(p))
        .find(|c| c.contains("--data-dir"))
        .expect("the local etcd");
    assert!(
        etcd.contains("--client-cert-auth") && etcd.contains("https://127.0.0.1"),
        "etcd serves over mutual TLS: {etcd}"
    );
    stop_cluster_up(&mut up, &pids);
    assert!(
        !Path::new(&ca).exists(),
        "the certificates outlived the cluster"
    );
}
