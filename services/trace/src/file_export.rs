//! A span exporter that appends JSON lines to a file: the trace without a collector, for
//! local runs and for the tests that check spans nest across processes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use opentelemetry::trace::SpanId;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

#[derive(Debug)]
pub struct FileExporter {
    file: Mutex<File>,
    service: &'static str,
}

impl FileExporter {
    pub fn open(path: &Path, service: &'static str) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(FileExporter {
            file: Mutex::new(file),
            service,
        })
    }
}

fn unix_ns(t: std::time::SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl SpanExporter for FileExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut out = String::new();
        for s in batch {
            let attrs: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|kv| (kv.key.to_string(), kv.value.to_string().into()))
                .collect();
            let parent =
                (s.parent_span_id != SpanId::INVALID).then(|| s.parent_span_id.to_string());
            let line = serde_json::json!({
                "service": self.service,
                "name": s.name,
                "trace_id": s.span_context.trace_id().to_string(),
                "span_id": s.span_context.span_id().to_string(),
                "parent_span_id": parent,
                "parent_is_remote": s.parent_span_is_remote,
                "start_unix_ns": unix_ns(s.start_time) as u64,
                "end_unix_ns": unix_ns(s.end_time) as u64,
                "attributes": attrs,
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        // One write per batch keeps lines whole when several processes share the file.
        let mut f = self.file.lock().expect("trace file lock");
        f.write_all(out.as_bytes())
            .map_err(|e| opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string()))
    }
}
