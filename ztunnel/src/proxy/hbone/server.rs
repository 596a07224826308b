//! The HBONE server: a pod's `:15008` (or the node's, for plain-host
//! workloads) terminates mutual TLS with the workload's own certificate,
//! verifies the caller against the trust bundle and trust domain, and serves
//! CONNECT streams:
//!
//! | case | answer |
//! | --- | --- |
//! | not CONNECT, or `:authority` not `ip:port` | 400 |
//! | `:authority` IP is not the address the connection landed on, or loopback | 400 |
//! | `:authority` port is one of the tunnel's own (15000, 15001, 15006, 15008, 15020, 15021) | 503 |
//! | no workload serves the port (a node address), or a limit is reached | 503 |
//! | policy denies | 401 |
//! | the destination cannot be reached | 503 |
//! | otherwise, once the destination accepted | 200 |
//!
//! Before a caller is authenticated it holds little: a handshake has
//! `limits.handshake_timeout` to finish (TLS and the HTTP/2 preface), and one
//! source address may have only so many connections in their handshake, and
//! so many authenticated ones, so a flood from one address cannot starve the
//! others. When a root leaves the trust bundle, connections of callers that
//! chained only to it are closed.
//!
//! A node address is shared by its plain-host workloads: the caller names the
//! destination port in SNI and the node presents that port's workload's
//! certificate; each stream is then decided for the workload that owns its
//! port, which must have the identity the connection was made to.
//!
//! The workload sees the caller's real address as its peer: the TCP peer of
//! the HBONE connection (never the `forwarded` header, which the caller
//! controls).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{ALPN_H2, check_connect, pool::port_from_sni};
use crate::{
    access_log::Entry,
    identity::{node_id::PeerId, spiffe::SpiffeId},
    metrics::TcpLabels,
    proxy::{
        Failure, ProxyContext, authz, delivery,
        h2::{H2Reader, H2Writer, keepalive, server_builder},
        outbound::ListenerScope,
        relay::{self, BufReader, Writer},
    },
    sockopt,
    state::State,
    tls::{
        self, CurrentCert,
        verify::{Expect, verify_peer},
    },
    workload::{LocalWorkload, canonical},
};

/// The local workload a connection (or a stream) is for.
fn local_target(
    state: &State,
    scope: ListenerScope,
    landed: IpAddr,
    port: Option<u16>,
) -> Option<Arc<LocalWorkload>> {
    match scope {
        ListenerScope::Pod(id) => state.local.get(&id).cloned(),
        ListenerScope::Node => {
            let landed = canonical(landed);
            let mut sharing =
                state.local.values().filter(|w| !w.is_pod() && w.workload.addresses.contains(&landed));
            match port {
                Some(p) => sharing.find(|w| w.workload.serves(p)).cloned(),
                // No port named: only an address with one identity is
                // unambiguous.
                None => {
                    let first = sharing.next()?.clone();
                    sharing.all(|w| w.workload.identity == first.workload.identity).then_some(first)
                }
            }
        }
    }
}

