//! Metrics read at scrape time from state a service keeps anyway (live sessions, cache bytes,
//! a health flag), so nothing has to be updated on every change.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::with_registry;

type Read = Box<dyn Fn() -> f64 + Send + Sync>;

enum Kind {
    Gauge,
    Counter,
}

struct ReadAtScrape {
    name: String,
    help: String,
    kind: Kind,
    read: Read,
}

impl std::fmt::Debug for ReadAtScrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAtScrape")
            .field("name", &self.name)
            .finish()
    }
}

impl Collector for ReadAtScrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = (self.read)();
        match self.kind {
            Kind::Gauge => {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(
                    &self.name,
                    &self.help,
                    None,
                    g.metric_type(),
                )?)
            }
            Kind::Counter => {
                let c = ConstCounter::new(v);
                c.encode(encoder.encode_descriptor(
                    &self.name,
                    &self.help,
                    None,
                    c.metric_type(),
                )?)
            }
        }
    }
}

fn add(name: &str, help: &str, kind: Kind, read: Read) {
    let c = ReadAtScrape {
        name: name.into(),
        help: help.into(),
        kind,
        read,
    };
    with_registry(|r| r.register_collector(Box::new(c)));
}

/// A gauge whose value `read` gives at each scrape.
pub fn gauge_fn<T: Into<f64>>(
    name: &str,
    help: &str,
    read: impl Fn() -> T + Send + Sync + 'static,
) {
    add(name, help, Kind::Gauge, Box::new(move || read().into()));
}

/// A counter (`name` without `_total`) whose value `read` gives at each scrape; `read` must
/// never decrease.
pub fn counter_fn(name: &str, help: &str, read: impl Fn() -> u64 + Send + Sync + 'static) {
    add(name, help, Kind::Counter, Box::new(move || read() as f64));
}
