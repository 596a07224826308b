//! `ztunnel ca serve`: the signing service. Node tunnels reach it over mutual
//! TLS with their node credentials; it signs CSRs under node authorization,
//! and picks up rotation steps and registry changes without a restart.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    api::{BUNDLE_PATH, BundleResponse, ErrorResponse, SIGN_PATH, SignRequest, SignResponse},
    signer::{Placement, SignError, Signer, SignerPolicy},
    store::CaDir,
};
use crate::{
    config::registry::RegistryFile,
    identity::{cert::Credential, cert::certs_to_pem, node_id::PeerId},
    tls::{self, CurrentCert, verify::Expect},
};

/// How long the service's own TLS certificate lives; it is re-issued at half.
pub(crate) const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const MAX_BODY: usize = 64 * 1024;

pub struct ServeSettings {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub registry: PathBuf,
    pub policy: SignerPolicy,
    pub clock_skew: Duration,
}

/// Connections the signing service holds open at once.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// Connections from one address still in their TLS handshake: one node (or
/// anyone who can reach the port) flooding it cannot starve the renewals of
/// the others.
pub(crate) const HANDSHAKES_PER_SOURCE: usize = 16;
/// Time from accept to an authenticated node.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's headers.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the signing service until `shutdown`.
pub async fn serve(settings: ServeSettings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = CaDir::new(&settings.dir);
    let state = dir.load().with_context(|| format!("loading the CA in {}", settings.dir.display()))?;
    let td = state.trust_domain.clone();
    let registry = RegistryFile::load(&settings.registry)?;
    let placement = Placement::new(&td, &registry.workloads, None);
    let (bundle_tx, bundle_rx) = watch::channel(Arc::new(state.bundle.clone()));
    let generation = state.generation;
    let signer = Arc::new(Signer::new(state, placement, settings.policy));
    let server_cert = Arc::new(Mutex::new(issue_server_cert(&signer, &td)?));

    let current = server_cert.clone();
    let tls = tls::server_config(
        CurrentCert(Box::new(move |_| current.lock().ok().map(|c| c.1.certified.clone()))),
        bundle_rx,
        Expect::AnyNode(td.clone()),
        settings.clock_skew,
        &[b"http/1.1"],
    )?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener =
        TcpListener::bind(settings.listen).await.with_context(|| format!("listen on {}", settings.listen))?;
    tracing::info!(listen = %settings.listen, trust_domain = %td, generation, "CA signing service ready");

    let reload = tokio::spawn(reload_loop(
        dir,
        settings.registry.clone(),
        signer.clone(),
        bundle_tx,
        server_cert,
        shutdown.clone(),
    ));
    accept_loop(listener, shutdown, move |stream, handshake| {
        connection(acceptor.clone(), stream, signer.clone(), handshake)
    })
    .await;
    reload.abort();
    Ok(())
}

/// Accepts until `shutdown`, each connection on its own task, within the
/// service's limits: [`MAX_CONNECTIONS`] open at once, and
/// [`HANDSHAKES_PER_SOURCE`] unauthenticated per address (one node, or
/// anyone who can reach the port, flooding it cannot starve the others).
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, shutdown: CancellationToken, serve: F)
where
    F: Fn(tokio::net::TcpStream, crate::limits::SourcePermit) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let handshakes =
        crate::limits::PerSource::handshakes(HANDSHAKES_PER_SOURCE, MAX_CONNECTIONS, Default::default());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Bounded: a flood of connections (or slow clients) cannot exhaust
        // the service's file descriptors.
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(target: "ca", %peer, "refused connection: {MAX_CONNECTIONS} connections already open");
            continue;
        };
        let handshake = match handshakes.acquire(peer.ip()) {
            Ok(h) => h,
            Err(limit) => {
                tracing::warn!(target: "ca", %peer, reason = limit.reason(), "refused connection: too many handshakes from it");
                continue;
            }
        };
        let connection = serve(stream, handshake);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(target: "ca", %peer, "refused connection: {e}");
            }
            drop(permit);
        });
    }
}

pub(crate) fn issue_server_cert(
    signer: &Signer,
    td: &crate::identity::spiffe::TrustDomain,
) -> anyhow::Result<(Instant, Credential)> {
    let cred =
        signer.issue_credential(PeerId::CaService { trust_domain: td.clone() }, SERVER_CERT_LIFETIME)?;
    Ok((Instant::now(), cred))
}

async fn connection(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    signer: Arc<Signer>,
    handshake: crate::limits::SourcePermit,
) -> anyhow::Result<()> {
    crate::sockopt::SocketPolicy::default().apply(&stream);
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .context("TLS handshake timed out")?
        .map_err(|e| {
            let reason = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map_or_else(|| e.to_string(), |r| tls::verify::handshake_reason(r).1);
            anyhow::anyhow!("TLS handshake: {reason}")
        })?;
    let node = {
        let (_, session) = tls.get_ref();
        let cert = session.peer_certificates().and_then(|c| c.first()).context("no client certificate")?;
        match tls::verify::peer_id(cert)? {
            PeerId::Node { node, .. } => node,
            other => anyhow::bail!("{other} is not a node"),
        }
    };
    drop(handshake);
    let service = service_fn(move |req| {
        let signer = signer.clone();
        let node = node.clone();
        async move { Ok::<_, Infallible>(handle(req, &node, &signer).await) }
    });
    // A client that sends no complete request within the timeout (after
    // connecting, or between requests) is disconnected.
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await?;
    Ok(())
}

