//! TLS for the tunnel: rustls configurations that authenticate peers by
//! SPIFFE identity (not by DNS name), for HBONE between tunnels and for node
//! tunnels talking to the CA.
//!
//! Every configuration is TLS 1.3 only, sends no SNI and disables session
//! resumption, as Istio's ztunnel does: each connection proves its identity
//! with a full handshake against the current certificates and trust bundle.

pub mod verify;

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::Duration,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    server::{
        ClientHello, NoServerSessionStorage, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::sync::watch;

use self::verify::{Expect, TrustBundle, verify_peer};

/// The crypto provider every configuration uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// The current trust bundle; replaced as a whole when roots change.
pub type BundleSource = watch::Receiver<Arc<TrustBundle>>;

/// Verifies a server (the callee, or the CA) by SPIFFE identity.
pub struct SpiffeServerVerifier {
    bundle: BundleSource,
    expect: Expect,
    skew: Duration,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: BundleSource, expect: Expect, skew: Duration) -> Arc<Self> {
        Arc::new(Self { bundle, expect, skew })
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeServerVerifier({:?})", self.expect)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.borrow().clone();
        verify_peer(end_entity, intermediates, &bundle, &self.expect, now, self.skew)
            .map(|_| ServerCertVerified::assertion())
            .map_err(verify::VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies clients (callers, or nodes at the CA) by SPIFFE identity. A
/// client certificate is mandatory.
pub struct SpiffeClientVerifier {
    bundle: BundleSource,
    expect: Expect,
    skew: Duration,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: BundleSource, expect: Expect, skew: Duration) -> Arc<Self> {
        Arc::new(Self { bundle, expect, skew })
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeClientVerifier({:?})", self.expect)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.borrow().clone();
        verify_peer(end_entity, intermediates, &bundle, &self.expect, now, self.skew)
            .map(|_| ClientCertVerified::assertion())
            .map_err(verify::VerifyError::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Presents whatever certificate the source currently holds, so renewals take
/// effect on the next handshake without touching listeners.
pub struct CurrentCert(pub Box<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client configuration presenting `cert`, requiring the server to be `expect`.
pub fn client_config(

    cert: Arc<CertifiedKey>,
    bundle: BundleSource,
    expect: Expect,
    skew: Duration,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle, expect, skew))
        .with_client_cert_resolver(Arc::new(FixedClientCert(cert)));
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server configuration presenting `cert`, requiring clients to be `expect`.
pub fn server_config(
    cert: CurrentCert,
    bundle: BundleSource,
    expect: Expect,
    skew: Duration,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(SpiffeClientVerifier::new(bundle, expect, skew))
        .with_cert_resolver(Arc::new(cert));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
