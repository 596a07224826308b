//! `ztunnel ca serve --kubernetes`: the signing service in a cluster.
//!
//! A node tunnel connects over TLS (the service's certificate chains to the
//! mesh root; the tunnel checks it against the trust bundle it mounts) and
//! sends its projected ServiceAccount token as a bearer token. The CA:
//! 1. reviews the token with the API server for its audience (`tokens`),
//! 2. requires it to be bound to a live pod of the tunnel's namespace and
//!    ServiceAccount, and takes that pod's node as the caller (`caller`),
//! 3. signs an identity only if a live pod with it (namespace + service
//!    account) is on that node now (`pods`, a watch cache of every pod),
//!
//! and logs every issuance and refusal with node, identity and reason.
//! Its signing key is the mounted Secret in Istio's `cacerts` layout
//! (`super::cacerts`); it publishes the trust bundle to a ConfigMap
//! (`publish`).
//!
//! | module | job |
//! | --- | --- |
//! | `tokens` | TokenReview, cached briefly by the token's hash |
//! | `caller` | the token's bound pod -> the calling node, or a refusal |
//! | `pods` | which service accounts have live pods on which node |
//! | `publish` | the ConfigMap `ztunnel-trust-bundle` |

pub mod caller;
pub mod pods;
pub mod publish;
pub mod tokens;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Method, Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use self::{
    caller::{Authenticator, TunnelAccount},
    pods::PodIndex,
    tokens::TokenReviewer,
};
use super::{
    api::{BUNDLE_PATH, SIGN_PATH},
    cacerts::{self, Cacerts, CacertsError},
    server::{
        HANDSHAKE_TIMEOUT, REQUEST_TIMEOUT, SERVER_CERT_LIFETIME, accept_loop, bundle_answer, error,
        not_found, read_sign_request, refresh_server_cert, sign_answer,
    },
    signer::{Signer, SignerPolicy, csr_identity},
};
use crate::{
    identity::{cert::Credential, node_id::PeerId, spiffe::TrustDomain},
    tls::{self, CurrentCert},
};

pub struct KubernetesSettings {
    /// The mounted Secret, in the `cacerts` layout.
    pub plugin_ca_dir: PathBuf,
    /// When the Secret has no `trust-domain` file.
    pub trust_domain: Option<TrustDomain>,
    pub listen: SocketAddr,
    /// The audience node tokens must carry (the DaemonSet's projected token).
    pub audience: String,
    /// Where the trust bundle ConfigMap is published (the CA's namespace).
    pub namespace: String,
    pub tunnel: TunnelAccount,
    pub kubeconfig: Option<PathBuf>,
    pub policy: SignerPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the CA's key material (--plugin-ca-dir): {0}")]
    Material(#[from] CacertsError),
    #[error(transparent)]
    Client(#[from] crate::k8s::ClientError),
    #[error("listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("issuing the service's own certificate: {0}")]
    ServerCert(String),
}

/// How often the Secret's files are checked for a change.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// How often the trust bundle ConfigMap is checked (someone may delete or
/// edit it) even when nothing changed here.
const REPUBLISH_INTERVAL: Duration = Duration::from_secs(60);

struct Service {
    signer: Arc<Signer>,
    auth: Authenticator,
}

/// Runs the CA until `shutdown`. It listens only once the pod cache holds
/// the first full list: before, it could not authorize anything.
pub async fn serve(settings: KubernetesSettings, shutdown: CancellationToken) -> Result<(), ServeError> {
    let state = Cacerts::read(&settings.plugin_ca_dir, settings.trust_domain.as_ref())?.state()?;
    let td = state.trust_domain.clone();
    let client = crate::k8s::client(settings.kubeconfig.as_deref()).await?;
    let pods = PodIndex::default();
    let (synced_tx, mut synced) = watch::channel(false);
    tracing::info!(target: "ca", "waiting for the first list of pods from the API server");
    tokio::spawn(pods.clone().run(client.clone(), synced_tx, shutdown.clone()));
    let signer = Arc::new(Signer::with_authorizer(state, Arc::new(pods.clone()), settings.policy));
    let server_cert = Arc::new(Mutex::new(issue_server_cert(&signer, &td)?));

    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = synced.wait_for(|s| *s) => { if r.is_ok() { break } else { return Ok(()) } }
            () = tokio::time::sleep(Duration::from_secs(10)) => {
                tracing::warn!(target: "ca", "still waiting for the first list of pods from the API server");
            }
        }
    }

