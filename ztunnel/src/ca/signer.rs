//! Signing with node authorization: a node gets a certificate for an identity
//! only if a workload with that identity is placed on that node. The same
//! code serves `ztunnel ca serve` and the CA embedded in `ztunnel run`.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

use super::store::{CaState, random_serial};
use crate::{
    config::WorkloadConfig,
    identity::{cert::Credential, node_id::PeerId, spiffe::SpiffeId},
};

/// Which identities live on which nodes.
#[derive(Debug, Default)]
pub struct Placement {
    nodes_by_identity: HashMap<SpiffeId, BTreeSet<String>>,
    /// Every node with a workload.
    nodes: BTreeSet<String>,
}

impl Placement {
    /// From workload entries; `default_node` places entries without `node`.
    pub fn new<'a>(
        trust_domain: &crate::identity::spiffe::TrustDomain,
        workloads: impl IntoIterator<Item = &'a WorkloadConfig>,
        default_node: Option<&str>,
    ) -> Self {
        let mut nodes_by_identity: HashMap<SpiffeId, BTreeSet<String>> = HashMap::new();
        let mut nodes = BTreeSet::new();
        for w in workloads {
            let Ok(id) = w.spiffe_id(trust_domain) else { continue };
            if let Some(node) = w.node.as_deref().or(default_node) {
                nodes_by_identity.entry(id).or_default().insert(node.to_owned());
                nodes.insert(node.to_owned());
            }
        }
        Self { nodes_by_identity, nodes }
    }

    /// Whether `node` is in the mesh (has a workload) now.
    pub fn has_node(&self, node: &str) -> bool {
        self.nodes.contains(node)
    }

    pub fn is_placed(&self, id: &SpiffeId, node: &str) -> bool {
        self.nodes_by_identity.get(id).is_some_and(|n| n.contains(node))
    }
}

/// Node authorization: which identities a node may obtain. From a
/// registry ([`Placement`]) or, in a cluster, from the pods running on the
/// node (`ca::kubernetes::pods`).
pub trait NodeAuthorizer: Send + Sync {
    /// Ok when a workload with `id` is on `node` now; else why not.
    fn workload(&self, id: &SpiffeId, node: &str) -> Result<(), String>;
    /// Ok when `node` may renew its own node credential; else why not.
    fn node_credential(&self, node: &str) -> Result<(), String>;
}

impl NodeAuthorizer for Placement {
    fn workload(&self, id: &SpiffeId, node: &str) -> Result<(), String> {
        if self.is_placed(id, node) {
            Ok(())
        } else {
            Err("no workload with this identity is placed on the node".into())
        }
    }

    // A node taken out of the registry keeps nothing: its credential lapses
    // instead of renewing forever.
    fn node_credential(&self, node: &str) -> Result<(), String> {
        if self.has_node(node) { Ok(()) } else { Err("the node is no longer in the registry".into()) }
    }
}

/// Why a signing request was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignError {
    #[error("malformed CSR: {0}")]
    BadCsr(String),
    #[error("node `{node}` may not obtain `{identity}`: {reason}")]
    NotAuthorized { node: String, identity: String, reason: String },
    #[error("CA failure: {0}")]
    Internal(String),
}

impl SignError {
    pub fn reason(&self) -> &'static str {
        match self {
            SignError::BadCsr(_) => "bad_csr",
            SignError::NotAuthorized { .. } => "not_authorized",
            SignError::Internal(_) => "ca_failure",
        }
    }
}

/// The identity a CSR asks for (its one URI SAN), for log lines about
/// requests refused before signing.
pub fn csr_identity(csr_pem: &str) -> Option<String> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).ok()?;
    csr.params.subject_alt_names.iter().find_map(|s| match s {
        SanType::URI(u) => Some(u.as_str().to_owned()),
        _ => None,
    })
}

/// A signed chain and what a node needs to trust its peers.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf, then intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Fingerprint of the root the chain leads to.
    pub root: String,
    pub bundle_pem: String,
    /// Fingerprint of the root that signs now (nodes renew early when their
    /// certificates lead to another one: the rotation drill's re-issue step).
    pub signing_root: String,
}

/// Limits on what the signer issues.
#[derive(Debug, Clone, Copy)]
pub struct SignerPolicy {
    /// Workload certificates live at most this long, whatever is requested.
    pub max_lifetime: Duration,
    /// Node credentials (for reaching the CA) live this long.
    pub node_lifetime: Duration,
    /// Leaves are valid from this long before issuance, absorbing small clock
    /// differences between CA and peers.
    pub backdate: Duration,
}

impl Default for SignerPolicy {
    fn default() -> Self {
        Self {
            max_lifetime: Duration::from_secs(24 * 3600),
            node_lifetime: Duration::from_secs(7 * 24 * 3600),
            backdate: Duration::from_secs(60),
        }
    }
}

