//! Series read when Prometheus scrapes rather than kept up to date: the
//! tunnel's own descriptors, resident memory and live tasks, and its HBONE
//! pool. Reading them costs nothing between scrapes.

use std::{
    fmt,
    sync::{Arc, OnceLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, gauge::ConstGauge},
};

/// Pooled HBONE connections and the streams they carry, right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub connections: u64,
    pub streams: u64,
}

type PoolReader = Box<dyn Fn() -> Option<PoolStats> + Send + Sync>;

/// Set once the runtime and the pool exist (after the metrics do).
#[derive(Clone, Default)]
pub struct ProcessCollector {
    runtime: Arc<OnceLock<tokio::runtime::Handle>>,
    pool: Arc<OnceLock<PoolReader>>,
}

impl fmt::Debug for ProcessCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProcessCollector")
    }
}

impl ProcessCollector {
    pub fn set_runtime(&self, handle: tokio::runtime::Handle) {
        let _ = self.runtime.set(handle);
    }

    /// `read` answers None once the pool is gone (shutdown).
    pub fn set_pool(&self, read: impl Fn() -> Option<PoolStats> + Send + Sync + 'static) {
        let _ = self.pool.set(Box::new(read));
    }
}

/// Descriptors open in this process. The directory listing's own descriptor
/// is among them, as in every Prometheus client's `process_open_fds`.
pub fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64)
}

/// Resident set size, from /proc/self/status (`VmRSS: <n> kB`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    let metric = ConstGauge::new(value as i64);
    let e = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    metric.encode(e)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // A /proc read that fails leaves its series out of this scrape
        // rather than reporting a made-up zero.
        if let Some(n) = open_fds() {
            gauge(&mut encoder, "process_open_fds", "Open file descriptors of the tunnel", n)?;
        }
        if let Some(n) = resident_bytes() {
            gauge(&mut encoder, "process_resident_memory_bytes", "Resident memory of the tunnel", n)?;
        }
        if let Some(rt) = self.runtime.get() {
            let n = rt.metrics().num_alive_tasks() as u64;
            gauge(&mut encoder, "ztunnel_tokio_alive_tasks", "Tasks alive in the data path's runtime", n)?;
        }
        if let Some(stats) = self.pool.get().and_then(|read| read()) {
            gauge(
                &mut encoder,
                "ztunnel_pool_connections",
                "Pooled outbound HBONE connections open (not retired)",
                stats.connections,
            )?;
            gauge(
                &mut encoder,
                "ztunnel_pool_streams",
                "CONNECT streams open on pooled outbound HBONE connections",
                stats.streams,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_proc_status() {
        let status = "Name:\tztunnel\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(5120 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
        assert!(open_fds().is_some_and(|n| n >= 3));
    }
}
