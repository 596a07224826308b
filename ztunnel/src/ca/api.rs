//! The signing service's HTTP API (JSON over mutual TLS, HTTP/1.1):
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/sign` `{"csr": PEM, "ttl_seconds": N}` | 200 `SignResponse`; 403 not authorized; 400 bad CSR |
//! | `GET /v1/trust-bundle` | 200 `BundleResponse` |
//!
//! The caller is the node named by its client certificate's SPIFFE ID
//! (`spiffe://<td>/ztunnel/node/<node>`).

use serde::{Deserialize, Serialize};

pub const SIGN_PATH: &str = "/v1/sign";
pub const BUNDLE_PATH: &str = "/v1/trust-bundle";
/// Istio's CA port.
pub const DEFAULT_PORT: u16 = 15012;

#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    pub csr: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignResponse {
    /// Leaf then intermediate, PEM.
    pub chain: String,
    /// Fingerprint of the root the chain leads to.
    pub root: String,
    pub trust_bundle: String,
    pub signing_root: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BundleResponse {
    pub trust_bundle: String,
    pub signing_root: String,
    pub generation: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub reason: String,
    pub error: String,
}
