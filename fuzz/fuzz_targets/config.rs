//! The node configuration file: `Config::parse` on any text returns a
//! configuration or a typed error whose message renders (file, line,
//! field), never a panic. The module promises that a file that loads is a
//! file the tunnel can run, so for one that loads this also works out what
//! the tunnel derives from it at start and in `ztunnel validate` and
//! `ztunnel policy matrix`: warnings, workloads, limits for any open-file
//! limit, keepalive on a real socket, the policy matrix.
#![no_main]

use std::{net::TcpListener, path::Path, sync::OnceLock, time::SystemTime};

use libfuzzer_sys::fuzz_target;
use ztunnel::{config::Config, policy::explain::Matrix, sockopt::SocketPolicy, workload::Workload};

/// A socket to apply the tunnel's socket options to, as it does to each
/// socket it owns.
fn socket() -> &'static TcpListener {
    static SOCKET: OnceLock<TcpListener> = OnceLock::new();
    SOCKET.get_or_init(|| TcpListener::bind("127.0.0.1:0").expect("a loopback socket"))
}

/// Beyond this many workloads or policies the matrix (callers x ports) is
/// too slow for a fuzz iteration.
const MATRIX_MAX: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = match Config::parse(text, Path::new("node.yaml")) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let _ = config.warnings();
    for w in &config.workloads {
        if let Err(e) = Workload::from_config(&config, w) {
            panic!("workload {w} of a loaded file: {e}");
        }
    }
    let _ = config.local_workloads().count();
    for open_files in [0, 1024, 20_000, 1 << 20, u64::MAX] {
        let limits = config.limits.resolve(open_files);
        assert!(limits.soft_connections <= limits.max_connections);
        assert!(limits.connections_per_workload <= limits.max_connections);
    }
    let _ = config.sockets_per_workload();
    let _ = config.proxy.tcp_keepalive.give_up_after();
    SocketPolicy::from_config(&config.proxy.tcp_keepalive).apply(socket());
    if config.workloads.len() <= MATRIX_MAX && config.policies.len() <= MATRIX_MAX {
        if let Err(e) = Matrix::build(&config, SystemTime::now()) {
            panic!("the policy matrix of a loaded file: {e}");
        }
    }
});
