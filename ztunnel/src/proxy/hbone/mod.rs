//! HBONE: HTTP/2 CONNECT over mutual TLS to port 15008 of the destination
//! workload, wire-compatible with Istio's ztunnel. docs/hbone.md is the
//! protocol as spoken here.

pub mod pool;
pub mod server;

use std::net::SocketAddr;

use http::{HeaderValue, Method, Request, Version};

use crate::workload::Workload;

pub const HBONE_PORT: u16 = 15008;
pub const ALPN_H2: &[u8] = b"h2";

/// Ports a CONNECT may never target: the tunnel's own listeners.
pub const RESERVED_PORTS: [u16; 3] = [15001, 15006, 15008];

/// Why an HBONE stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HboneError {
    #[error("cannot reach {target}: {error}")]
    Unreachable { target: SocketAddr, error: String },
    #[error("mTLS with {target} failed ({reason}): {error}")]
    Tls { target: SocketAddr, reason: &'static str, error: String },
    #[error("HTTP/2 with {target}: {error}")]
    Protocol { target: SocketAddr, error: String },
    #[error("{target} answered {status}")]
    Status { target: SocketAddr, status: u16 },
}

impl HboneError {
    /// The access log's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Unreachable { .. } => "destination_unreachable",
            HboneError::Tls { reason, .. } => reason,
            HboneError::Protocol { .. } => "hbone_protocol",
            HboneError::Status { status, .. } => status_reason(*status),
        }
    }
}

/// The access log's reason for a CONNECT answered with `status`.
pub fn status_reason(status: u16) -> &'static str {
    match status {
        401 => "policy_denied",
        400 => "bad_request",
        503 => "destination_unreachable",
        _ => "hbone_status",
    }
}

/// The CONNECT for `original_dst`, from `source` (whose `forwarded` address
/// is `source_addr`). `:authority` is the original destination (IPv6 in
/// brackets); there is no `:scheme` or `:path`.
pub fn connect_request(original_dst: SocketAddr, source: &Workload, source_addr: SocketAddr) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.version_mut() = Version::HTTP_2;
    if let Ok(uri) = original_dst.to_string().parse() {
        *req.uri_mut() = uri;
    }
    let headers = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("for=\"{source_addr}\"")) {
        headers.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&baggage(source)) {
        headers.insert("baggage", v);
    }
    if let Ok(v) = HeaderValue::from_str(&traceparent()) {
        headers.insert("traceparent", v);
    }
    req
}

/// Workload metadata in Istio's `baggage` form.
pub fn baggage(w: &Workload) -> String {
    let app = w.labels.get("app").map_or(w.name.as_str(), String::as_str);
    let version = w.labels.get("version").map_or("latest", String::as_str);
    format!(
        "k8s.namespace.name={},k8s.deployment.name={},service.name={app},service.version={version}",
        w.namespace, w.name
    )
}

/// A fresh W3C trace context (`00-<trace>-<parent>-00`).
fn traceparent() -> String {
    format!("00-{:016x}{:016x}-{:016x}-00", fastrand::u64(..), fastrand::u64(..), fastrand::u64(1..))
}

/// `:authority` as a socket address (`ip:port`, IPv6 in brackets).
pub fn parse_authority(authority: Option<&http::uri::Authority>) -> Option<SocketAddr> {
    authority?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_carries_only_the_authority_and_istio_headers() {
        let w = Workload {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            node: "n1".into(),
            addresses: vec![],
            ports: vec![],
            labels: Default::default(),
            has_netns: true,
        };
        let req = connect_request("[fd7a::2]:8080".parse().unwrap(), &w, "198.19.1.11:4444".parse().unwrap());
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "[fd7a::2]:8080");
        assert_eq!(req.uri().scheme(), None);
        assert_eq!(req.headers()["forwarded"], "for=\"198.19.1.11:4444\"");
        assert!(req.headers()["baggage"].to_str().unwrap().contains("k8s.namespace.name=shop"));
        let tp = req.headers()["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
        assert_eq!(parse_authority(req.uri().authority()), Some("[fd7a::2]:8080".parse().unwrap()));
    }
}
