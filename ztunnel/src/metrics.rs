//! Prometheus metrics served on :15020/metrics.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::capture::CaptureCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadStateLabels {
    pub state: String,
}

/// Connections handled by this tunnel, by how they ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: String,
    pub mode: String,
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub workloads: Family<WorkloadStateLabels, Gauge>,
    pub connections: Family<ConnectionLabels, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "ztunnel_config_reloads",
            "Configuration reloads, by result (applied, unchanged, invalid)",
            config_reloads.clone(),
        );
        let workloads = Family::<WorkloadStateLabels, Gauge>::default();
        registry.register(
            "ztunnel_workloads",
            "Local workloads by enrollment state (enrolled, not_ready)",
            workloads.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "ztunnel_connections",
            "Connections handled, by direction, mode and the reason they ended",
            connections.clone(),
        );
        Self { registry, config_reloads, workloads, connections }
    }

    /// Adds the capture programs' counters, read from the kernel at scrape time.
    pub fn register_capture(&mut self, counters: Arc<CaptureCounters>) {
        self.registry.register_collector(Box::new(CaptureCollector(counters)));
    }

    pub fn count_connection(&self, direction: &str, mode: &str, reason: &str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                direction: direction.to_owned(),
                mode: mode.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

struct CaptureCollector(Arc<CaptureCounters>);

impl fmt::Debug for CaptureCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaptureCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snapshot = self.0.snapshot();
        let mut family = encoder.encode_descriptor(
            "ztunnel_capture_events",
            "Capture decisions taken in the kernel, by event (captured, refused_not_ready, refused_map_full, ...)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, value) in snapshot {
            let counter = ConstCounter::new(value);
            counter.encode(family.encode_family(&EventLabels { event })?)?;
        }
        Ok(())
    }
}
