//! Helpers shared by the integration tests in `tests/`.
//!
//! The tests need root, cgroup v2, bpffs and the built `ztunnel` and
//! `tb-agent` binaries; `cargo xtask test` provides all of it.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use ztunnel_testbed::{Node, Testbed, agent::Server};

/// A tb-agent echo server on `node` (outside any enrolled workload) on
/// every address of the node, at `ports`.
pub fn node_server(tb: &Testbed, node: &Node, ports: &[u16]) -> anyhow::Result<Server> {
    let mut addrs = Vec::new();
    for p in ports {
        addrs.push(SocketAddr::new(IpAddr::V4(node.ip4), *p));
        addrs.push(SocketAddr::new(IpAddr::V6(node.ip6), *p));
    }
    Server::start(tb, &node.unenrolled(), &addrs)
}

/// The cgroup v2 id of a cgroup directory.
pub fn cgroup_id(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0)
}

/// How long a test waits for something that should happen: generous, for
/// a loaded 2-core CI machine (a passing test never waits this long).
pub const WAIT: Duration = ztunnel_testbed::agent::PATIENCE;

/// Polls `f` until it returns true or `limit` passes. The caller's assertion
/// message should say what was seen instead.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// Polls `check` every 100 ms until it returns `Ok(true)`, for at most
/// `limit`. An error counts as "not yet" (a process still starting, an
/// endpoint not answering yet); when the deadline passes, the error names
/// `what`, the last error, and what `seen` reports of the state then.
pub fn wait_until(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
    seen: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(format!("{e:#}")),
        }
        if Instant::now() > deadline {
            let error = last_error.map(|e| format!("\nlast error: {e}")).unwrap_or_default();
            anyhow::bail!("not within {limit:?}: {what}{error}\nseen: {}", seen());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A JSON string field of an access log line.
pub fn field<'a>(entry: &'a serde_json::Value, name: &str) -> &'a str {
    entry[name].as_str().unwrap_or_default()
}

/// The value of one series in a Prometheus text exposition (0 if absent).
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Every series ztunnel exports, as Prometheus scrapes them: the contract
/// the alert rules and the dashboard are checked against (`tests/deploy.rs`)
/// and a running tunnel is checked against (`tests/metrics.rs`).
pub const EXPORTED_SERIES: &[&str] = &[
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "ztunnel_certificate_expiry_timestamp_seconds",
    "ztunnel_certificate_renewals_total",
    "ztunnel_handshake_failures_total",
    "ztunnel_policy_decisions_total",
    "ztunnel_capture_events_total",
    "ztunnel_limit_refusals_total",
    "ztunnel_config_reloads_total",
    "ztunnel_workloads",
    "ztunnel_ready",
    "ztunnel_pool_connections",
    "ztunnel_pool_streams",
    "ztunnel_tokio_alive_tasks",
    "process_open_fds",
    "process_resident_memory_bytes",
];
