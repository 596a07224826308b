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

/// Polls `f` until it returns true or `limit` passes.
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