    let current = server_cert.clone();
    let tls = tls::server_config_without_client_auth(
        CurrentCert(Box::new(move |_| current.lock().ok().map(|c| c.1.certified.clone()))),
        &[b"http/1.1"],
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Listen { addr: settings.listen, source })?;
    let service = Arc::new(Service {
        signer: signer.clone(),
        auth: Authenticator {
            reviewer: TokenReviewer::new(client.clone(), settings.audience.clone()),
            pods,
            tunnel: settings.tunnel.clone(),
            client: client.clone(),
        },
    });
    let reload = tokio::spawn(reload_loop(
        settings.plugin_ca_dir.clone(),
        td.clone(),
        signer.clone(),
        server_cert,
        client,
        settings.namespace.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        target: "ca",
        listen = %settings.listen,
        trust_domain = %td,
        audience = %settings.audience,
        tunnel = %settings.tunnel.username(),
        "CA signing service ready (kubernetes: nodes authenticate with ServiceAccount tokens)"
    );
    accept_loop(listener, shutdown, move |stream, handshake| {
        connection(acceptor.clone(), stream, service.clone(), handshake)
    })
    .await;
    reload.abort();
    Ok(())
}

fn issue_server_cert(signer: &Signer, td: &TrustDomain) -> Result<(Instant, Credential), ServeError> {
    signer
        .issue_credential(PeerId::CaService { trust_domain: td.clone() }, SERVER_CERT_LIFETIME)
        .map(|c| (Instant::now(), c))
        .map_err(|e| ServeError::ServerCert(e.to_string()))
}

async fn connection(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    service: Arc<Service>,
    handshake: crate::limits::SourcePermit,
) -> anyhow::Result<()> {
    crate::sockopt::SocketPolicy::default().apply(&stream);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))?
        .map_err(|e| anyhow::anyhow!("TLS handshake: {e}"))?;
    drop(handshake);
    let handler = service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(handle(req, &service).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(TokioIo::new(tls), handler)
        .await?;
    Ok(())
}

/// `Authorization: Bearer <token>`, if present.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

async fn handle(req: Request<Incoming>, service: &Service) -> Response<Full<Bytes>> {
    let token = bearer(req.headers());
    match (req.method().clone(), req.uri().path()) {
        (Method::POST, SIGN_PATH) => {
            let request = match read_sign_request(req).await {
                Ok(r) => r,
                Err((status, reason, message)) => {
                    tracing::warn!(target: "ca", node = "-", identity = "-", reason, "certificate refused: {message}");
                    return error(status, reason, &message);
                }
            };
            match service.auth.authenticate(token.as_deref()).await {
                // The signer logs the issuance or refusal with the node.
                Ok(caller) => sign_answer(&service.signer, &caller.node, &request),
                Err(refusal) => {
                    tracing::warn!(
                        target: "ca",
                        node = refusal.node().unwrap_or("-"),
                        identity = csr_identity(&request.csr).as_deref().unwrap_or("-"),
                        reason = refusal.reason(),
                        "certificate refused: {refusal}"
                    );
                    error(refusal.status(), refusal.reason(), &refusal.to_string())
                }
            }
        }
        (Method::GET, BUNDLE_PATH) => match service.auth.authenticate(token.as_deref()).await {
            Ok(_) => bundle_answer(&service.signer),
            Err(refusal) => {
                tracing::warn!(target: "ca", reason = refusal.reason(), "trust bundle refused: {refusal}");
                error(refusal.status(), refusal.reason(), &refusal.to_string())
            }
        },
        _ => not_found(),
    }
}

/// Picks up a changed Secret (the kubelet updates the mounted files),
/// renews the service's certificate, and keeps the trust bundle ConfigMap
/// current.
async fn reload_loop(
    dir: PathBuf,
    td: TrustDomain,
    signer: Arc<Signer>,
    server_cert: Arc<Mutex<(Instant, Credential)>>,
    client: kube::Client,
    namespace: String,
    shutdown: CancellationToken,
) {
    let mut version = cacerts::version(&dir);
    let mut publish_due = Some(Instant::now());
    let mut tick = tokio::time::interval(RELOAD_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = cacerts::version(&dir);
        if now != version {
            match Cacerts::read(&dir, Some(&td)).and_then(|m| m.state()) {
                Ok(state) => {
                    tracing::info!(target: "ca", roots = state.bundle.roots().len(), signing_root = %state.signing_root, "CA key material reloaded");
                    signer.set_state(state);
                    refresh_server_cert(&signer, &td, &server_cert);
                    version = now;
                    publish_due = Some(Instant::now());
                }
                Err(e) => {
                    tracing::error!(target: "ca", "the CA's key material changed but does not load (keeping the running one): {e}")
                }
            }
        }
        let stale = server_cert.lock().is_ok_and(|c| c.0.elapsed() > SERVER_CERT_LIFETIME / 2);
        if stale {
            refresh_server_cert(&signer, &td, &server_cert);
        }
        if publish_due.is_some_and(|t| Instant::now() >= t) {
            let pem = signer.state().bundle.to_pem();
            match publish::publish(&client, &namespace, &pem).await {
                Ok(done) => {
                    if done != publish::Published::Unchanged {
                        tracing::info!(target: "ca", configmap = %format!("{namespace}/{}", publish::CONFIG_MAP), ?done, "trust bundle published");
                    }
                    publish_due = Some(Instant::now() + REPUBLISH_INTERVAL);
                }
                Err(e) => {
                    tracing::warn!(target: "ca", configmap = %format!("{namespace}/{}", publish::CONFIG_MAP), "publishing the trust bundle (retrying): {e}");
                    publish_due = Some(Instant::now() + Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_token_is_read_from_the_authorization_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(hyper::header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("abc.def"));
        h.insert(hyper::header::AUTHORIZATION, "bearer  xyz ".parse().unwrap());
        assert_eq!(bearer(&h).as_deref(), Some("xyz"));
        h.insert(hyper::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(hyper::header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
