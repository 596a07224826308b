//! TLS for the tunnel: rustls configurations that authenticate peers by
//! SPIFFE identity (not by DNS name), for HBONE between tunnels and for node
//! tunnels talking to the CA.
//!
//! Every configuration is TLS 1.3 only and disables session resumption, as
//! Istio's ztunnel does: each connection proves its identity with a full
//! handshake against the current certificates and trust bundle. No SNI is
//! sent, except to a node address several plain-host workloads share: there
//! SNI names the destination port, so the node presents that port's
//! workload's certificate (Istio never calls such an address).

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

/// The crypto provider every configuration uses: ring, with Istio ztunnel's
/// TLS 1.3 suites (AES-256-GCM, AES-128-GCM; no ChaCha20).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::ring::default_provider();
            p.cipher_suites = vec![
                rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
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
/// effect on the next handshake without touching listeners. The closure gets
/// the client's SNI, if it sent one.
pub struct CurrentCert(pub Box<CertForSni>);

/// Picks the certificate to present, given the client's SNI.
pub type CertForSni = dyn Fn(Option<&str>) -> Option<Arc<CertifiedKey>> + Send + Sync;

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        (self.0)(hello.server_name())
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

/// A client configuration presenting `cert`, requiring the server to be
/// `expect`; `sni`: whether the server name given at connect is sent.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    bundle: BundleSource,
    expect: Expect,
    skew: Duration,
    alpn: &[&[u8]],
    sni: bool,
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle, expect, skew))
        .with_client_cert_resolver(Arc::new(FixedClientCert(cert)));
    config.enable_sni = sni;
    config.resumption = Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration without a client certificate, requiring the
/// server to be `expect`: a node tunnel reaching the CA in a cluster, where it
/// authenticates with a bearer token inside the connection instead.
pub fn client_config_without_cert(
    bundle: BundleSource,
    expect: Expect,
    skew: Duration,
    alpn: &[&[u8]],
) -> Result<ClientConfig, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(SpiffeServerVerifier::new(bundle, expect, skew))
        .with_no_client_auth();
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A server configuration presenting `cert` that asks for no client
/// certificate: the CA in a cluster, whose callers authenticate with a token
/// in each request.
pub fn server_config_without_client_auth(
    cert: CurrentCert,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert));
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
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

#[cfg(test)]
mod tests {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::{verify::tests::TestCa, *};

    fn certified(cert: CertificateDer<'static>, key: &rcgen::KeyPair) -> Arc<CertifiedKey> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Arc::new(CertifiedKey::new(vec![cert], provider().key_provider.load_private_key(key).unwrap()))
    }

    /// A real handshake over loopback: returns (client result, server result).
    async fn handshake(
        server_cert: Arc<CertifiedKey>,
        client_cert: Arc<CertifiedKey>,
        bundle: BundleSource,
        client_expects: Expect,
    ) -> (Result<(), rustls::Error>, Result<(), rustls::Error>) {
        let skew = Duration::from_secs(60);
        let server = server_config(
            CurrentCert(Box::new(move |_| Some(server_cert.clone()))),
            bundle.clone(),
            Expect::TrustDomain("cluster.local".parse().unwrap()),
            skew,
            &[b"h2"],
        )
        .unwrap();
        let client = client_config(client_cert, bundle, client_expects, skew, &[b"h2"], false).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            match tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s).await {
                Ok(mut tls) => {
                    let mut b = [0u8; 4];
                    tls.read_exact(&mut b).await.map_err(rustls_error)?;
                    tls.write_all(b"pong").await.map_err(rustls_error)?;
                    tls.shutdown().await.map_err(rustls_error)
                }
                Err(e) => Err(rustls_error(e)),
            }
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client = match tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::IpAddress(addr.ip().into()), s)
            .await
        {
            Ok(mut tls) => {
                // TLS 1.3: the server checks the client certificate after the
                // client's handshake completes; data flushes the outcome.
                let _ = tls.write_all(b"ping").await;
                let mut b = [0u8; 4];
                match tls.read_exact(&mut b).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(rustls_error(e)),
                }
            }
            Err(e) => Err(rustls_error(e)),
        };
        (client, server.await.unwrap())
    }

    fn rustls_error(e: std::io::Error) -> rustls::Error {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| rustls::Error::General(e.to_string()))
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

    #[tokio::test]
    async fn mutual_tls_succeeds_between_valid_identities() {
        let ca = TestCa::new("root");
        let (sc, sk) = ca.leaf(&[DB], &[], -10, 3600);
        let (cc, ck) = ca.leaf(&[WEB], &[], -10, 3600);
        let (bundle_tx, bundle) = watch::channel(Arc::new(ca.bundle()));
        let (client, server) =
            handshake(certified(sc, &sk), certified(cc, &ck), bundle, Expect::Identity(DB.parse().unwrap()))
                .await;
        client.unwrap();
        server.unwrap();
        drop(bundle_tx);
    }

    #[tokio::test]
    async fn an_expired_server_is_refused_with_reason_expired_and_told_so() {
        let ca = TestCa::new("root");
        let (sc, sk) = ca.leaf(&[DB], &[], -7200, -3600);
        let (cc, ck) = ca.leaf(&[WEB], &[], -10, 3600);
        let (_tx, bundle) = watch::channel(Arc::new(ca.bundle()));
        let (client, server) =
            handshake(certified(sc, &sk), certified(cc, &ck), bundle, Expect::Identity(DB.parse().unwrap()))
                .await;
        assert_eq!(verify::handshake_reason(&client.unwrap_err()).0, "expired");
        // The refused side learns why from the alert.
        let (reason, detail) = verify::handshake_reason(&server.unwrap_err());
        assert!(reason.starts_with("peer_refused"), "{reason}: {detail}");
    }

    #[tokio::test]
    async fn a_server_with_the_wrong_identity_is_refused() {
        let ca = TestCa::new("root");
        let (sc, sk) = ca.leaf(&["spiffe://cluster.local/ns/shop/sa/impostor"], &[], -10, 3600);
        let (cc, ck) = ca.leaf(&[WEB], &[], -10, 3600);
        let (_tx, bundle) = watch::channel(Arc::new(ca.bundle()));
        let (client, _) =
            handshake(certified(sc, &sk), certified(cc, &ck), bundle, Expect::Identity(DB.parse().unwrap()))
                .await;
        assert_eq!(verify::handshake_reason(&client.unwrap_err()).0, "wrong_identity");
    }

    #[tokio::test]
    async fn a_client_from_an_unknown_ca_is_refused_by_the_server() {
        let (ca, rogue) = (TestCa::new("root"), TestCa::new("rogue"));
        let (sc, sk) = ca.leaf(&[DB], &[], -10, 3600);
        let (cc, ck) = rogue.leaf(&[WEB], &[], -10, 3600);
        let (_tx, bundle) = watch::channel(Arc::new(ca.bundle()));
        let (_, server) =
            handshake(certified(sc, &sk), certified(cc, &ck), bundle, Expect::Identity(DB.parse().unwrap()))
                .await;
        assert_eq!(verify::handshake_reason(&server.unwrap_err()).0, "unknown_ca");
    }
}