/// One accepted connection on a `:15008` listener.
pub async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    scope: ListenerScope,
    ctx: Arc<ProxyContext>,
) {
    let landed = match stream.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let refuse = |failure: Failure, error: String| {
        refused_handshake(&ctx, peer, landed, None, failure.reason(), error);
    };
    let _handshake = match ctx.handshakes.acquire(peer.ip()) {
        Ok(p) => p,
        Err(limit) => {
            sockopt::reset_on_close(&stream);
            return refuse(
                Failure::Limit(limit),
                format!("{peer} has too many connections in their handshake"),
            );
        }
    };
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let state = ctx.state.borrow().clone();
    let Some(target) = authenticate_target(&ctx, &state, scope, landed, peer).await else {
        sockopt::reset_on_close(&stream);
        return;
    };
    let config = match tls::server_config(
        presented_cert(&ctx, scope, landed),
        ctx.certs.bundle(),
        Expect::TrustDomain(target.workload.identity.trust_domain().clone()),
        ctx.clock_skew,
        &[ALPN_H2],
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("HBONE server configuration: {e}");
            return;
        }
    };
    let accepted =
        tokio::time::timeout_at(deadline, TlsAcceptor::from(Arc::new(config)).accept(stream)).await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let fallback =
                if e.kind() == std::io::ErrorKind::UnexpectedEof { "handshake_eof" } else { "not_tls" };
            let (reason, error, certificate) = tls::verify::handshake_failure(&e, fallback);
            refused_certificate(&ctx, peer, landed, Some(&target), reason, error, certificate);
            return;
        }
        Err(_) => {
            let error = format!("no TLS handshake within {:?}", ctx.handshake_timeout);
            refused_handshake(&ctx, peer, landed, Some(&target), "handshake_timeout", error);
            return;
        }
    };
    let session = tls.get_ref().1;
    let chain: Vec<CertificateDer<'static>> = session
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    // The identity this connection presented: a node address's port owner
    // (by SNI), or the pod.
    let sni_port = session.server_name().and_then(port_from_sni);
    let presented = match scope {
        ListenerScope::Pod(_) => Some(target.workload.identity.clone()),
        ListenerScope::Node => {
            local_target(&state, scope, landed.ip(), sni_port).map(|t| t.workload.identity.clone())
        }
    };
    let source = chain
        .first()
        .and_then(|c| tls::verify::peer_id(c).ok())
        .and_then(|p| if let PeerId::Workload(id) = p { Some(id) } else { None });
    // When the caller's certificate expires the connection takes no new
    // streams (a well-behaved caller moved to a renewed one long before).
    let expires_in = chain
        .first()
        .and_then(tls::verify::not_after)
        .and_then(|t| (t + ctx.clock_skew).duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    let (Some(source), Some(presented)) = (source, presented) else {
        let error = "caller has no workload identity, or named no workload of this address".to_owned();
        refused_handshake(&ctx, peer, landed, Some(&target), "no_spiffe_id", error);
        return;
    };
    let handshake = tokio::time::timeout_at(deadline, server_builder().handshake::<_, Bytes>(tls));
    let mut connection = match handshake.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            refused_handshake(&ctx, peer, landed, Some(&target), "hbone_protocol", e.to_string());
            return;
        }
        Err(_) => {
            let error = "no HTTP/2 preface in time after TLS".to_owned();
            refused_handshake(&ctx, peer, landed, Some(&target), "handshake_timeout", error);
            return;
        }
    };
    drop(_handshake);
    let _authenticated = match ctx.hbone_sources.acquire(peer.ip()) {
        Ok(p) => p,
        Err(limit) => {
            let error = format!("{peer} holds too many HBONE connections");
            refused_handshake(&ctx, peer, landed, Some(&target), limit.reason(), error);
            return;
        }
    };
    let mut keepalive = connection.ping_pong().map(|pp| Box::pin(keepalive(pp)));
    let caller = Arc::new(Caller { peer, landed, source, presented, scope });
    let expiry = tokio::time::sleep(expires_in);
    tokio::pin!(expiry);
    let mut expired = false;
    let mut bundle = ctx.certs.bundle();
    bundle.borrow_and_update();
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut expiry, if !expired => {
                tracing::debug!(%peer, "the caller's certificate expired: no new streams on this connection");
                expired = true;
                connection.graceful_shutdown();
                continue;
            }
            changed = bundle.changed() => {
                if changed.is_ok() && !still_trusted(&chain, &bundle.borrow_and_update(), &ctx) {
                    tracing::info!(
                        %peer,
                        source = %caller.source,
                        "the caller's root left the trust bundle: connection closed"
                    );
                    ctx.metrics.handshake_failed("inbound", "root_removed");
                    return;
                }
                continue;
            }
            e = async { match keepalive.as_mut() { Some(k) => k.await, None => std::future::pending().await } } => {
                tracing::debug!(%peer, "HBONE connection dropped: {e}");
                return;
            }
            () = ctx.shutdown.cancelled() => {
                connection.graceful_shutdown();
                // Streams the peer opened before it saw the GOAWAY are served
                // like any other (dropping them would reset them); the open
                // ones run until they finish.
                while let Some(Ok((request, respond))) = connection.accept().await {
                    ctx.connections.spawn(handle_stream(request, respond, caller.clone(), ctx.clone()));
                }
                return;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                ctx.connections.spawn(handle_stream(request, respond, caller.clone(), ctx.clone()));
            }
            Some(Err(e)) => {
                tracing::debug!(%peer, "HBONE connection error: {e}");
                return;
            }
            None => return,
        }
    }
}

