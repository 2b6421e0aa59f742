//! Any bytes, decoded as each message a peer sends (a worker's verify and prefill requests, a
//! draft service's open and draft requests, the public GenerateRequest), then taken through
//! the wire conversions the services run on them: nothing may panic.
#![no_main]

use candle_core::Device;
use eagle_proto::{draft, v1, wire, worker};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const VOCAB: usize = 49_152;
const HIDDEN: usize = 576;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = worker::VerifyRequest::decode(data) {
        if let Some(t) = &v.tree {
            let _ = wire::tree_from_wire(t, VOCAB);
        }
    }
    if let Ok(p) = worker::PrefillRequest::decode(data) {
        let _ = wire::sampling_from_wire(p.sampling.as_ref());
    }
    if let Ok(o) = draft::OpenRequest::decode(data) {
        let _ = wire::sampling_from_wire(o.sampling.as_ref());
        let _ = wire::spec_from_wire(o.spec.as_ref());
        if let Some(f) = &o.features {
            let _ = wire::features_from_wire(f, HIDDEN, &Device::Cpu);
        }
    }
    if let Ok(d) = draft::DraftRequest::decode(data) {
        if let Some(f) = &d.commit_features {
            let _ = wire::features_from_wire(f, HIDDEN, &Device::Cpu);
        }
    }
    let _ = v1::GenerateRequest::decode(data);
});
