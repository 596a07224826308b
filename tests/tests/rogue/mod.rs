// Shared by several test files, each using a part of it.
#![allow(dead_code)]

//! Rogue peers for the HBONE tests: a "tunnel" presenting crafted
//! certificates, and a client that speaks HBONE (or not) however a test
//! wants. Built from ztunnel's own TLS and HTTP/2 pieces, run inside the
//! testbed's namespaces on real sockets.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::watch;
use ztunnel::{
    ca::store::{CaDir, CaState},
    identity::cert::new_key,
    tls::{self, CurrentCert, verify::Expect, verify::TrustBundle},
};

/// A CA to craft certificates with: the testbed's own, or a stranger.
pub struct Crafter {
    state: CaState,
}

impl Crafter {
    pub fn testbed(ca_dir: &std::path::Path) -> Self {
        Self { state: CaDir::new(ca_dir).load().expect("testbed CA") }
    }

    pub fn stranger() -> Self {
        Self { state: CaState::ephemeral(&"cluster.local".parse().expect("td")).expect("CA") }
    }

    pub fn bundle(&self) -> TrustBundle {
        self.state.bundle.clone()
    }

    /// A leaf for `uri`, valid from `from` to `to` seconds relative to now.
    pub fn leaf(&self, uri: &str, from: i64, to: i64) -> Arc<CertifiedKey> {
        self.leaf_with(vec![SanType::URI(uri.try_into().expect("uri"))], from, to)
    }

    /// A leaf with exactly these subject alternative names.
    pub fn leaf_with(&self, sans: Vec<SanType>, from: i64, to: i64) -> Arc<CertifiedKey> {
        let key = new_key().expect("key");
        let now = SystemTime::now();
        let at = |s: i64| {
            if s >= 0 { now + Duration::from_secs(s as u64) } else { now - Duration::from_secs((-s) as u64) }
        };
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.not_before = at(from).into();
        p.not_after = at(to).into();
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        let leaf = p.signed_by(&key, &self.state.issuer).expect("sign");
        let chain: Vec<_> =
            std::iter::once(leaf.der().clone()).chain(self.state.chain.iter().cloned()).collect();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = tls::provider().key_provider.load_private_key(der).expect("key");
        Arc::new(CertifiedKey::new(chain, signing))
    }
}

/// A fake tunnel on `addr` inside `netns`: completes mTLS with `cert` and
/// answers every CONNECT with 200 (echoing the stream). Stops when dropped.
pub struct RogueServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RogueServer {
    pub fn start(netns: &str, addr: SocketAddr, cert: Arc<CertifiedKey>, bundle: TrustBundle) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/var/run/netns/{netns}");
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                // The previous rogue on this address may still be letting go
                // of it on a loaded machine.
                let mut attempts = 0;
                let listener = loop {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => break l,
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempts < 40 => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("bind rogue server {addr}: {e}"),
                    }
                };
                let _ = ready_tx.send(());
                let (_bundle_tx, bundle_rx) = watch::channel(Arc::new(bundle));
                let config = tls::server_config(
                    CurrentCert(Box::new(move |_| Some(cert.clone()))),
                    bundle_rx,
                    Expect::TrustDomain("cluster.local".parse().expect("td")),
                    Duration::from_secs(60),
                    &[b"h2"],
                )
                .expect("server config");
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                let serve = async {
                    loop {
                        let Ok((s, _)) = listener.accept().await else { return };
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(s).await else { return };
                            let Ok(mut conn) = h2::server::handshake(tls).await else { return };
                            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                                let _ = respond.send_response(http::Response::new(()), false);
                            }
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("rogue server listening");
        Self { stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for RogueServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a rogue client's attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered the CONNECT with this status.
    Status(u16),
    /// The TLS handshake or the connection failed.
    Failed(String),
}

/// From `netns`, dials `target` (ip:15008) presenting `cert`, expecting the
/// server to be `server_identity`, and sends `request`.
pub fn hbone_request(
    netns: &str,
    target: SocketAddr,
    cert: Arc<CertifiedKey>,
    bundle: TrustBundle,
    server_identity: &str,
    request: http::Request<()>,
) -> Outcome {
    hbone_request_sni(netns, target, cert, bundle, server_identity, None, request)
}

/// The same, naming `sni` in the handshake.
pub fn hbone_request_sni(
    netns: &str,
    target: SocketAddr,
    cert: Arc<CertifiedKey>,
    bundle: TrustBundle,
    server_identity: &str,
    sni: Option<String>,
    request: http::Request<()>,
) -> Outcome {
    let server_identity = server_identity.parse().expect("identity");
    ztunnel_testbed::in_netns(netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(async move {
            let (_tx, bundle_rx) = watch::channel(Arc::new(bundle));
            let config = tls::client_config(
                cert,
                bundle_rx,
                Expect::Identity(server_identity),
                Duration::from_secs(60),
                &[b"h2"],
                sni.is_some(),
            )
            .expect("client config");
            let tcp = match tokio::net::TcpStream::connect(target).await {
                Ok(s) => s,
                Err(e) => return Outcome::Failed(format!("connect: {e}")),
            };
            let name = match sni {
                Some(s) => ServerName::try_from(s).expect("sni"),
                None => ServerName::IpAddress(target.ip().into()),
            };
            let tls = match tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
                Ok(t) => t,
                Err(e) => return Outcome::Failed(format!("tls: {e}")),
            };
            let (sender, conn) = match h2::client::handshake(tls).await {
                Ok(x) => x,
                Err(e) => return Outcome::Failed(format!("h2: {e}")),
            };
            tokio::spawn(conn);
            let mut sender = match sender.ready().await {
                Ok(s) => s,
                Err(e) => return Outcome::Failed(format!("h2 ready: {e}")),
            };
            let (response, _send) = match sender.send_request(request, false) {
                Ok(x) => x,
                Err(e) => return Outcome::Failed(format!("send: {e}")),
            };
            match tokio::time::timeout(Duration::from_secs(10), response).await {
                Ok(Ok(r)) => Outcome::Status(r.status().as_u16()),
                Ok(Err(e)) => Outcome::Failed(format!("response: {e}")),
                Err(_) => Outcome::Failed("no response".into()),
            }
        }))
    })
    .unwrap_or_else(|e| Outcome::Failed(e.to_string()))
}

/// A CONNECT (or another method) with the given `:authority`.
pub fn request(method: http::Method, authority: &str) -> http::Request<()> {
    let mut r = http::Request::new(());
    *r.method_mut() = method.clone();
    *r.version_mut() = http::Version::HTTP_2;
    *r.uri_mut() = if method == http::Method::CONNECT {
        authority.parse().expect("authority")
    } else {
        format!("https://{authority}/").parse().expect("uri")
    };
    r
}
