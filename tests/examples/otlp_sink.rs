//! `otlp_sink ADDR`: an OTLP/gRPC trace receiver that keeps nothing but a count, printing the
//! spans received every 10 s. Export runs against it when measuring what tracing costs
//! (README, "Observability"): `cargo run --release -p eagle-tests --example otlp_sink
//! 127.0.0.1:4317`.

use eagle_tests::otlp::Receiver;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into());
    let r = Receiver::default();
    let (endpoint, _stop) = r.serve(&addr).await;
    println!("receiving OTLP spans at {endpoint}");
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        let n = {
            let mut spans = r.spans.lock().unwrap();
            let n = spans.len();
            spans.clear();
            n
        };
        println!("{n} spans in the last 10 s");
    }
}
