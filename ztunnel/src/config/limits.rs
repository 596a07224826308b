//! `limits`: fair shares of what one tunnel holds for every workload of its
//! node, so that one workload (or one peer) cannot take it from the others.
//! Every limit refuses what is beyond it, visibly: a reset or a refused
//! connect(), a reason in the access log and `ztunnel_limit_refusals_total`.
//! docs/security.md lists each with its default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections the tunnel carries at once (captured outbound, inbound
    /// plaintext, inbound HBONE streams); beyond it every new one is refused.
    /// Absent: what the open-file limit allows (two descriptors each).
    pub max_connections: Option<usize>,
    /// Past this many, a workload holding more than its fair share (this
    /// number divided among the workloads that have connections) is refused
    /// new ones, so a crowded node degrades the greedy first. Absent: 80% of
    /// `max_connections`.
    pub soft_connections: Option<usize>,
    /// Connections one local workload may have at once, both directions.
    /// Absent: a quarter of `max_connections`.
    pub connections_per_workload: Option<usize>,
    /// TCP sockets one workload may hold at once, enforced in the kernel at
    /// socket(): this bounds its share of every capture map. Absent: a
    /// quarter of `capture.max_connections`.
    pub sockets_per_workload: Option<u32>,
    /// Inbound connections on :15008 (and the CA's port) from one source
    /// address that have not finished their handshake.
    pub handshakes_per_source: usize,
    /// The same, from all sources together.
    pub handshakes: usize,
    /// From accept to an authenticated caller (TLS, then the HTTP/2 preface).
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// Authenticated HBONE connections from one source address. Each may
    /// hold its flow-control window (16 MiB) of data not yet delivered.
    pub hbone_connections_per_source: usize,
    /// Connections the tunnel is opening to one local workload at once.
    pub deliveries_per_workload: usize,
    /// Bytes a captured client may send before its HBONE stream is
    /// answered, per stream and per workload: what the tunnel holds for a
    /// destination that is slow to answer.
    pub early_data_per_stream: usize,
    pub early_data_per_workload: usize,
    /// How long a new stream waits for a pooled HBONE connection to open or
    /// to have room.
    #[serde(with = "duration")]
    pub pool_wait_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: None,
            soft_connections: None,
            connections_per_workload: None,
            sockets_per_workload: None,
            handshakes_per_source: 64,
            handshakes: 1024,
            handshake_timeout: Duration::from_secs(5),
            hbone_connections_per_source: 256,
            deliveries_per_workload: 512,
            early_data_per_stream: 64 * 1024,
            early_data_per_workload: 4 * 1024 * 1024,
            pool_wait_timeout: Duration::from_secs(10),
        }
    }
}

/// TCP keepalive on every socket the tunnel owns: a peer that vanishes
/// without FIN or RST (a node that lost power, a dropped route) is noticed
/// and its descriptors freed. Unacknowledged data gives up after the same
/// time (TCP_USER_TIMEOUT).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Idle time before the first probe (Istio: 180s).
    #[serde(with = "duration")]
    pub idle: Duration,
    #[serde(with = "duration")]
    pub interval: Duration,
    pub probes: u32,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self { idle: Duration::from_secs(180), interval: Duration::from_secs(20), probes: 9 }
    }
}

impl KeepaliveConfig {
    /// When a silent peer is given up: the last probe unanswered.
    pub fn give_up_after(&self) -> Duration {
        self.idle + self.interval * self.probes
    }
}

/// Limits with every default worked out for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ResolvedLimits {
    pub max_connections: usize,
    pub soft_connections: usize,
    pub connections_per_workload: usize,
    /// The open-file limit they were sized from.
    pub open_files: u64,
}

/// Descriptors kept for everything but connections: listeners, namespaces,
/// maps, the access log, the CA.
const RESERVED_FILES: u64 = 1024;

impl LimitsConfig {
    pub fn resolve(&self, open_files: u64) -> ResolvedLimits {
        let by_files = (open_files.saturating_sub(RESERVED_FILES) / 2).max(64) as usize;
        let max_connections = self.max_connections.unwrap_or(by_files.min(65536));
        let soft_connections = self.soft_connections.unwrap_or(max_connections / 5 * 4).min(max_connections);
        let connections_per_workload =
            self.connections_per_workload.unwrap_or((max_connections / 4).max(16)).min(max_connections);
        ResolvedLimits { max_connections, soft_connections, connections_per_workload, open_files }
    }

    /// Values that cannot work: (field, message).
    pub(super) fn problem(&self) -> Option<(&'static str, String)> {
        let counts = [
            ("max_connections", self.max_connections.unwrap_or(1)),
            ("soft_connections", self.soft_connections.unwrap_or(1)),
            ("connections_per_workload", self.connections_per_workload.unwrap_or(1)),
            ("sockets_per_workload", self.sockets_per_workload.unwrap_or(1) as usize),
            ("handshakes_per_source", self.handshakes_per_source),
            ("handshakes", self.handshakes),
            ("hbone_connections_per_source", self.hbone_connections_per_source),
            ("deliveries_per_workload", self.deliveries_per_workload),
            ("early_data_per_stream", self.early_data_per_stream),
            ("early_data_per_workload", self.early_data_per_workload),
        ];
        if let Some((field, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Some((field, "must be at least 1".into()));
        }
        for (field, d) in
            [("handshake_timeout", self.handshake_timeout), ("pool_wait_timeout", self.pool_wait_timeout)]
        {
            if d.is_zero() {
                return Some((field, "must be more than 0s".into()));
            }
        }
        if let (Some(soft), Some(max)) = (self.soft_connections, self.max_connections)
            && soft > max
        {
            return Some(("soft_connections", format!("{soft} is more than max_connections ({max})")));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_open_file_limit() {
        let r = LimitsConfig::default().resolve(20_000);
        assert_eq!(r.max_connections, (20_000 - 1024) / 2);
        assert_eq!(r.soft_connections, r.max_connections / 5 * 4);
        assert_eq!(r.connections_per_workload, r.max_connections / 4);
        let r = LimitsConfig::default().resolve(1 << 20);
        assert_eq!(r.max_connections, 65536, "a generous limit does not mean unbounded");
        let set =
            LimitsConfig { max_connections: Some(100), soft_connections: Some(500), ..Default::default() };
        assert_eq!(set.resolve(20_000).soft_connections, 100);
        assert!(set.problem().unwrap().1.contains("more than max_connections"));
    }
}