/// The workload whose certificate a connection to `landed` will get (on a
/// shared node address, any of them until SNI names one), after waiting
/// (bounded) for the certificates of the workloads there: one enrolled a
/// moment ago may still be fetching its first.
async fn authenticate_target(
    ctx: &ProxyContext,
    state: &State,
    scope: ListenerScope,
    landed: SocketAddr,
    peer: SocketAddr,
) -> Option<Arc<LocalWorkload>> {
    let there: Vec<Arc<LocalWorkload>> = match scope {
        ListenerScope::Pod(id) => state.local.get(&id).cloned().into_iter().collect(),
        ListenerScope::Node => {
            let landed = canonical(landed.ip());
            state
                .local
                .values()
                .filter(|w| !w.is_pod() && w.workload.addresses.contains(&landed))
                .cloned()
                .collect()
        }
    };
    let Some(target) = there.first().cloned() else {
        refused_handshake(ctx, peer, landed, None, "unknown_workload", format!("no workload at {landed}"));
        return None;
    };
    let mut waited = std::collections::HashSet::new();
    for w in &there {
        if waited.insert(w.workload.identity.clone())
            && let Err(e) = ctx.certs.wait(&w.workload.identity, ctx.cert_wait).await
        {
            refused_handshake(ctx, peer, landed, Some(w), "no_certificate", e.to_string());
            return None;
        }
    }
    Some(target)
}

/// The certificate presented for a handshake: the pod's, or on a node
/// address the one of the workload owning the port SNI names.
fn presented_cert(ctx: &ProxyContext, scope: ListenerScope, landed: SocketAddr) -> CurrentCert {
    let certs = ctx.certs.clone();
    let state = ctx.state.clone();
    CurrentCert(Box::new(move |sni| {
        let state = state.borrow().clone();
        let target = local_target(&state, scope, landed.ip(), sni.and_then(port_from_sni))?;
        certs.credential(&target.workload.identity).map(|c| c.certified.clone())
    }))
}

/// Whether a caller's chain still leads to a root of `bundle`.
fn still_trusted(
    chain: &[CertificateDer<'static>],
    bundle: &tls::verify::TrustBundle,
    ctx: &ProxyContext,
) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else { return false };
    let Some(id) = tls::verify::peer_id(leaf).ok() else { return false };
    let expect = Expect::TrustDomain(id.trust_domain().clone());
    verify_peer(leaf, intermediates, bundle, &expect, UnixTime::now(), ctx.clock_skew).is_ok()
}

/// Who is calling, on which connection.
struct Caller {
    peer: SocketAddr,
    landed: SocketAddr,
    source: SpiffeId,
    /// The identity the connection was made to.
    presented: SpiffeId,
    scope: ListenerScope,
}

fn refused_handshake(
    ctx: &ProxyContext,
    peer: SocketAddr,
    landed: SocketAddr,
    target: Option<&LocalWorkload>,
    reason: &str,
    error: String,
) {
    refused_certificate(ctx, peer, landed, target, reason, error, None);
}

/// A refused handshake, with why the caller's certificate was refused.
fn refused_certificate(
    ctx: &ProxyContext,
    peer: SocketAddr,
    landed: SocketAddr,
    target: Option<&LocalWorkload>,
    reason: &str,
    error: String,
    certificate: Option<tls::verify::VerifyError>,
) {
    ctx.metrics.handshake_failed("inbound", reason);
    let mut entry = Entry::now("inbound", "hbone");
    entry.source_address = Some(peer.to_string());
    entry.destination_address = landed.to_string();
    entry.destination_workload = target.map(|t| t.workload.key());
    entry.destination_identity = target.map(|t| t.workload.identity.to_string());
    entry.decision = "deny";
    entry.reason = reason.to_owned();
    entry.error = Some(error);
    entry.peer_certificate = certificate;
    ctx.failures.record_entry(&entry);
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.access_log.log(entry);
}

