//! How a node tunnel reaches its CA: the signer embedded in the process
//! (single host, demo, tests), or the signing service over TLS, proving the
//! node with its credential (mutual TLS, plain hosts) or with a projected
//! ServiceAccount token (a bearer token, in a cluster). All end in the same
//! `Signer::sign`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use super::{
    ca_address::CaAddress,
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
    #[error("CA address {address} does not resolve in the node's network namespace: {error}")]
    Resolve { address: String, error: String },
    #[error("the token for the CA ({path}) is unusable: {error}")]
    Token { path: PathBuf, error: String },
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
            CaClientError::Resolve { .. } => "ca_unresolved",
            CaClientError::Token { .. } => "ca_token",
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

/// How a node proves itself to the signing service.
pub enum CaAuth {
    /// Mutual TLS with the node credential (`ztunnel ca node-credential`).
    NodeCredential(watch::Receiver<Arc<Credential>>),
    /// A projected, audience-bound ServiceAccount token sent as
    /// `Authorization: Bearer`. The file is re-read before every request: the
    /// kubelet replaces it long before it expires.
    Token(PathBuf),
}

/// The signing service, reached from the node's namespace.
pub struct RemoteCa {
    pub address: CaAddress,
    pub netns: Netns,
    pub trust_domain: TrustDomain,
    pub auth: CaAuth,
    pub bundle: BundleSource,
    pub clock_skew: Duration,
    pub timeout: Duration,
}

/// Reads a bearer token file: trimmed, non-empty, one line of visible ASCII.
pub fn read_token(path: &Path) -> Result<String, CaClientError> {
    let err = |error: String| CaClientError::Token { path: path.to_owned(), error };
    let raw = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err("not a token (it holds spaces or non-ASCII characters)".into()));
    }
    Ok(token.to_owned())
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

    /// The service's addresses, resolved now in the node's namespace (DNS
    /// answers change: a Service's ClusterIP, a CA that moved).
    async fn resolve(&self) -> Result<Vec<SocketAddr>, CaClientError> {
        if let Some(ip) = self.address.ip() {
            return Ok(vec![SocketAddr::new(ip, self.address.port())]);
        }
        let failed = |error: String| CaClientError::Resolve { address: self.address.to_string(), error };
        let target = (self.address.host().to_owned(), self.address.port());
        let found: Vec<SocketAddr> = if self.netns.path().is_none() {
            tokio::net::lookup_host(target).await.map_err(|e| failed(e.to_string()))?.collect()
        } else {
            // getaddrinfo on the namespace's own thread: the lookup's
            // sockets are made, and its servers reached, from the node's
            // network namespace.
            self.netns
                .run_async(move || std::net::ToSocketAddrs::to_socket_addrs(&target).map(Iterator::collect))
                .await
                .map_err(|e| failed(e.to_string()))?
        };
        if found.is_empty() {
            return Err(failed("no addresses".into()));
        }
        Ok(found)
    }

    /// A TCP connection to the first address that answers.
    async fn connect(&self) -> Result<tokio::net::TcpStream, CaClientError> {
        let mut last = None;
        for addr in self.resolve().await? {
            let attempt = async {
                let socket = self.netns.tcp_socket(addr).await.map_err(|e| e.to_string())?;
                socket.connect(addr).await.map_err(|e| format!("{addr}: {e}"))
            };
            match attempt.await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(CaClientError::Unreachable {
            address: self.address.to_string(),
            error: last.unwrap_or_else(|| "no addresses".into()),
        })
    }

    async fn exchange(&self, method: Method, path: &str, body: Vec<u8>) -> Result<Bytes, CaClientError> {
        let address = self.address.to_string();
        let unreachable = |error: String| CaClientError::Unreachable { address: address.clone(), error };
        // The token first: a missing one is the node's problem, not the CA's.
        let (config, bearer) = match &self.auth {
            CaAuth::NodeCredential(credential) => {
                let credential = credential.borrow().clone();
                let config = tls::client_config(
                    credential.certified.clone(),
                    self.bundle.clone(),
                    Expect::CaService(self.trust_domain.clone()),
                    self.clock_skew,
                    &[b"http/1.1"],
                    false,
                );
                (config, None)
            }
            CaAuth::Token(file) => {
                let token = read_token(file)?;
                let config = tls::client_config_without_cert(
                    self.bundle.clone(),
                    Expect::CaService(self.trust_domain.clone()),
                    self.clock_skew,
                    &[b"http/1.1"],
                );
                (config, Some(token))
            }
        };
        let config = config.map_err(|e| CaClientError::Tls { reason: "tls_config", error: e.to_string() })?;
        let stream = self.connect().await?;
        let server_ip = stream.peer_addr().map_err(|e| unreachable(e.to_string()))?.ip();
        // No SNI is sent; the verifier checks the CA's SPIFFE ID, not a name.
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(server_ip.into()), stream)
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
            .header(hyper::header::CONTENT_TYPE, "application/json");
        let request = match bearer {
            Some(token) => request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}")),
            None => request,
        };
        let request =
            request.body(Full::new(Bytes::from(body))).map_err(|e| CaClientError::Protocol(e.to_string()))?;
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
