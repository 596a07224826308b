//! Peer certificate verification for SPIFFE identities.
//!
//! A peer is accepted when its chain leads to a root of the trust bundle, it
//! is valid now (within a small clock-skew allowance), and it carries exactly
//! one URI SAN that is the identity we expect. Every refusal has a typed
//! reason, because "TLS handshake failed" explains nothing to an operator.

use std::{fmt, sync::Arc, time::Duration};

use rustls::{CertificateError, OtherError};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::identity::{
    node_id::PeerId,
    spiffe::{SpiffeId, TrustDomain},
};

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("certificate expired at {not_after} (now {now})")]
    Expired { not_after: String, now: String },
    #[error("certificate not valid before {not_before} (now {now}): clock skew?")]
    NotYetValid { not_before: String, now: String },
    #[error("certificate is not issued by a CA in the trust bundle")]
    UnknownCa,
    #[error("certificate has no SPIFFE ID (exactly one URI SAN is required)")]
    NoSpiffeId,
    #[error("certificate's SPIFFE ID is invalid: {0}")]
    InvalidSpiffeId(String),
    #[error("peer is in trust domain `{found}`, not `{want}`")]
    WrongTrustDomain { found: String, want: String },
    #[error("peer is `{found}`, expected `{want}`")]
    WrongIdentity { found: String, want: String },
    #[error("no certificate presented")]
    NoCertificate,
    #[error("bad certificate: {0}")]
    BadCertificate(String),
}

impl VerifyError {
    /// The reason as it appears in logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Expired { .. } => "expired",
            VerifyError::NotYetValid { .. } => "not_yet_valid",
            VerifyError::UnknownCa => "unknown_ca",
            VerifyError::NoSpiffeId => "no_spiffe_id",
            VerifyError::InvalidSpiffeId(_) => "invalid_spiffe_id",
            VerifyError::WrongTrustDomain { .. } => "wrong_trust_domain",
            VerifyError::WrongIdentity { .. } => "wrong_identity",
            VerifyError::NoCertificate => "no_certificate",
            VerifyError::BadCertificate(_) => "bad_certificate",
        }
    }

    /// The rustls error that carries this reason through a handshake. The
    /// standard variants make rustls send the matching alert to the peer
    /// (certificate_expired, unknown_ca, ...); the reason itself rides along.
    pub fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }

    /// Recovers the reason from a failed handshake's error, if it was ours.
    pub fn from_rustls(e: &rustls::Error) -> Option<VerifyError> {
        match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<VerifyError>().cloned()
            }
            _ => None,
        }
    }
}

/// What the peer must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this workload identity (a client verifying its server).
    Identity(SpiffeId),
    /// Any workload in this trust domain (a server verifying its clients;
    /// policy decides the rest).
    TrustDomain(TrustDomain),
    /// A node tunnel of this trust domain (the CA verifying nodes).
    AnyNode(TrustDomain),
    /// The signing service of this trust domain (nodes verifying the CA).
    CaService(TrustDomain),
}

/// The roots a tunnel trusts; several at once during a root rotation.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.len())
    }
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, VerifyError> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| VerifyError::BadCertificate(format!("trust bundle root: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { roots, anchors })
    }

    pub fn from_pem(pem: &str) -> Result<Self, VerifyError> {
        Self::new(crate::identity::cert::certs_from_pem(pem).map_err(VerifyError::BadCertificate)?)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn to_pem(&self) -> String {
        crate::identity::cert::certs_to_pem(&self.roots)
    }

    /// SHA-256 fingerprints of the roots, short form, for operators.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| crate::identity::cert::fingerprint(r)).collect()
    }
}

