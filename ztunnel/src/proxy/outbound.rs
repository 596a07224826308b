//! Outbound: connections capture redirected to :15001.
//!
//! Each accepted connection is attributed by its capture record (the cgroup
//! that called connect(), never the source address), then routed:
//!
//! * to a workload of the mesh: an HBONE stream to `<destination ip>:15008`,
//!   presenting the source workload's certificate and requiring the
//!   destination workload's identity;
//! * elsewhere: straight to the original destination in plaintext, from the
//!   source workload's namespace, unless the workload's `outbound_passthrough`
//!   is `refuse`.
//!
//! Anything that cannot be attributed is refused with a reset: a connection
//! the tunnel cannot name is a connection it must not carry.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;

use super::{
    Failure, ProxyContext, dial,
    hbone::{
        HBONE_PORT, connect_request,
        pool::{EarlyBounds, PoolKey},
    },
    relay::{self, BufReader, Writer},
};
use crate::{
    access_log::Entry,
    config::Passthrough,
    metrics::TcpLabels,
    sockopt,
    workload::{LocalWorkload, Workload},
};

/// Which workloads a :15001 listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerScope {
    /// The listener inside one pod's namespace.
    Pod(u32),
    /// The node's listener, for plain-host workloads.
    Node,
}

impl ListenerScope {
    fn admits(self, source: &LocalWorkload) -> bool {
        match self {
            ListenerScope::Pod(id) => source.id == id,
            ListenerScope::Node => !source.is_pod(),
        }
    }
}

/// How an outbound connection travels.
#[derive(Debug)]
pub enum Route {
    /// Mutual TLS to the destination workload's tunnel.
    Hbone(Arc<Workload>),
    /// Straight to the original destination, in plaintext, from the source
    /// workload's namespace.
    Passthrough,
}

/// Chooses the route to `destination` (the mesh workload at the original
/// destination, if any).
pub fn route(destination: Option<&Arc<Workload>>) -> Route {
    match destination {
        Some(d) => Route::Hbone(d.clone()),
        None => Route::Passthrough,
    }
}

pub async fn handle(stream: TcpStream, peer: SocketAddr, scope: ListenerScope, ctx: Arc<ProxyContext>) {
    let started = Instant::now();
    let mut entry = Entry::now("outbound", "passthrough");
    let result = carry(stream, peer, scope, &ctx, &mut entry).await;
    if let Err((failure, error)) = result {
        if !matches!(failure, Failure::Reset | Failure::Io) {
            entry.decision = "deny";
        }
        entry.reason = failure.reason().to_owned();
        entry.error = Some(error);
        if let Failure::Hbone(reason) = failure {
            ctx.metrics.handshake_failed("outbound", reason);
        }
        ctx.failures.record_entry(&entry);
    }
    entry.duration_ms = started.elapsed().as_millis() as u64;
    ctx.metrics.count_connection(entry.direction, entry.mode, &entry.reason);
    ctx.access_log.log(entry);
}