pub struct Signer {
    state: RwLock<Arc<CaState>>,
    placement: RwLock<Arc<dyn NodeAuthorizer>>,
    policy: SignerPolicy,
}

impl Signer {
    pub fn new(state: CaState, placement: Placement, policy: SignerPolicy) -> Self {
        Self::with_authorizer(state, Arc::new(placement), policy)
    }

    pub fn with_authorizer(
        state: CaState,
        authorizer: Arc<dyn NodeAuthorizer>,
        policy: SignerPolicy,
    ) -> Self {
        Self { state: RwLock::new(Arc::new(state)), placement: RwLock::new(authorizer), policy }
    }

    pub fn state(&self) -> Arc<CaState> {
        self.state.read().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_state(&self, state: CaState) {
        match self.state.write() {
            Ok(mut s) => *s = Arc::new(state),
            Err(p) => *p.into_inner() = Arc::new(state),
        }
    }

    pub fn set_placement(&self, placement: Placement) {
        let placement: Arc<dyn NodeAuthorizer> = Arc::new(placement);
        match self.placement.write() {
            Ok(mut p) => *p = placement,
            Err(p) => *p.into_inner() = placement,
        }
    }

    fn placement(&self) -> Arc<dyn NodeAuthorizer> {
        self.placement.read().map(|s| s.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Signs `csr_pem` for `node`, if the node may hold the identity it asks
    /// for. Every issuance and refusal is logged with node, identity, reason.
    pub fn sign(&self, node: &str, csr_pem: &str, requested: Duration) -> Result<Issued, SignError> {
        let result = self.try_sign(node, csr_pem, requested);
        match &result {
            Ok((identity, issued, not_after)) => tracing::info!(
                target: "ca",
                node,
                identity = %identity,
                not_after = %humantime::format_rfc3339_seconds(*not_after),
                root = %issued.root,
                "certificate issued"
            ),
            Err((identity, e)) => tracing::warn!(
                target: "ca",
                node,
                identity = identity.as_deref().unwrap_or("-"),
                reason = e.reason(),
                "certificate refused: {e}"
            ),
        }
        result.map(|(_, issued, _)| issued).map_err(|(_, e)| e)
    }

    #[allow(clippy::type_complexity)]
    fn try_sign(
        &self,
        node: &str,
        csr_pem: &str,
        requested: Duration,
    ) -> Result<(PeerId, Issued, SystemTime), (Option<String>, SignError)> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| (None, SignError::BadCsr(e.to_string())))?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|s| if let SanType::URI(u) = s { Some(u.as_str()) } else { None })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err((None, SignError::BadCsr(format!("needs exactly one URI SAN, has {}", uris.len()))));
        };
        let identity: PeerId = uri.parse().map_err(|e: crate::identity::spiffe::SpiffeError| {
            (Some(uri.to_string()), SignError::BadCsr(e.to_string()))
        })?;
        let state = self.state();
        let lifetime = self
            .authorize(node, &identity, &state, requested)
            .map_err(|e| (Some(identity.to_string()), e))?;
        let (chain, not_after) = self
            .issue(&state, &identity, &csr.public_key, lifetime)
            .map_err(|e| (Some(identity.to_string()), e))?;
        let issued = Issued {
            chain,
            root: state.signing_root.clone(),
            bundle_pem: state.bundle.to_pem(),
            signing_root: state.signing_root.clone(),
        };
        Ok((identity, issued, not_after))
    }

    /// Node authorization. Returns the lifetime to issue.
    fn authorize(
        &self,
        node: &str,
        identity: &PeerId,
        state: &CaState,
        requested: Duration,
    ) -> Result<Duration, SignError> {
        let refuse = |reason: String| SignError::NotAuthorized {
            node: node.to_owned(),
            identity: identity.to_string(),
            reason,
        };
        if identity.trust_domain() != &state.trust_domain {
            return Err(refuse(format!("this CA serves trust domain {}", state.trust_domain)));
        }
        match identity {
            PeerId::Workload(id) => self
                .placement()
                .workload(id, node)
                .map(|()| requested.clamp(Duration::from_secs(1), self.policy.max_lifetime))
                .map_err(refuse),
            PeerId::Node { node: wanted, .. } if wanted == node => {
                self.placement().node_credential(node).map(|()| self.policy.node_lifetime).map_err(refuse)
            }
            PeerId::Node { .. } => Err(refuse("a node may renew only its own node credential".into())),
            PeerId::CaService { .. } => Err(refuse("the CA's own identity is never issued to nodes".into())),
        }
    }

    fn issue(
        &self,
        state: &CaState,
        identity: &PeerId,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime), SignError> {
        let now = crate::clock::now();
        let not_after = now
            .checked_add(lifetime)
            .ok_or_else(|| SignError::Internal(format!("a lifetime of {lifetime:?} is not a time")))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        // Backdating absorbs clock differences, but must not dominate a short
        // certificate (10 s certificates would otherwise renew every 35 s).
        p.not_before = (now - self.policy.backdate.min(lifetime / 10)).into();
        p.not_after = not_after.into();
        p.serial_number = Some(random_serial().map_err(SignError::Internal)?);
        let uri =
            identity.to_string().try_into().map_err(|e: rcgen::Error| SignError::Internal(e.to_string()))?;
        p.subject_alt_names = vec![SanType::URI(uri)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(public_key, &state.issuer).map_err(|e| SignError::Internal(e.to_string()))?;
        let mut chain = Vec::with_capacity(1 + state.chain.len());
        chain.push(leaf.der().clone());
        chain.extend(state.chain.iter().cloned());
        Ok((chain, not_after))
    }

    /// A credential issued directly (key made here): the signing service's
    /// own TLS identity, and node bootstrap credentials (`ca node-cert`).
    pub fn issue_credential(&self, identity: PeerId, lifetime: Duration) -> Result<Credential, SignError> {
        let state = self.state();
        let key = crate::identity::cert::new_key().map_err(|e| SignError::Internal(e.to_string()))?;
        let (chain, _) = self.issue(&state, &identity, &key, lifetime)?;
        Credential::new(identity, &key, chain, state.signing_root.clone())
            .map_err(|e| SignError::Internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::UnixTime;

    use super::*;
    use crate::{
        ca::store::{CaDir, CaLifetimes},
        config::WorkloadConfig,
        identity::cert::{csr_pem, new_key},
        tls::verify::{Expect, verify_peer},
    };

    fn workload(name: &str, node: &str) -> WorkloadConfig {
        serde_yaml_ng::from_str(&format!(
            "name: {name}\nnamespace: shop\nservice_account: {name}\nnode: {node}\n"
        ))
        .unwrap()
    }

    fn signer(max_lifetime: Duration) -> (tempfile::TempDir, Signer) {
        let tmp = tempfile::tempdir().unwrap();
        let ca = CaDir::new(tmp.path());
        ca.init(&"cluster.local".parse().unwrap(), false, CaLifetimes::default()).unwrap();
        let state = ca.load().unwrap();
        let placement =
            Placement::new(&state.trust_domain, &[workload("web", "node-a"), workload("db", "node-b")], None);
        let policy = SignerPolicy { max_lifetime, ..SignerPolicy::default() };
        (tmp, Signer::new(state, placement, policy))
    }

    fn csr(uri: &str) -> String {
        csr_pem(&new_key().unwrap(), &uri.parse().unwrap()).unwrap()
    }

    #[test]
    fn a_node_gets_its_own_workloads_certificates_and_nothing_else() {
        let (_tmp, s) = signer(Duration::from_secs(3600));
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let issued = s.sign("node-a", &csr(web), Duration::from_secs(600)).unwrap();
        // The chain verifies against the bundle and names exactly the workload.
        let bundle = s.state().bundle.clone();
        let peer = verify_peer(
            &issued.chain[0],
            &issued.chain[1..],
            &bundle,
            &Expect::Identity(web.parse().unwrap()),
            UnixTime::now(),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(peer.to_string(), web);

        let refusals = [
            (
                "node-a",
                "spiffe://cluster.local/ns/shop/sa/db",
                "no workload with this identity is placed on the node",
            ),
            ("node-b", web, "no workload with this identity is placed on the node"),
            ("node-a", "spiffe://other.domain/ns/shop/sa/web", "this CA serves trust domain cluster.local"),
            ("node-a", "spiffe://cluster.local/ztunnel/node/node-b", "only its own node credential"),
            ("node-a", "spiffe://cluster.local/ztunnel/ca", "never issued"),
        ];
        for (node, uri, why) in refusals {
            let err = s.sign(node, &csr(uri), Duration::from_secs(600)).unwrap_err();
            assert_eq!(err.reason(), "not_authorized", "{node} {uri}: {err}");
            assert!(err.to_string().contains(why), "{node} {uri}: {err}");
        }
        assert!(s.sign("node-a", &csr("spiffe://cluster.local/ztunnel/node/node-a"), Duration::ZERO).is_ok());
        assert_eq!(s.sign("node-a", "not a csr", Duration::ZERO).unwrap_err().reason(), "bad_csr");
    }

    #[test]
    fn lifetimes_are_capped_and_leaves_are_not_cas() {
        let (_tmp, s) = signer(Duration::from_secs(120));
        let issued = s
            .sign("node-a", &csr("spiffe://cluster.local/ns/shop/sa/web"), Duration::from_secs(86400))
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let v = cert.validity();
        let lifetime = v.not_after.timestamp() - v.not_before.timestamp();
        assert!(lifetime <= 120 + 60 + 1, "capped at max_lifetime plus the 60 s backdate: {lifetime}");
        assert!(!cert.is_ca());
        let sans = cert.subject_alternative_name().unwrap().unwrap().value.general_names.len();
        assert_eq!(sans, 1, "the SPIFFE ID is the only SAN");
    }
}