/// Verifies a peer's chain against `bundle` at `now`, allowing `skew` of
/// clock difference either way, and checks it is `expect`. Returns the peer's
/// identity.
pub fn verify_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    expect: &Expect,
    now: UnixTime,
    skew: Duration,
) -> Result<PeerId, VerifyError> {
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| VerifyError::BadCertificate(e.to_string()))?;
    let algs = webpki::ALL_VERIFICATION_ALGS;
    let usage = match expect {
        Expect::Identity(_) | Expect::CaService(_) => webpki::KeyUsage::server_auth(),
        Expect::TrustDomain(_) | Expect::AnyNode(_) => webpki::KeyUsage::client_auth(),
    };
    let verify = |at: UnixTime| {
        cert.verify_for_usage(algs, &bundle.anchors, intermediates, at, usage, None, None).map(|_| ())
    };
    let mut result = verify(now);
    // Within the skew allowance, a certificate just issued by a CA whose
    // clock runs ahead, or just expired by ours, still counts as valid.
    match &result {
        Err(webpki::Error::CertNotValidYet { .. }) => {
            let later = Duration::from_secs(now.as_secs()) + skew;
            result = verify(UnixTime::since_unix_epoch(later)).or(result);
        }
        Err(webpki::Error::CertExpired { .. }) => {
            let earlier = Duration::from_secs(now.as_secs()).saturating_sub(skew);
            result = verify(UnixTime::since_unix_epoch(earlier)).or(result);
        }
        _ => {}
    }
    result.map_err(|e| from_webpki(e, end_entity, now))?;
    let peer = peer_id(end_entity)?;
    check_expected(&peer, expect)?;
    Ok(peer)
}

fn check_expected(peer: &PeerId, expect: &Expect) -> Result<(), VerifyError> {
    let wrong_td = |found: &TrustDomain, want: &TrustDomain| VerifyError::WrongTrustDomain {
        found: found.to_string(),
        want: want.to_string(),
    };
    let wrong = |want: String| VerifyError::WrongIdentity { found: peer.to_string(), want };
    match (expect, peer) {
        (Expect::Identity(want), PeerId::Workload(found)) => {
            if found.trust_domain() != want.trust_domain() {
                Err(wrong_td(found.trust_domain(), want.trust_domain()))
            } else if found != want {
                Err(wrong(want.to_string()))
            } else {
                Ok(())
            }
        }
        (Expect::TrustDomain(want), PeerId::Workload(found)) => {
            if found.trust_domain() == want {
                Ok(())
            } else {
                Err(wrong_td(found.trust_domain(), want))
            }
        }
        (Expect::AnyNode(want), PeerId::Node { trust_domain, .. })
        | (Expect::CaService(want), PeerId::CaService { trust_domain }) => {
            if trust_domain == want {
                Ok(())
            } else {
                Err(wrong_td(trust_domain, want))
            }
        }
        (Expect::Identity(want), _) => Err(wrong(want.to_string())),
        (Expect::TrustDomain(want), _) => Err(wrong(format!("a workload of {want}"))),
        (Expect::AnyNode(want), _) => Err(wrong(format!("a node of {want}"))),
        (Expect::CaService(want), _) => Err(wrong(format!("the CA of {want}"))),
    }
}

fn from_webpki(e: webpki::Error, cert: &CertificateDer<'_>, now: UnixTime) -> VerifyError {
    let at = |secs: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string()
    };
    let (not_before, not_after) = validity(cert).unwrap_or((0, 0));
    match e {
        webpki::Error::CertExpired { .. } => {
            VerifyError::Expired { not_after: at(not_after), now: at(now.as_secs()) }
        }
        webpki::Error::CertNotValidYet { .. } => {
            VerifyError::NotYetValid { not_before: at(not_before), now: at(now.as_secs()) }
        }
        webpki::Error::UnknownIssuer
        | webpki::Error::InvalidSignatureForPublicKey
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | webpki::Error::CaUsedAsEndEntity
        | webpki::Error::EndEntityUsedAsCa => VerifyError::UnknownCa,
        other => VerifyError::BadCertificate(other.to_string()),
    }
}

/// The fingerprint of the root in `bundle` that `chain` leads to, if any.
pub fn root_of(chain: &[CertificateDer<'_>], bundle: &TrustBundle) -> Option<String> {
    let (leaf, intermediates) = chain.split_first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let (not_before, _) = validity(leaf)?;
    let at = UnixTime::since_unix_epoch(Duration::from_secs(not_before + 1));
    bundle.roots.iter().zip(&bundle.anchors).find_map(|(root, anchor)| {
        let anchors = [anchor.clone()];
        let usage = webpki::KeyUsage::client_auth();
        cert.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, intermediates, at, usage, None, None)
            .ok()
            .map(|_| crate::identity::cert::fingerprint(root))
    })
}

