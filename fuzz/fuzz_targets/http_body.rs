//! Any bytes as an HTTP API body, for both endpoints: parsing and the mapping to a gRPC
//! request either succeed or give a 4xx error; nothing may panic.
#![no_main]

use eagle_coordinator::http::openai::{parse, Endpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse(data) {
        for ep in [Endpoint::Chat, Endpoint::Completions] {
            if let Err(e) = r.to_grpc(ep, "m") {
                assert!(e.status.is_client_error(), "{}", e.status);
            }
        }
    }
});
