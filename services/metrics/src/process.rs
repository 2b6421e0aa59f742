//! The standard process metrics (the names every Prometheus client library uses), read from
//! `/proc/self` at each scrape: resident memory, CPU time, start time. On systems without
//! `/proc` they are left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub(crate) struct ProcessCollector;

struct Reading {
    resident_bytes: f64,
    cpu_seconds: f64,
    start_unix_seconds: f64,
}

fn read() -> Option<Reading> {
    // SAFETY: sysconf only reads configuration values.
    let (page, ticks) = unsafe {
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
        )
    };
    if page <= 0 || ticks <= 0 {
        return None;
    }
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    let (utime, stime, start) = (field(14)?, field(15)?, field(22)?);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse::<f64>()
        .ok()?;
    let ticks = ticks as f64;
    Some(Reading {
        resident_bytes: resident_pages * page as f64,
        cpu_seconds: (utime + stime) / ticks,
        start_unix_seconds: boot + start / ticks,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(r) = read() else {
            return Ok(());
        };
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                r.resident_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                r.start_unix_seconds,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let cpu = ConstCounter::new(r.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent, in seconds",
            None,
            cpu.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_this_process() {
        let r = super::read().expect("/proc is there on Linux");
        assert!(r.resident_bytes > 1e6, "{}", r.resident_bytes);
        assert!(r.cpu_seconds >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(r.start_unix_seconds <= now + 1.0 && r.start_unix_seconds > now - 86400.0 * 365.0);
    }
}
