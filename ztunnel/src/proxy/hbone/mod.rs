//! HBONE: HTTP/2 CONNECT over mutual TLS to port 15008 of the destination
//! workload, wire-compatible with Istio's ztunnel. docs/hbone.md is the
//! protocol as spoken here.

pub mod pool;
pub mod server;

use std::net::{IpAddr, SocketAddr};

use http::{HeaderValue, Method, Request, StatusCode, Uri, Version};

use super::Failure;
use crate::workload::{Workload, canonical};

pub const HBONE_PORT: u16 = 15008;
pub const ALPN_H2: &[u8] = b"h2";

/// Whether a CONNECT may never target `port`: the tunnel's own listeners
/// and endpoints (Istio's `illegal_ports`).
pub fn is_reserved_port(port: u16) -> bool {
    ztunnel_ebpf_common::is_tunnel_port(port, true)
}

/// Why the server refuses a CONNECT before anything is dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub status: StatusCode,
    pub failure: Failure,
    pub error: String,
}

/// Checks a CONNECT as the server receives it: a CONNECT to `ip:port`
/// (IPv6 in brackets) naming exactly the address the connection reached
/// (`landed`), never a loopback or unspecified address and never one of
/// the tunnel's own ports. Returns the destination. Takes anything a peer
/// sends: it never panics.
pub fn check_connect(method: &Method, uri: &Uri, landed: IpAddr) -> Result<SocketAddr, ConnectRefusal> {
    let refuse = |status, failure, error: String| Err(ConnectRefusal { status, failure, error });
    if method != Method::CONNECT {
        return refuse(StatusCode::BAD_REQUEST, Failure::BadRequest, format!("{method} is not CONNECT"));
    }
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty() && p != "/") {
        return refuse(StatusCode::BAD_REQUEST, Failure::BadRequest, format!("`{uri}` is not ip:port"));
    }
    let Some(dst) = parse_authority(uri.authority()) else {
        return refuse(StatusCode::BAD_REQUEST, Failure::BadRequest, format!("`{uri}` is not ip:port"));
    };
    let ip = canonical(dst.ip());
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return refuse(
            StatusCode::BAD_REQUEST,
            Failure::SelfCall,
            format!("{dst}: not a workload's address"),
        );
    }
    if ip != canonical(landed) {
        return refuse(
            StatusCode::BAD_REQUEST,
            Failure::AuthorityMismatch,
            format!("{dst} is not the address this connection reached ({landed})"),
        );
    }
    if is_reserved_port(dst.port()) || dst.port() == 0 {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            Failure::SelfCall,
            format!("port {} is the tunnel's own", dst.port()),
        );
    }
    Ok(dst)
}

/// Why an HBONE stream could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HboneError {
    #[error("cannot reach {target}: {error}")]
    Unreachable { target: SocketAddr, error: String },
    #[error("mTLS with {target} failed ({reason}): {error}")]
    Tls {
        target: SocketAddr,
        reason: &'static str,
        error: String,
        /// Why our side refused the peer's certificate, when it did.
        certificate: Option<crate::tls::verify::VerifyError>,
    },
    #[error("HTTP/2 with {target}: {error}")]
    Protocol { target: SocketAddr, error: String },
    #[error("{target} answered {status}")]
    Status { target: SocketAddr, status: u16 },
    #[error("no pooled connection to {target} had room within {waited:?}")]
    PoolTimeout { target: SocketAddr, waited: std::time::Duration },
}

impl HboneError {
    /// The access log's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Unreachable { .. } => "destination_unreachable",
            HboneError::Tls { reason, .. } => reason,
            HboneError::Protocol { .. } => "hbone_protocol",
            HboneError::Status { status, .. } => status_reason(*status),
            HboneError::PoolTimeout { .. } => "pool_timeout",
        }
    }

    /// The peer's certificate problem, for a handshake refused on it.
    pub fn certificate(&self) -> Option<&crate::tls::verify::VerifyError> {
        match self {
            HboneError::Tls { certificate, .. } => certificate.as_ref(),
            _ => None,
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

/// `:authority` as a socket address (`ip:port`, IPv6 in brackets): no host
/// names, no user info, no scoped IPv6.
pub fn parse_authority(authority: Option<&http::uri::Authority>) -> Option<SocketAddr> {
    let a = authority?.as_str();
    let addr: SocketAddr = a.parse().ok()?;
    match addr {
        SocketAddr::V6(v6) if v6.scope_id() != 0 || v6.flowinfo() != 0 => None,
        _ => Some(addr),
    }
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

    #[test]
    fn connects_are_checked_before_anything_is_dialled() {
        let landed: IpAddr = "198.19.1.11".parse().unwrap();
        let check = |method: &str, uri: &str| {
            let m: Method = method.parse().unwrap();
            check_connect(&m, &uri.parse().unwrap(), landed).map_err(|r| (r.status.as_u16(), r.failure))
        };
        assert_eq!(check("CONNECT", "198.19.1.11:8080"), Ok("198.19.1.11:8080".parse().unwrap()));
        assert_eq!(check("GET", "198.19.1.11:8080"), Err((400, Failure::BadRequest)));
        assert_eq!(check("CONNECT", "web:8080"), Err((400, Failure::BadRequest)));
        assert_eq!(check("CONNECT", "198.19.1.12:8080"), Err((400, Failure::AuthorityMismatch)));
        for port in [15000, 15001, 15006, 15008, 15020, 15021, 0] {
            assert_eq!(
                check("CONNECT", &format!("198.19.1.11:{port}")),
                Err((503, Failure::SelfCall)),
                "{port}"
            );
        }
        for a in ["127.0.0.1:8080", "[::1]:8080", "0.0.0.0:8080", "[::ffff:127.0.0.1]:80"] {
            assert_eq!(check("CONNECT", a), Err((400, Failure::SelfCall)), "{a}");
        }
        let v6 =
            check_connect(&Method::CONNECT, &"[fd7a::2]:80".parse().unwrap(), "fd7a::2".parse().unwrap());
        assert!(v6.is_ok());
        assert!(parse_authority(Some(&"[fe80::1%25eth0]:80".parse().unwrap())).is_none());
    }
}