/// (not_before, not_after) as Unix seconds.
pub fn validity(cert: &CertificateDer<'_>) -> Option<(u64, u64)> {
    let (_, x) = X509Certificate::from_der(cert).ok()?;
    let v = x.validity();
    Some((v.not_before.timestamp().max(0) as u64, v.not_after.timestamp().max(0) as u64))
}

/// When a certificate expires.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<std::time::SystemTime> {
    validity(cert).map(|(_, t)| std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
}

/// The single URI SAN of a certificate, parsed as a SPIFFE identity.
pub fn peer_id(cert: &CertificateDer<'_>) -> Result<PeerId, VerifyError> {
    let (_, x) = X509Certificate::from_der(cert).map_err(|e| VerifyError::BadCertificate(e.to_string()))?;
    let mut uris = Vec::new();
    for ext in x.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [uri] => uri.parse::<PeerId>().map_err(|e| VerifyError::InvalidSpiffeId(e.to_string())),
        _ => Err(VerifyError::NoSpiffeId),
    }
}

/// Maps a handshake failure to its reason, for the access log and metrics.
/// A refused handshake, typed: the reason, the text, and the peer
/// certificate's problem when that was the cause.
pub fn rustls_failure(e: &rustls::Error) -> (&'static str, String, Option<VerifyError>) {
    let (reason, error) = handshake_reason(e);
    (reason, error, VerifyError::from_rustls(e))
}

/// [`rustls_failure`] for the I/O error a TLS stream's handshake returned;
/// `fallback` is the reason when TLS itself did not fail (the peer went away,
/// or spoke something else).
pub fn handshake_failure(
    e: &std::io::Error,
    fallback: &'static str,
) -> (&'static str, String, Option<VerifyError>) {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(refused) => rustls_failure(refused),
        None => (fallback, e.to_string(), None),
    }
}

