//! The HBONE server: a pod's `:15008` (or the node's, for plain-host
//! workloads) terminates mutual TLS with the workload's own certificate,
//! verifies the caller against the trust bundle and trust domain, and serves
//! CONNECT streams:
//!
//! | case | answer |
//! | --- | --- |
//! | not CONNECT, or `:authority` not `ip:port` | 400 |
//! | `:authority` IP is not the address the connection landed on | 400 |
//! | `:authority` port is one of the tunnel's own (15001, 15006, 15008) | 503 |
//! | policy denies | 401 |
//! | the destination cannot be reached | 503 |
//! | otherwise, once the destination accepted | 200 |
//!
//! The workload sees the caller's real address as its peer: the TCP peer of
//! the HBONE connection (never the `forwarded` header, which the caller
//! controls).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{ALPN_H2, RESERVED_PORTS, parse_authority};
use crate::{
    access_log::Entry,
    identity::{node_id::PeerId, spiffe::SpiffeId},
    proxy::{
        Failure, ProxyContext, authz, delivery,
        h2::{H2Reader, H2Writer, keepalive, server_builder},
        outbound::ListenerScope,
        relay::{self, BufReader, Writer},
    },
    sockopt,
    tls::{self, CurrentCert, verify::Expect},
    workload::LocalWorkload,
};

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
    let state = ctx.state.borrow().clone();
    let target = match scope {
        ListenerScope::Pod(id) => state.local.get(&id).cloned(),
        ListenerScope::Node => state
            .local
            .values()
            .find(|w| !w.is_pod() && w.workload.addresses.contains(&crate::workload::canonical(landed.ip())))
            .cloned(),
    };
    let Some(target) = target else {
        sockopt::reset_on_close(&stream);
        return;
    };
    let identity = target.workload.identity.clone();
    // A workload enrolled a moment ago may still be fetching its first
    // certificate: the caller waits for it (bounded) instead of failing.
    if let Err(e) = ctx.certs.wait(&identity, ctx.cert_wait).await {
        refused_handshake(&ctx, peer, landed, &target, "no_certificate", e.to_string());
        sockopt::reset_on_close(&stream);
        return;
    }
    let certs = ctx.certs.clone();
    let cert = CurrentCert(Box::new(move || certs.credential(&identity).map(|c| c.certified.clone())));
    let config = match tls::server_config(
        cert,
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
        tokio::time::timeout(ctx.connect_timeout, TlsAcceptor::from(Arc::new(config)).accept(stream)).await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let fallback =
                if e.kind() == std::io::ErrorKind::UnexpectedEof { "handshake_eof" } else { "not_tls" };
            let (reason, error) = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<rustls::Error>())
                .map_or((fallback, e.to_string()), tls::verify::handshake_reason);
            refused_handshake(&ctx, peer, landed, &target, reason, error);
            return;
        }
        Err(_) => {
            refused_handshake(
                &ctx,
                peer,
                landed,
                &target,
                "handshake_timeout",
                "no TLS handshake in time".into(),
            );
            return;
        }
    };
    let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let source = peer_cert
        .and_then(|c| tls::verify::peer_id(c).ok())
        .and_then(|p| if let PeerId::Workload(id) = p { Some(id) } else { None });
    // When the caller's certificate expires the connection takes no new
    // streams (a well-behaved caller moved to a renewed one long before).
    let expires_in = peer_cert
        .and_then(tls::verify::not_after)
        .and_then(|t| (t + ctx.clock_skew).duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    let Some(source) = source else {
        refused_handshake(
            &ctx,
            peer,
            landed,
            &target,
            "no_spiffe_id",
            "caller has no workload identity".into(),
        );
        return;
    };
    let handshake = tokio::time::timeout(ctx.connect_timeout, server_builder().handshake::<_, Bytes>(tls));
    let mut connection = match handshake.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            refused_handshake(&ctx, peer, landed, &target, "hbone_protocol", e.to_string());
            return;
        }
        Err(_) => {
            let error = "no HTTP/2 preface in time after TLS".to_owned();
            refused_handshake(&ctx, peer, landed, &target, "handshake_timeout", error);
            return;
        }
    };
    let mut keepalive = connection.ping_pong().map(|pp| Box::pin(keepalive(pp)));
    let caller = Arc::new(Caller { peer, landed, source, target });
    let expiry = tokio::time::sleep(expires_in);
    tokio::pin!(expiry);
    let mut expired = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            () = &mut expiry, if !expired => {
                tracing::debug!(%peer, "the caller's certificate expired: no new streams on this connection");
                expired = true;
                connection.graceful_shutdown();
                continue;
            }
            e = async { match keepalive.as_mut() { Some(k) => k.await, None => std::future::pending().await } } => {
                tracing::debug!(%peer, "HBONE connection dropped: {e}");
                return;
            }
            () = ctx.shutdown.cancelled() => {
                connection.graceful_shutdown();
                // Keep serving the streams already open until they finish.
                while let Some(Ok(_)) = connection.accept().await {}
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

/// Who is calling, on which connection, to which local workload.
struct Caller {
    peer: SocketAddr,
    landed: SocketAddr,
    source: SpiffeId,
    target: Arc<LocalWorkload>,
}

fn refused_handshake(
    ctx: &ProxyContext,
    peer: SocketAddr,
    landed: SocketAddr,
    target: &LocalWorkload,
    reason: &str,
    error: String,
) {
    ctx.metrics.handshake_failed("inbound", reason);
    let mut entry = Entry::now("inbound", "hbone");
    entry.source_address = Some(peer.to_string());
    entry.destination_address = landed.to_string();
    entry.destination_workload = Some(target.workload.key());
    entry.destination_identity = Some(target.workload.identity.to_string());
    entry.decision = "deny";
    entry.reason = reason.to_owned();
    entry.error = Some(error);
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
    entry.destination_workload = Some(caller.target.workload.key());
    entry.destination_identity = Some(caller.target.workload.identity.to_string());
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
    }
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.metrics.count_tcp(&entry, "destination");
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
    let bad = |failure, error: String| Err((Some(StatusCode::BAD_REQUEST), failure, error));
    if request.method() != Method::CONNECT {
        return bad(Failure::BadRequest, format!("{} is not CONNECT", request.method()));
    }
    let Some(dst) = parse_authority(request.uri().authority()) else {
        return bad(Failure::BadRequest, format!("`{}` is not ip:port", request.uri()));
    };
    entry.destination_address = dst.to_string();
    if crate::workload::canonical(dst.ip()) != crate::workload::canonical(caller.landed.ip()) {
        return bad(
            Failure::AuthorityMismatch,
            format!("{dst} is not the address this connection reached ({})", caller.landed.ip()),
        );
    }
    if RESERVED_PORTS.contains(&dst.port()) {
        return Err((
            Some(StatusCode::SERVICE_UNAVAILABLE),
            Failure::SelfCall,
            format!("port {} is the tunnel's own", dst.port()),
        ));
    }
    // The workload as it is now: a pooled connection outlives reloads that
    // change its labels or modes, and each stream is decided on the current.
    let state = ctx.state.borrow().clone();
    let target = match state.local.get(&caller.target.id) {
        Some(t) if t.workload.identity == caller.target.workload.identity => t.clone(),
        _ => {
            return Err((
                Some(StatusCode::SERVICE_UNAVAILABLE),
                Failure::UnknownWorkload,
                format!("{} is no longer enrolled under this identity", caller.target.workload.key()),
            ));
        }
    };
    let decision = authz::decide(ctx, &state, Some(&caller.source), &target, dst.port(), entry);
    if !decision.verdict.admits() {
        return Err((
            Some(StatusCode::UNAUTHORIZED),
            Failure::PolicyDenied(decision.reason),
            decision.explain(),
        ));
    }
    let registration = ctx.open.register(Some(caller.source.clone()), target.id, dst.port());
    let upstream = match delivery::connect_as(&target.netns, caller.peer.ip(), dst, ctx.connect_timeout).await
    {
        Ok(s) => s,
        Err((failure, error)) => return Err((Some(StatusCode::SERVICE_UNAVAILABLE), failure, error)),
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(s) => s,
        Err(e) => return Err((None, Failure::Reset, e.to_string())),
    };
    let recv = request.into_body();
    relay_h2_tcp(H2Reader::new(recv), H2Writer::new(send), upstream, entry, Some(&registration))
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
) -> Result<(), (Failure, String)> {
    let transferred = relay::Transferred::default();
    let result = {
        let (r, w) = tcp.split();
        let relay = relay::relay((reader, &mut writer), (BufReader::new(r), Writer(w)), &transferred);
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
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => {
            match e.side {
                relay::Side::Downstream => sockopt::reset_on_close(&tcp),
                relay::Side::Upstream => writer.reset(),
            }
            Err((if e.is_reset() { Failure::Reset } else { Failure::Io }, e.to_string()))
        }
    }
}
