//! An OTLP/gRPC trace receiver (the `opentelemetry-proto` crate's tonic trace service) that
//! keeps what it receives: for the telemetry test, and as `otlp_sink` (an example) for
//! measuring the cost of exporting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;

/// One received span, flattened: its process's resource and its own fields.
#[derive(Clone, Debug)]
pub struct Received {
    pub resource: HashMap<String, String>,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[derive(Default, Clone)]
pub struct Receiver {
    pub spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let resource = text(rs.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Received {
                        resource: resource.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attributes: text(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Stops a running receiver.
pub struct Stop {
    tx: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Stop {
    /// Stops accepting and waits for the server to end.
    pub async fn stop(self) {
        let _ = self.tx.send(());
        self.server.await.unwrap().unwrap();
    }
}

impl Receiver {
    /// Serves on `addr` (port 0: a free one) in the background; the endpoint URL to export to.
    pub async fn serve(&self, addr: &str) -> (String, Stop) {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self.clone()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                ),
        );
        (endpoint, Stop { tx, server })
    }
}