pub fn handshake_reason(e: &rustls::Error) -> (&'static str, String) {
    if let Some(v) = VerifyError::from_rustls(e) {
        return (v.reason(), v.to_string());
    }
    let reason = match e {
        rustls::Error::AlertReceived(a) => match a {
            rustls::AlertDescription::CertificateExpired => "peer_refused_expired",
            rustls::AlertDescription::UnknownCA => "peer_refused_unknown_ca",
            rustls::AlertDescription::BadCertificate | rustls::AlertDescription::CertificateUnknown => {
                "peer_refused_certificate"
            }
            rustls::AlertDescription::CertificateRequired => "peer_requires_certificate",
            rustls::AlertDescription::NoApplicationProtocol => "no_alpn",
            _ => "peer_alert",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::PeerIncompatible(_) | rustls::Error::PeerMisbehaved(_) => "protocol_mismatch",
        rustls::Error::InvalidMessage(_) => "not_tls",
        _ => "tls_error",
    };
    (reason, e.to_string())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::SystemTime;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
        Issuer, KeyPair, KeyUsagePurpose, SanType,
    };

    use super::*;
    use crate::identity::cert::new_key;

    /// A CA for crafting test certificates.
    pub(crate) struct TestCa {
        pub root: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let key = new_key().unwrap();
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, name);
            p.distinguished_name = dn;
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            let root = p.self_signed(&key).unwrap().der().clone();
            Self { root, issuer: Issuer::new(p, key) }
        }

        pub(crate) fn bundle(&self) -> TrustBundle {
            TrustBundle::new(vec![self.root.clone()]).unwrap()
        }

        /// A leaf with these URIs (and DNS names), valid in [from, to] relative to now.
        pub(crate) fn leaf(
            &self,
            uris: &[&str],
            dns: &[&str],
            from: i64,
            to: i64,
        ) -> (CertificateDer<'static>, KeyPair) {
            let key = new_key().unwrap();
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            let now = SystemTime::now();
            let at = |s: i64| {
                if s >= 0 {
                    now + Duration::from_secs(s as u64)
                } else {
                    now - Duration::from_secs((-s) as u64)
                }
            };
            p.not_before = at(from).into();
            p.not_after = at(to).into();
            p.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .chain(dns.iter().map(|d| SanType::DnsName((*d).try_into().unwrap())))
                .collect();
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            (p.signed_by(&key, &self.issuer).unwrap().der().clone(), key)
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn expect_web() -> Expect {
        Expect::Identity(WEB.parse().unwrap())
    }

    fn check(ca: &TestCa, cert: &CertificateDer<'_>, expect: &Expect) -> Result<PeerId, VerifyError> {
        verify_peer(cert, &[], &ca.bundle(), expect, UnixTime::now(), Duration::from_secs(60))
    }

    #[test]
    fn a_valid_peer_is_accepted_and_named() {
        let ca = TestCa::new("root");
        let (cert, _) = ca.leaf(&[WEB], &[], -10, 3600);
        assert_eq!(check(&ca, &cert, &expect_web()).unwrap().to_string(), WEB);
        let td = Expect::TrustDomain("cluster.local".parse().unwrap());
        assert_eq!(check(&ca, &cert, &td).unwrap().to_string(), WEB);
    }

    #[test]
    fn each_failure_has_its_own_reason() {
        let ca = TestCa::new("root");
        let other_ca = TestCa::new("someone else's root");
        let cases: Vec<(&str, CertificateDer<'static>, Expect, &str)> = vec![
            ("expired an hour ago", ca.leaf(&[WEB], &[], -7200, -3600).0, expect_web(), "expired"),
            ("valid only from in an hour", ca.leaf(&[WEB], &[], 3600, 7200).0, expect_web(), "not_yet_valid"),
            ("issued by an unknown CA", other_ca.leaf(&[WEB], &[], -10, 3600).0, expect_web(), "unknown_ca"),
            (
                "a DNS name, no SPIFFE ID",
                ca.leaf(&[], &["web.shop"], -10, 3600).0,
                expect_web(),
                "no_spiffe_id",
            ),
            (
                "two URI SANs",
                ca.leaf(&[WEB, "spiffe://cluster.local/ns/shop/sa/db"], &[], -10, 3600).0,
                expect_web(),
                "no_spiffe_id",
            ),
            (
                "a URI that is no SPIFFE ID",
                ca.leaf(&["https://web.shop/"], &[], -10, 3600).0,
                expect_web(),
                "invalid_spiffe_id",
            ),
            (
                "another trust domain",
                ca.leaf(&["spiffe://evil.example/ns/shop/sa/web"], &[], -10, 3600).0,
                expect_web(),
                "wrong_trust_domain",
            ),
            (
                "another workload",
                ca.leaf(&["spiffe://cluster.local/ns/shop/sa/db"], &[], -10, 3600).0,
                expect_web(),
                "wrong_identity",
            ),
            (
                "a client from another trust domain",
                ca.leaf(&["spiffe://evil.example/ns/a/sa/b"], &[], -10, 3600).0,
                Expect::TrustDomain("cluster.local".parse().unwrap()),
                "wrong_trust_domain",
            ),
            (
                "a node where a workload is expected",
                ca.leaf(&["spiffe://cluster.local/ztunnel/node/n1"], &[], -10, 3600).0,
                expect_web(),
                "wrong_identity",
            ),
        ];
        for (what, cert, expect, reason) in cases {
            let err = check(&ca, &cert, &expect).unwrap_err();
            assert_eq!(err.reason(), reason, "{what}: {err}");
        }
    }

    #[test]
    fn small_clock_skew_is_tolerated_either_way() {
        let ca = TestCa::new("root");
        // Issued by a CA whose clock runs 30 s ahead; expired 30 s ago by ours.
        assert!(check(&ca, &ca.leaf(&[WEB], &[], 30, 3600).0, &expect_web()).is_ok());
        assert!(check(&ca, &ca.leaf(&[WEB], &[], -3600, -30).0, &expect_web()).is_ok());
        // Beyond the allowance.
        assert_eq!(
            check(&ca, &ca.leaf(&[WEB], &[], 120, 3600).0, &expect_web()).unwrap_err().reason(),
            "not_yet_valid"
        );
        assert_eq!(
            check(&ca, &ca.leaf(&[WEB], &[], -3600, -120).0, &expect_web()).unwrap_err().reason(),
            "expired"
        );
    }

    #[test]
    fn a_bundle_with_two_roots_trusts_both() {
        let (old, new) = (TestCa::new("old"), TestCa::new("new"));
        let bundle = TrustBundle::new(vec![old.root.clone(), new.root.clone()]).unwrap();
        for ca in [&old, &new] {
            let (cert, _) = ca.leaf(&[WEB], &[], -10, 3600);
            verify_peer(&cert, &[], &bundle, &expect_web(), UnixTime::now(), Duration::ZERO).unwrap();
        }
    }
}