async fn handle_stream(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    caller: Arc<Caller>,
    ctx: Arc<ProxyContext>,
) {
    let started = Instant::now();
    let mut entry = Entry::now("inbound", "hbone");
    entry.source_address = Some(caller.peer.to_string());
    entry.source_identity = Some(caller.source.to_string());
    entry.destination_identity = Some(caller.presented.to_string());
    entry.destination_address = request.uri().to_string();
    let result = carry(request, &mut respond, &caller, &ctx, &mut entry).await;
    if let Err((status, failure, error)) = result {
        if let Some(status) = status {
            let mut r = Response::new(());
            *r.status_mut() = status;
            let _ = respond.send_response(r, true);
        }
        if !matches!(failure, Failure::Reset | Failure::Io) {
            entry.decision = "deny";
        }
        entry.reason = failure.reason().to_owned();
        entry.error = Some(error);
        ctx.failures.record_entry(&entry);
    }
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.access_log.log(entry);
}

type StreamFailure = (Option<StatusCode>, Failure, String);

async fn carry(
    request: Request<RecvStream>,
    respond: &mut SendResponse<Bytes>,
    caller: &Caller,
    ctx: &ProxyContext,
    entry: &mut Entry,
) -> Result<(), StreamFailure> {
    let dst = check_connect(request.method(), request.uri(), caller.landed.ip())
        .map_err(|r| (Some(r.status), r.failure, r.error))?;
    entry.destination_address = dst.to_string();
    let unavailable = |failure, error| Err((Some(StatusCode::SERVICE_UNAVAILABLE), failure, error));
    // The workload as it is now: a pooled connection outlives reloads that
    // change its labels or modes, and each stream is decided on the current.
    let target_id = {
        let state = ctx.state.borrow().clone();
        match local_target(&state, caller.scope, caller.landed.ip(), Some(dst.port())) {
            Some(t) => t.id,
            None => return unavailable(Failure::UnknownWorkload, format!("no workload serves {dst}")),
        }
    };
    let admitted =
        authz::admit(ctx, Some(&caller.source), target_id, Some(&caller.presented), None, dst.port(), entry)
            .map_err(|(failure, error)| {
                let status = match failure {
                    Failure::PolicyDenied(_) => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                (Some(status), failure, error)
            })?;
    let target = admitted.target.clone();
    let _permit = match ctx.limits.acquire(target.id) {
        Ok(p) => p,
        Err(limit) => {
            return unavailable(Failure::Limit(limit), format!("{} is at a limit", target.workload.key()));
        }
    };
    let upstream = match delivery::connect_as(ctx, &target, caller.peer.ip(), dst).await {
        Ok(s) => s,
        Err((failure, error)) => return unavailable(failure, error),
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => return Err((None, Failure::Reset, e.to_string())),
    };
    let recv = request.into_body();
    let source = ctx.state.borrow().registry.source(caller.peer.ip(), Some(&caller.source)).cloned();
    let labels = TcpLabels::new("destination", source.as_deref(), Some(&target.workload), entry);
    let carried = ctx.traffic.open(&labels, entry);
    let (reader, writer) = (H2Reader::new(recv), H2Writer::new(send));
    relay_h2_tcp(reader, writer, upstream, entry, Some(&admitted.registration), carried.transferred())
        .await
        .map_err(|(f, e)| (None, f, e))
}

/// Relays an HBONE stream (downstream) with a TCP connection (upstream),
/// passing resets across: a TCP reset becomes RST_STREAM and the reverse.
pub async fn relay_h2_tcp(
    reader: H2Reader,
    mut writer: H2Writer,
    mut tcp: TcpStream,
    entry: &mut Entry,
    registration: Option<&authz::Registration>,
    transferred: &relay::Transferred,
) -> Result<(), (Failure, String)> {
    let result = {
        let (r, w) = tcp.split();
        let relay = relay::relay((reader, &mut writer), (BufReader::new(r), Writer(w)), transferred);
        authz::unless_revoked(relay, registration).await
    };
    entry.bytes_sent = transferred.sent();
    entry.bytes_received = transferred.received();
    match result {
        None => {
            sockopt::reset_on_close(&tcp);
            writer.reset();
            Err(authz::revoked(registration, entry))
        }
        Some(Ok(())) => {
            sockopt::graceful_close(&tcp);
            Ok(())
        }
        Some(Err(e)) => {
            match e.side {
                relay::Side::Downstream => sockopt::reset_on_close(&tcp),
                relay::Side::Upstream => writer.reset(),
            }
            Err((if e.is_reset() { Failure::Reset } else { Failure::Io }, e.to_string()))
        }
    }
}
