//! How a node tunnel reaches its CA: the signer embedded in the process
//! (single host, demo, tests) or the signing service over mutual TLS with the
//! node's credential. Both end in the same `Signer::sign`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use super::{
    cert::{Credential, certs_from_pem},
    spiffe::TrustDomain,
};
use crate::{
    ca::{
        api::{BUNDLE_PATH, BundleResponse, ErrorResponse, SIGN_PATH, SignRequest, SignResponse},
        signer::{SignError, Signer},
    },
    netns::Netns,
    tls::{self, BundleSource, verify::Expect, verify::TrustBundle},
};

const MAX_RESPONSE: usize = 1024 * 1024;

/// A signed certificate and what the CA says about trust.
#[derive(Debug, Clone)]
pub struct Signed {
    pub chain: Vec<CertificateDer<'static>>,
    pub root: String,
    pub bundle: TrustBundle,
    pub signing_root: String,
}

/// Why a request to the CA failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaClientError {
    #[error("CA {address} unreachable: {error}")]
    Unreachable { address: String, error: String },
    #[error("CA {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("TLS with the CA failed ({reason}): {error}")]
    Tls { reason: &'static str, error: String },
    #[error("the CA refused ({reason}): {error}")]
    Refused { reason: String, error: String },
    #[error("the CA's answer is unusable: {0}")]
    Protocol(String),
}

impl CaClientError {
    pub fn reason(&self) -> &str {
        match self {
            CaClientError::Unreachable { .. } => "ca_unreachable",
            CaClientError::Timeout { .. } => "ca_timeout",
            CaClientError::Tls { reason, .. } => reason,
            CaClientError::Refused { reason, .. } => reason,
            CaClientError::Protocol(_) => "ca_protocol",
        }
    }
}

pub enum CaClient {
    Embedded { signer: Arc<Signer>, node: String },
    Remote(RemoteCa),
}

impl CaClient {
    pub async fn sign(&self, csr: String, ttl: Duration) -> Result<Signed, CaClientError> {
        match self {
            CaClient::Embedded { signer, node } => {
                let issued = signer.sign(node, &csr, ttl).map_err(|e| match e {
                    SignError::NotAuthorized { .. } | SignError::BadCsr(_) => {
                        CaClientError::Refused { reason: e.reason().to_owned(), error: e.to_string() }
                    }
                    SignError::Internal(m) => CaClientError::Protocol(m),
                })?;
                let bundle = TrustBundle::from_pem(&issued.bundle_pem)
                    .map_err(|e| CaClientError::Protocol(e.to_string()))?;
                Ok(Signed {
                    chain: issued.chain,
                    root: issued.root,
                    bundle,
                    signing_root: issued.signing_root,
                })
            }
            CaClient::Remote(remote) => remote.sign(csr, ttl).await,
        }
    }

    /// The current trust bundle and signing root.
    pub async fn bundle(&self) -> Result<(TrustBundle, String), CaClientError> {
        match self {
            CaClient::Embedded { signer, .. } => {
                let s = signer.state();
                Ok((s.bundle.clone(), s.signing_root.clone()))
            }
            CaClient::Remote(remote) => remote.bundle().await,
        }
    }
}

/// The signing service, reached from the node's namespace with the node's
/// credential.
pub struct RemoteCa {
    pub address: SocketAddr,
    pub netns: Netns,
    pub trust_domain: TrustDomain,
    pub credential: watch::Receiver<Arc<Credential>>,
    pub bundle: BundleSource,
    pub clock_skew: Duration,
    pub timeout: Duration,
}

impl RemoteCa {
    async fn sign(&self, csr: String, ttl: Duration) -> Result<Signed, CaClientError> {
        let body = serde_json::to_vec(&SignRequest { csr, ttl_seconds: ttl.as_secs() })
            .map_err(|e| CaClientError::Protocol(e.to_string()))?;
        let bytes = self.request(Method::POST, SIGN_PATH, body).await?;
        let r: SignResponse =
            serde_json::from_slice(&bytes).map_err(|e| CaClientError::Protocol(e.to_string()))?;
        let chain = certs_from_pem(&r.chain).map_err(CaClientError::Protocol)?;
        let bundle =
            TrustBundle::from_pem(&r.trust_bundle).map_err(|e| CaClientError::Protocol(e.to_string()))?;
        Ok(Signed { chain, root: r.root, bundle, signing_root: r.signing_root })
    }

    async fn bundle(&self) -> Result<(TrustBundle, String), CaClientError> {
        let bytes = self.request(Method::GET, BUNDLE_PATH, Vec::new()).await?;
        let r: BundleResponse =
            serde_json::from_slice(&bytes).map_err(|e| CaClientError::Protocol(e.to_string()))?;
        let bundle =
            TrustBundle::from_pem(&r.trust_bundle).map_err(|e| CaClientError::Protocol(e.to_string()))?;
        Ok((bundle, r.signing_root))
    }

    async fn request(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes, CaClientError> {
        let address = self.address.to_string();
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(CaClientError::Timeout { address, timeout: self.timeout }),
        }
    }

    async fn exchange(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes, CaClientError> {
        let address = self.address.to_string();
        let unreachable = |error: String| CaClientError::Unreachable { address: address.clone(), error };
        let socket = self.netns.tcp_socket(self.address).await.map_err(|e| unreachable(e.to_string()))?;
        let stream = socket.connect(self.address).await.map_err(|e| unreachable(e.to_string()))?;
        let credential = self.credential.borrow().clone();
        let config = tls::client_config(
            credential.certified.clone(),
            self.bundle.clone(),
            Expect::CaService(self.trust_domain.clone()),
            self.clock_skew,
            &[b"http/1.1"],
            false,
        )
        .map_err(|e| CaClientError::Tls { reason: "tls_config", error: e.to_string() })?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(self.address.ip().into()), stream)
            .await
            .map_err(|e| {
                let (reason, error) = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .map_or(("tls_error", e.to_string()), tls::verify::handshake_reason);
                CaClientError::Tls { reason, error }
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| CaClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &address)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| CaClientError::Protocol(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| CaClientError::Protocol(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            let e: ErrorResponse = serde_json::from_slice(&bytes).unwrap_or(ErrorResponse {
                reason: format!("http_{}", status.as_u16()),
                error: String::from_utf8_lossy(&bytes).into_owned(),
            });
            return Err(CaClientError::Refused { reason: e.reason, error: e.error });
        }
        Ok(bytes)
    }
}
