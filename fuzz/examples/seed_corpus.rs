//! Writes the binary seeds of the fuzz corpus, so that their provenance is
//! this program and not a blob from somewhere:
//!
//! * `corpus/certificate/`: what the tunnel's own CA issues (a workload's
//!   leaf, a node credential, the CA service's, the intermediate and root),
//!   and rcgen-made certificates with the SANs a peer could get wrong (none,
//!   two URIs, DNS only, a URI that is not SPIFFE, an expired one).
//! * `corpus/hbone_server/`: the bytes the tunnel's own HTTP/2 client
//!   settings (`client_builder`) write for CONNECTs made by
//!   `connect_request`, recorded while a server answers them as the HBONE
//!   server does, plus requests a peer could send instead.
//!
//! Run from the repository root:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus`
//! (a plain build, no sanitizers). Text seeds are written by hand.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use ztunnel::{
    ca::{
        signer::{Placement, Signer, SignerPolicy},
        store::CaState,
    },
    identity::{
        node_id::PeerId,
        spiffe::{SpiffeId, TrustDomain},
    },
    proxy::{
        h2::{client_builder, server_builder},
        hbone::{check_connect, connect_request},
    },
    tls::verify::peer_id,
    workload::Workload,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    certificates(&corpus.join("certificate"))?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    runtime.block_on(hbone_exchanges(&corpus.join("hbone_server")))?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)?;
    println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
    Ok(())
}

fn certificates(dir: &Path) -> Result<()> {
    let td = TrustDomain::default();
    let state = CaState::ephemeral(&td)?;
    let root = state.bundle.roots()[0].clone();
    let intermediate = state.chain[0].clone();
    let signer = Signer::new(state, Placement::default(), SignerPolicy::default());
    let day = Duration::from_secs(86400);
    let issued = [
        ("workload.der", PeerId::Workload("spiffe://cluster.local/ns/shop/sa/web".parse()?)),
        ("node.der", PeerId::node(td.clone(), "node-a")?),
        ("ca_service.der", PeerId::CaService { trust_domain: td }),
    ];
    for (name, id) in issued {
        let credential = signer.issue_credential(id.clone(), day)?;
        assert_eq!(peer_id(&credential.chain[0])?, id);
        write(dir, name, &credential.chain[0])?;
    }
    write(dir, "intermediate.der", &intermediate)?;
    write(dir, "root.der", &root)?;

    let key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "seed corpus CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let issuer = Issuer::new(ca, key);
    let uri = |u: &str| -> Result<SanType> { Ok(SanType::URI(u.try_into()?)) };
    let dns = |d: &str| -> Result<SanType> { Ok(SanType::DnsName(d.try_into()?)) };
    let now = SystemTime::now();
    let odd = [
        ("no_san.der", vec![], now + day),
        (
            "two_uris.der",
            vec![uri("spiffe://cluster.local/ns/shop/sa/web")?, uri("spiffe://cluster.local/ns/shop/sa/db")?],
            now + day,
        ),
        ("dns_only.der", vec![dns("web.shop.svc.cluster.local")?], now + day),
        ("https_uri.der", vec![uri("https://web.shop.example/")?], now + day),
        ("bad_segment.der", vec![uri("spiffe://cluster.local/ns/sh%20op/sa/web")?], now + day),
        ("expired.der", vec![uri("spiffe://cluster.local/ns/shop/sa/web")?], now - day),
    ];
    for (name, sans, not_after) in odd {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.not_before = (now - 2 * day).into();
        p.not_after = not_after.into();
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        write(dir, name, p.signed_by(&KeyPair::generate()?, &issuer)?.der())?;
    }
    Ok(())
}

/// Where the recorded connections land (the fuzz target's addresses).
const V4: &str = "198.18.0.5";
const V6: &str = "[fd7a:7e57:7e57::5]";
const LANDED_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 5));
const LANDED_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x7e57, 0x7e57, 0, 0, 0, 0, 5));

async fn hbone_exchanges(dir: &Path) -> Result<()> {
    let connect = |authority: &str| -> Result<Request<()>> {
        let dst: SocketAddr = authority.parse()?;
        Ok(connect_request(dst, &caller()?, "198.19.0.7:40000".parse()?))
    };
    let get = Request::builder().method(Method::GET).uri(format!("http://{V4}:8080/")).body(())?;
    let cases: Vec<(&str, Vec<Request<()>>)> = vec![
        ("connect_v4", vec![connect(&format!("{V4}:8080"))?]),
        ("connect_v6", vec![connect(&format!("{V6}:8080"))?]),
        ("two_streams", vec![connect(&format!("{V4}:8080"))?, connect(&format!("{V4}:9090"))?]),
        ("tunnel_port", vec![connect(&format!("{V4}:15008"))?]),
        ("loopback", vec![connect("127.0.0.1:8080")?]),
        ("other_address", vec![connect("198.18.0.6:8080")?]),
        ("get", vec![get]),
    ];
    for (name, requests) in cases {
        write(dir, name, &record(requests).await?)?;
    }
    Ok(())
}

fn caller() -> Result<Workload> {
    Ok(Workload {
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        identity: SpiffeId::new(TrustDomain::default(), "shop", "web")?,
        node: "node-b".into(),
        addresses: vec!["198.19.0.7".parse()?],
        ports: vec![],
        labels: Default::default(),
        has_netns: true,
    })
}

/// What the client writes for `requests` (each sends a line and ends its
/// stream), answered by a server that checks them as the HBONE server does.
async fn record(requests: Vec<Request<()>>) -> Result<Vec<u8>> {
    let (client, server) = tokio::io::duplex(1 << 20);
    let written = Arc::new(Mutex::new(Vec::new()));
    let server = tokio::spawn(answer(server));
    let (mut send, connection) =
        client_builder().handshake::<_, Bytes>(Recorder { inner: client, written: written.clone() }).await?;
    let connection = tokio::spawn(connection);
    for request in requests {
        let (response, mut body) = send.send_request(request, false)?;
        body.send_data(Bytes::from_static(b"hello through the tunnel\n"), true)?;
        let status = response.await?.status();
        println!("  answered {status}");
    }
    drop(send);
    connection.await??;
    server.await?;
    let bytes = written.lock().map_err(|_| "recorder poisoned")?.clone();
    Ok(bytes)
}

async fn answer(io: DuplexStream) {
    let Ok(mut connection) = server_builder().handshake::<_, Bytes>(io).await else { return };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let v6 = request.uri().authority().is_some_and(|a| a.as_str().starts_with('['));
        let landed = if v6 { LANDED_V6 } else { LANDED_V4 };
        let status = match check_connect(request.method(), request.uri(), landed) {
            Ok(_) => http::StatusCode::OK,
            Err(refusal) => refusal.status,
        };
        let mut r = Response::new(());
        *r.status_mut() = status;
        let _ = respond.send_response(r, true);
    }
}

/// The client's side of the pipe, keeping a copy of what it writes.
struct Recorder {
    inner: DuplexStream,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll
            && let Ok(mut w) = self.written.lock()
        {
            w.extend_from_slice(&buf[..n]);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