async fn handle(req: Request<Incoming>, node: &str, signer: &Signer) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, SIGN_PATH) => match read_sign_request(req).await {
            Ok(request) => sign_answer(signer, node, &request),
            Err((status, reason, message)) => {
                tracing::warn!(target: "ca", node, "certificate refused: {message}");
                error(status, reason, &message)
            }
        },
        (&Method::GET, BUNDLE_PATH) => bundle_answer(signer),
        _ => not_found(),
    }
}

pub(crate) fn not_found() -> Response<Full<Bytes>> {
    error(StatusCode::NOT_FOUND, "not_found", "POST /v1/sign, GET /v1/trust-bundle")
}

/// A sign request's body, read within [`MAX_BODY`] and parsed.
pub(crate) async fn read_sign_request(
    req: Request<Incoming>,
) -> Result<SignRequest, (StatusCode, &'static str, String)> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_REQUEST, "bad_request", format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_REQUEST, "bad_request", format!("malformed request: {e}")))
}

/// Signs for `node` (the signer logs the issuance or refusal) and answers.
pub(crate) fn sign_answer(signer: &Signer, node: &str, request: &SignRequest) -> Response<Full<Bytes>> {
    match signer.sign(node, &request.csr, Duration::from_secs(request.ttl_seconds)) {
        Ok(issued) => json(
            StatusCode::OK,
            &SignResponse {
                chain: certs_to_pem(&issued.chain),
                root: issued.root,
                trust_bundle: issued.bundle_pem,
                signing_root: issued.signing_root,
            },
        ),
        Err(e @ SignError::NotAuthorized { .. }) => error(StatusCode::FORBIDDEN, e.reason(), &e.to_string()),
        Err(e @ SignError::BadCsr(_)) => error(StatusCode::BAD_REQUEST, e.reason(), &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.reason(), &e.to_string()),
    }
}

pub(crate) fn bundle_answer(signer: &Signer) -> Response<Full<Bytes>> {
    let state = signer.state();
    json(
        StatusCode::OK,
        &BundleResponse {
            trust_bundle: state.bundle.to_pem(),
            signing_root: state.signing_root.clone(),
            generation: state.generation,
        },
    )
}

pub(crate) fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

pub(crate) fn error(status: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    json(status, &ErrorResponse { reason: reason.to_owned(), error: message.to_owned() })
}

/// Picks up rotation steps, registry changes and server-certificate renewal.
async fn reload_loop(
    dir: CaDir,
    registry: PathBuf,
    signer: Arc<Signer>,
    bundle: watch::Sender<Arc<crate::tls::verify::TrustBundle>>,
    server_cert: Arc<Mutex<(Instant, Credential)>>,
    shutdown: CancellationToken,
) {
    let mut dir_version = dir.version();
    let mut registry_version = std::fs::read(&registry).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let td = signer.state().trust_domain.clone();
        let version = dir.version();
        if version != dir_version {
            match dir.load() {
                Ok(state) => {
                    tracing::info!(target: "ca", generation = state.generation, roots = state.bundle.roots().len(), "CA state reloaded");
                    let _ = bundle.send(Arc::new(state.bundle.clone()));
                    signer.set_state(state);
                    dir_version = version;
                    refresh_server_cert(&signer, &td, &server_cert);
                }
                Err(e) => {
                    tracing::error!(target: "ca", "CA directory changed but does not load (keeping the running state): {e}")
                }
            }
        }
        let current = std::fs::read(&registry).ok();
        if current != registry_version {
            match RegistryFile::load(&registry) {
                Ok(r) => {
                    signer.set_placement(Placement::new(&td, &r.workloads, None));
                    tracing::info!(target: "ca", workloads = r.workloads.len(), "registry reloaded");
                    registry_version = current;
                }
                Err(e) => {
                    tracing::error!(target: "ca", "registry changed but does not load (keeping the running one): {e}")
                }
            }
        }
        let stale = server_cert.lock().is_ok_and(|c| c.0.elapsed() > SERVER_CERT_LIFETIME / 2);
        if stale {
            refresh_server_cert(&signer, &td, &server_cert);
        }
    }
}

pub(crate) fn refresh_server_cert(
    signer: &Signer,
    td: &crate::identity::spiffe::TrustDomain,
    slot: &Mutex<(Instant, Credential)>,
) {
    match issue_server_cert(signer, td) {
        Ok(c) => {
            if let Ok(mut s) = slot.lock() {
                *s = c;
            }
        }
        Err(e) => tracing::error!(target: "ca", "re-issuing the service certificate: {e}"),
    }
}

/// Writes a node's bootstrap credential (key 0600, chain, trust bundle) to
/// `out`: what `ztunnel run` needs to reach the signing service.
pub fn write_node_credentials(
    ca_dir: &Path,
    node: &str,
    out: &Path,
    lifetime: Duration,
) -> anyhow::Result<PathBuf> {
    let dir = CaDir::new(ca_dir);
    let state = dir.load()?;
    let td = state.trust_domain.clone();
    let bundle_pem = state.bundle.to_pem();
    let signer = Signer::new(
        state,
        Placement::default(),
        SignerPolicy { node_lifetime: lifetime, ..SignerPolicy::default() },
    );
    let cred = signer.issue_credential(PeerId::node(td, node)?, lifetime)?;
    crate::identity::node_credentials::NodeCredentialFiles::new(out).write(&cred, &bundle_pem)?;
    Ok(out.to_owned())
}
