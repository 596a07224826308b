//! Prometheus metrics served on :15020/metrics.

use std::{fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::capture::CaptureCounters;

pub mod process;
pub mod tcp;
pub mod text;

pub use self::{
    process::{PoolStats, ProcessCollector},
    tcp::TcpLabels,
};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub direction: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: String,
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub policy_decisions: Family<DecisionLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub config_reloads: Family<ResultLabels, Counter>,
    pub workloads: Family<WorkloadStateLabels, Gauge>,
    pub connections: Family<ConnectionLabels, Counter>,
    pub certificate_expiry: Family<IdentityLabels, Gauge>,
    pub certificate_renewals: Family<ResultLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Access log lines lost because the writer could not keep up.
    pub access_log_dropped: Counter,
    pub limit_refusals: Family<LimitLabels, Counter>,
    /// 1 while `/healthz/ready` answers 200.
    pub ready: Gauge,
    /// Descriptors, memory, tasks and the HBONE pool, read at scrape time.
    pub process: ProcessCollector,
    capture: CaptureCollector,
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
            "Configuration reloads, by result (applied, invalid)",
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
        let certificate_expiry = Family::<IdentityLabels, Gauge>::default();
        registry.register(
            "ztunnel_certificate_expiry_timestamp_seconds",
            "When each identity's current certificate expires (Unix time)",
            certificate_expiry.clone(),
        );
        let certificate_renewals = Family::<ResultLabels, Counter>::default();
        registry.register(
            "ztunnel_certificate_renewals",
            "Certificate requests to the CA, by result (success, error)",
            certificate_renewals.clone(),
        );
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "ztunnel_handshake_failures",
            "Failed mTLS handshakes, by direction and reason (expired, not_yet_valid, unknown_ca, wrong_identity, ...)",
            handshake_failures.clone(),
        );
        let capture = CaptureCollector::default();
        registry.register_collector(Box::new(capture.clone()));
        let process = ProcessCollector::default();
        registry.register_collector(Box::new(process.clone()));
        let ready = Gauge::default();
        registry.register(
            "ztunnel_ready",
            "1 while the tunnel is ready (/healthz/ready answers 200)",
            ready.clone(),
        );
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Connections opened (counted when carrying starts)",
            tcp_opened.clone(),
        );
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_closed",
            "Connections closed, with the labels they opened with",
            tcp_closed.clone(),
        );
        let tcp_sent_bytes = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent back to the caller (destination to source), counted while the connection runs",
            tcp_sent_bytes.clone(),
        );
        let tcp_received_bytes = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the caller (source to destination), counted while the connection runs",
            tcp_received_bytes.clone(),
        );
        let policy_decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "ztunnel_policy_decisions",
            "Authorization decisions, by decision (allow, deny, would_deny) and reason",
            policy_decisions.clone(),
        );
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "ztunnel_limit_refusals",
            "Connections refused by a limit (limit_total, limit_workload, limit_fair_share, limit_handshakes_per_source, ...)",
            limit_refusals.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "ztunnel_access_log_dropped",
            "Access log lines dropped because the log could not be written fast enough",
            access_log_dropped.clone(),
        );
        // Series the alerts read with increase() exist from the start, at 0:
        // one born at 1 would hide its first event from increase().
        for result in ["applied", "invalid"] {
            let _ = config_reloads.get_or_create(&ResultLabels { result: result.to_owned() });
        }
        for result in ["success", "error"] {
            let _ = certificate_renewals.get_or_create(&ResultLabels { result: result.to_owned() });
        }
        for limit in crate::limits::LimitExceeded::ALL {
            let _ = limit_refusals.get_or_create(&LimitLabels { limit: limit.reason() });
        }
        Self {
            ready,
            process,
            access_log_dropped,
            limit_refusals,
            policy_decisions,
            capture,
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent_bytes,
            tcp_received_bytes,
            config_reloads,
            workloads,
            connections,
            certificate_expiry,
            certificate_renewals,
            handshake_failures,
        }
    }

    pub fn certificate_issued(&self, identity: &str, not_after: std::time::SystemTime) {
        let secs = not_after.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        self.certificate_expiry.get_or_create(&IdentityLabels { identity: identity.to_owned() }).set(secs);
        self.certificate_renewals.get_or_create(&ResultLabels { result: "success".to_owned() }).inc();
    }

    pub fn certificate_failed(&self) {
        self.certificate_renewals.get_or_create(&ResultLabels { result: "error".to_owned() }).inc();
    }

    pub fn forget_certificate(&self, identity: &str) {
        self.certificate_expiry.remove(&IdentityLabels { identity: identity.to_owned() });
    }

    pub fn limit_refused(&self, limit: crate::limits::LimitExceeded) {
        self.limit_refusals.get_or_create(&LimitLabels { limit: limit.reason() }).inc();
    }

    pub fn policy_decided(&self, decision: &str, reason: &str) {
        self.policy_decisions
            .get_or_create(&DecisionLabels { decision: decision.to_owned(), reason: reason.to_owned() })
            .inc();
    }

    pub fn handshake_failed(&self, direction: &str, reason: &str) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { direction: direction.to_owned(), reason: reason.to_owned() })
            .inc();
    }

    /// Adds the capture programs' counters, read from the kernel at scrape
    /// time (capture is installed after the metrics exist).
    /// The tunnel's series and Kubernetes discovery's.
    pub fn with_kubernetes(k8s: &crate::k8s::K8sMetrics) -> Self {
        let mut m = Self::new();
        k8s.register(&mut m.registry);
        m
    }

    pub fn set_capture(&self, counters: Arc<CaptureCounters>) {
        let _ = self.capture.0.set(counters);
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

#[derive(Clone, Default)]
struct CaptureCollector(Arc<std::sync::OnceLock<Arc<CaptureCounters>>>);

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
        let Some(counters) = self.0.get() else { return Ok(()) };
        let snapshot = counters.snapshot();
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