async fn carry(
    stream: TcpStream,
    peer: SocketAddr,
    scope: ListenerScope,
    ctx: &ProxyContext,
    entry: &mut Entry,
) -> Result<(), (Failure, String)> {
    let refuse = |stream: &TcpStream, failure: Failure, error: String| {
        sockopt::reset_on_close(stream);
        Err((failure, error))
    };
    entry.destination_address = stream.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let cookie = match sockopt::netns_cookie(&stream) {
        Ok(c) => c,
        Err(e) => return refuse(&stream, Failure::Io, format!("SO_NETNS_COOKIE: {e}")),
    };
    let Some(captured) = ctx.records.lookup(cookie, peer) else {
        return refuse(&stream, Failure::NoCaptureRecord, format!("client {peer}"));
    };
    entry.source_cgroup_id = Some(captured.cgroup_id);
    entry.source_pid = Some(captured.pid);
    entry.destination_address = captured.original_dst.to_string();
    let state = ctx.state.borrow().clone();
    let Some(source) = state.local.get(&captured.workload_id).cloned() else {
        return refuse(&stream, Failure::UnknownWorkload, format!("workload id {}", captured.workload_id));
    };
    entry.source_workload = Some(source.workload.key());
    entry.source_identity = Some(source.workload.identity.to_string());
    if !scope.admits(&source) {
        return refuse(&stream, Failure::WrongListener, format!("{scope:?}"));
    }
    let _permit = match ctx.limits.acquire(source.id) {
        Ok(p) => p,
        Err(limit) => {
            let error =
                format!("{} is at a limit ({} open)", source.workload.key(), ctx.limits.of(source.id));
            return refuse(&stream, Failure::Limit(limit), error);
        }
    };
    // A Service's virtual address leads to one of its ready endpoints,
    // chosen here, and the call is then the endpoint's like any other.
    let mut dst = captured.original_dst;
    if let Some(service) = state.registry.service(dst) {
        entry.destination_service = Some(service.service.clone());
        match service.pick() {
            Some(endpoint) => dst = endpoint,
            None => {
                let error =
                    format!("service {} has no ready endpoint for port {}", service.service, dst.port());
                return refuse(&stream, Failure::NoEndpoint, error);
            }
        }
        entry.destination_address = dst.to_string();
    }
    let destination = state.registry.find(dst).cloned();
    if let Some(d) = &destination {
        entry.destination_workload = Some(d.key());
        entry.destination_identity = Some(d.identity.to_string());
    }
    match route(destination.as_ref()) {
        Route::Passthrough => {
            if state.config.passthrough(&source.config) == Passthrough::Refuse {
                return refuse(
                    &stream,
                    Failure::PassthroughRefused,
                    format!("{} may not reach {} outside the mesh", source.workload.key(), dst),
                );
            }
            let upstream = match dial(&source.netns, dst, ctx.connect_timeout, &ctx.sockets).await {
                Ok(s) => s,
                Err((failure, error)) => return refuse(&stream, failure, error),
            };
            entry.source_address = upstream.local_addr().ok().map(|a| a.to_string());
            let labels = TcpLabels::new("source", Some(&source.workload), None, entry);
            let carried = ctx.traffic.open(&labels, entry);
            relay_tcp(stream, upstream, entry, None, carried.transferred()).await
        }
        Route::Hbone(destination) => {
            entry.mode = "hbone";
            entry.connection_security_policy = "mutual_tls";
            // A mesh workload's tunnel ports are its tunnel's: the callee
            // would refuse them; so does the caller, without a round trip.
            if super::hbone::is_reserved_port(dst.port()) {
                let error = format!("{} is a tunnel port", dst);
                return refuse(&stream, Failure::SelfCall, error);
            }
            let credential = match ctx.certs.wait(&source.workload.identity, ctx.cert_wait).await {
                Ok(c) => c,
                Err(e) => return refuse(&stream, Failure::NoCertificate, e.to_string()),
            };
            let source_ip = source.source_ip_for(dst).unwrap_or(peer.ip());
            let source_addr = SocketAddr::new(source_ip, peer.port());
            entry.source_address = Some(source_addr.to_string());
            let key = PoolKey {
                source_workload: source.id,
                source_identity: source.workload.identity.clone(),
                destination_identity: destination.identity.clone(),
                destination: SocketAddr::new(dst.ip(), HBONE_PORT),
                shared_address: state.registry.is_shared(dst.ip()),
            };
            let request = connect_request(dst, &source.workload, source_addr);
            let early =
                EarlyBounds { per_stream: ctx.early_data_per_stream, budget: ctx.budgets.of(source.id) };
            let hbone = match ctx.pool.open(key, &source.netns, credential, request, &early).await {
                Ok(s) => s,
                Err(e) => {
                    entry.peer_certificate = e.certificate().cloned();
                    return refuse(&stream, Failure::Hbone(e.reason()), e.to_string());
                }
            };
            entry.hbone_connection = Some(hbone.connection_id);
            let labels = TcpLabels::new("source", Some(&source.workload), Some(&destination), entry);
            let carried = ctx.traffic.open(&labels, entry);
            relay_tcp_h2(stream, hbone.reader, hbone.writer, entry, carried.transferred()).await
        }
    }
}

/// Relays two TCP streams, passing a reset on as a reset.
pub(super) async fn relay_tcp(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    entry: &mut Entry,
    registration: Option<&super::authz::Registration>,
    transferred: &relay::Transferred,
) -> Result<(), (Failure, String)> {
    let result = {
        let (dr, dw) = downstream.split();
        let (ur, uw) = upstream.split();
        let relay =
            relay::relay((BufReader::new(dr), Writer(dw)), (BufReader::new(ur), Writer(uw)), transferred);
        super::authz::unless_revoked(relay, registration).await
    };
    entry.bytes_sent = transferred.sent();
    entry.bytes_received = transferred.received();
    match result {
        None => {
            sockopt::reset_on_close(&downstream);
            sockopt::reset_on_close(&upstream);
            Err(super::authz::revoked(registration, entry))
        }
        Some(Ok(())) => {
            sockopt::graceful_close(&downstream);
            sockopt::graceful_close(&upstream);
            Ok(())
        }
        Some(Err(e)) => {
            // The side that did not fail learns of it the way TCP says.
            match e.side {
                relay::Side::Downstream => sockopt::reset_on_close(&upstream),
                relay::Side::Upstream => sockopt::reset_on_close(&downstream),
            }
            Err((if e.is_reset() { Failure::Reset } else { Failure::Io }, e.to_string()))
        }
    }
}

/// Relays a captured TCP connection (downstream) with an HBONE stream
/// (upstream): a TCP reset becomes RST_STREAM, a reset stream a TCP reset.
async fn relay_tcp_h2(
    mut downstream: TcpStream,
    reader: super::h2::H2Reader,
    mut writer: super::h2::H2Writer,
    entry: &mut Entry,
    transferred: &relay::Transferred,
) -> Result<(), (Failure, String)> {
    let result = {
        let (dr, dw) = downstream.split();
        relay::relay((BufReader::new(dr), Writer(dw)), (reader, &mut writer), transferred).await
    };
    entry.bytes_sent = transferred.sent();
    entry.bytes_received = transferred.received();
    match result {
        Ok(()) => {
            sockopt::graceful_close(&downstream);
            Ok(())
        }
        Err(e) => {
            match e.side {
                relay::Side::Downstream => writer.reset(),
                relay::Side::Upstream => sockopt::reset_on_close(&downstream),
            }
            // The callee's tunnel answered the CONNECT with a refusal.
            let refused = e.source.get_ref().and_then(|i| i.downcast_ref::<super::h2::ConnectRefused>());
            if let Some(r) = refused {
                return Err((Failure::Hbone(super::hbone::status_reason(r.status)), e.to_string()));
            }
            Err((if e.is_reset() { Failure::Reset } else { Failure::Io }, e.to_string()))
        }
    }
}
