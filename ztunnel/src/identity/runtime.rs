//! Builds the tunnel's identity side from configuration: the CA client
//! (embedded signer or remote service), the trust bundle, the node credential
//! and the certificate manager.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    ca_client::{CaAuth, CaClient, CaClientError, RemoteCa, read_token},
    manager::{CertManager, ManagerSettings, NodeCredential},
    node_credentials::{NodeCredentialError, NodeCredentialFiles},
    node_id::PeerId,
    spiffe::SpiffeError,
};
use crate::{
    ca::{
        signer::{Placement, Signer, SignerPolicy},
        store::{CaDir, CaError, CaState},
    },
    config::{CaSource, Config},
    metrics::Metrics,
    netns::Netns,
    tls::verify::TrustBundle,
};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity.ca.embedded.dir: {0}")]
    CaDir(#[source] CaError),
    #[error("the CA directory serves trust domain {found}, the configuration says {want}")]
    TrustDomain { found: String, want: String },
    #[error("identity.ca.remote.node_credentials: {0}")]
    NodeCredentials(#[source] NodeCredentialError),
    #[error("node name: {0}")]
    NodeName(#[source] SpiffeError),
    #[error(
        "identity.ca.trust_bundle {path}: {reason} (the CA publishes it to the ConfigMap ztunnel-trust-bundle)"
    )]
    TrustBundle { path: PathBuf, reason: String },
    #[error("identity.ca.token: {0} (a projected ServiceAccount token with the CA's audience)")]
    Token(#[source] CaClientError),
}

pub struct IdentityRuntime {
    pub manager: CertManager,
    /// The embedded signer, when the CA runs in-process.
    embedded: Option<Arc<Signer>>,
    node: String,
}

impl IdentityRuntime {
    pub fn start(
        config: &Config,
        node_netns: &Netns,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, IdentityError> {
        let id = &config.identity;
        let td = &config.trust_domain;
        let node = config.node.name.clone();
        let settings = ManagerSettings {
            lifetime: id.cert_lifetime,
            retry_initial: id.retry_initial,
            retry_max: id.retry_max,
            max_concurrent: id.max_concurrent_requests.max(1),
            bundle_refresh: id.bundle_refresh,
        };
        match &id.ca {
            CaSource::Embedded { dir } => {
                let state = match dir {
                    Some(d) => CaDir::new(d).load().map_err(IdentityError::CaDir)?,
                    None => {
                        tracing::warn!(
                            "no CA configured: using an in-memory CA whose certificates only this tunnel trusts \
                             (set identity.ca to share a CA between nodes)"
                        );
                        CaState::ephemeral(td).map_err(IdentityError::CaDir)?
                    }
                };
                if &state.trust_domain != td {
                    return Err(IdentityError::TrustDomain {
                        found: state.trust_domain.to_string(),
                        want: td.to_string(),
                    });
                }
                let (bundle_tx, _) = watch::channel(Arc::new(state.bundle.clone()));
                let placement = Placement::new(td, &config.workloads, Some(&node));
                let signer = Arc::new(Signer::new(
                    state,
                    placement,
                    SignerPolicy {
                        max_lifetime: id.cert_lifetime.max(Duration::from_secs(1)),
                        ..SignerPolicy::default()
                    },
                ));
                if let Some(d) = dir {
                    tokio::spawn(watch_ca_dir(d.clone(), signer.clone(), shutdown.clone()));
                }
                let ca = CaClient::Embedded { signer: signer.clone(), node: node.clone() };
                let manager = CertManager::start(ca, settings, bundle_tx, None, metrics, shutdown);
                Ok(Self { manager, embedded: Some(signer), node })
            }
            CaSource::Remote { address, node_credentials } => {
                let identity = PeerId::node(td.clone(), &node).map_err(IdentityError::NodeName)?;
                let files = NodeCredentialFiles::new(node_credentials);
                let (cred, bundle) = files.load(identity.clone()).map_err(IdentityError::NodeCredentials)?;
                let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
                let (node_tx, node_rx) = watch::channel(Arc::new(cred));
                let ca = CaClient::Remote(RemoteCa {
                    address: (*address).into(),
                    netns: node_netns.clone(),
                    trust_domain: td.clone(),
                    auth: CaAuth::NodeCredential(node_rx),
                    bundle: bundle_rx,
                    clock_skew: id.clock_skew,
                    timeout: Duration::from_secs(10),
                });
                let node_credential = NodeCredential { identity, sender: node_tx, files };
                let manager =
                    CertManager::start(ca, settings, bundle_tx, Some(node_credential), metrics, shutdown);
                Ok(Self { manager, embedded: None, node })
            }
            CaSource::Kubernetes { address, token, trust_bundle } => {
                let bundle = std::fs::read_to_string(trust_bundle)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| TrustBundle::from_pem(&pem).map_err(|e| e.to_string()))
                    .map_err(|reason| IdentityError::TrustBundle { path: trust_bundle.clone(), reason })?;
                // Read once here so that a missing mount fails the start;
                // every request reads it again (the kubelet rotates it).
                read_token(token).map_err(IdentityError::Token)?;
                tracing::info!(ca = %address, token = %token.display(), roots = bundle.roots().len(), "CA in the cluster: node authenticates with its ServiceAccount token");
                let (bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
                let ca = CaClient::Remote(RemoteCa {
                    address: address.clone(),
                    netns: node_netns.clone(),
                    trust_domain: td.clone(),
                    auth: CaAuth::Token(token.clone()),
                    bundle: bundle_rx,
                    clock_skew: id.clock_skew,
                    timeout: Duration::from_secs(10),
                });
                let manager = CertManager::start(ca, settings, bundle_tx, None, metrics, shutdown);
                Ok(Self { manager, embedded: None, node })
            }
        }
    }

    /// Keeps the embedded CA's node authorization in step with the
    /// configuration's workloads.
    pub fn update_placement(&self, config: &Config) {
        if let Some(signer) = &self.embedded {
            signer.set_placement(Placement::new(&config.trust_domain, &config.workloads, Some(&self.node)));
        }
    }
}

/// Picks up rotation steps in an embedded CA's directory.
async fn watch_ca_dir(dir: PathBuf, signer: Arc<Signer>, shutdown: CancellationToken) {
    let dir = CaDir::new(&dir);
    let mut version = dir.version();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = dir.version();
        if now == version {
            continue;
        }
        match dir.load() {
            Ok(state) => {
                tracing::info!(generation = state.generation, "embedded CA reloaded");
                signer.set_state(state);
                version = now;
            }
            Err(e) => {
                tracing::error!("CA directory changed but does not load (keeping the running state): {e}")
            }
        }
    }
}
