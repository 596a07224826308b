//! The data path: listeners, the handling of each connection, the byte relay.
//!
//! * `outbound`: connections capture sent to :15001, attributed to a workload
//!   by the capture record, routed to their destination (HBONE, or
//!   passthrough to destinations outside the mesh).
//! * `hbone`: the HBONE client (pooled) and server (:15008).
//! * `inbound`: plaintext connections steered to :15006.
//! * `delivery`: handing connections to workloads with the caller's address.
//! * `relay`, `h2`: the bidirectional copy every path ends in.
//! * `traffic`: each carried connection counted open, its bytes as they
//!   flow, and closed.

pub mod authz;
pub mod delivery;
pub mod h2;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod relay;
pub mod traffic;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::limits::{ConnectionLimits, LimitExceeded, PerSource, WorkloadBudgets};
use crate::{
    access_log::AccessLog, capture::CaptureRecords, failures::FailureRing, identity::manager::CertManager,
    metrics::Metrics, netns::Netns, sockopt::SocketPolicy, state::StateWatch,
};

/// What every connection handler needs.
pub struct ProxyContext {
    pub state: StateWatch,
    pub records: Arc<CaptureRecords>,
    pub access_log: Arc<AccessLog>,
    /// The last failures, for `ztunnel explain`.
    pub failures: Arc<FailureRing>,
    pub metrics: Arc<Metrics>,
    pub certs: CertManager,
    pub pool: Arc<hbone::pool::Pool>,
    /// Connections being carried: Istio's TCP metrics, periodic log lines.
    pub traffic: Arc<traffic::Traffic>,
    /// Admitted inbound connections, re-decided when policy changes.
    pub open: Arc<authz::OpenConnections>,
    /// Connections carried, in all and per workload.
    pub limits: Arc<ConnectionLimits>,
    /// Inbound HBONE connections still in their handshake, per source.
    pub handshakes: Arc<PerSource>,
    /// Authenticated inbound HBONE connections, per source.
    pub hbone_sources: Arc<PerSource>,
    /// Early data and in-flight deliveries, per workload.
    pub budgets: WorkloadBudgets,
    /// Early data one HBONE stream may send before its answer.
    pub early_data_per_stream: usize,
    /// From accept to an authenticated caller on :15008.
    pub handshake_timeout: Duration,
    /// Keepalive and close behaviour of every socket.
    pub sockets: SocketPolicy,

    pub connect_timeout: Duration,
    /// How long a connection waits for its workload's first certificate.
    pub cert_wait: Duration,
    pub clock_skew: Duration,
    /// Tracks connection tasks so shutdown can wait for them to drain.
    pub connections: TaskTracker,
    /// Cancelled when the tunnel stops accepting.
    pub shutdown: CancellationToken,
}

/// Why a connection could not be carried; the access log's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No capture record for an accepted outbound connection.
    NoCaptureRecord,
    /// The record names a workload that is not enrolled (any more).
    UnknownWorkload,
    /// The workload's connection arrived at another workload's listener.
    WrongListener,
    DestinationUnreachable,
    ConnectTimeout,
    /// Relaying ended in an error or a reset.
    Reset,
    Io,
    /// The source workload has no valid certificate.
    NoCertificate,
    /// An HBONE request that is not a CONNECT to `ip:port`.
    BadRequest,
    /// `:authority` names another address than the connection reached.
    AuthorityMismatch,
    /// A workload calling its own tunnel: a tunnel port, or a loopback
    /// address, as the destination.
    SelfCall,
    /// A connection the tunnel made to deliver to a workload came back to it
    /// (its registration was lost): refused, never carried as plaintext.
    DeliveryLoop,
    /// A limit of the tunnel's (see `limits`).
    Limit(LimitExceeded),
    /// A service address with no ready endpoint for the port.
    NoEndpoint,
    /// Opening the HBONE stream failed; the reason comes from the TLS or
    /// HTTP/2 layer (expired, unknown_ca, wrong_identity, policy_denied, ...).
    Hbone(&'static str),
    /// Plaintext refused by a strict workload.
    PlaintextRefused,
    /// Authorization denied it; the reason is the decision's
    /// (denied_by_policy, no_allow_matched, default_deny).
    PolicyDenied(&'static str),
    /// A policy change closed it while open.
    RevokedByPolicy,
    /// A destination outside the mesh, for a workload that may not leave it.
    PassthroughRefused,
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::NoCaptureRecord => "no_capture_record",
            Failure::UnknownWorkload => "unknown_workload",
            Failure::WrongListener => "wrong_listener",
            Failure::DestinationUnreachable => "destination_unreachable",
            Failure::ConnectTimeout => "connect_timeout",
            Failure::Reset => "reset",
            Failure::Io => "io_error",
            Failure::NoCertificate => "no_certificate",
            Failure::BadRequest => "bad_request",
            Failure::AuthorityMismatch => "authority_mismatch",
            Failure::SelfCall => "self_call",
            Failure::DeliveryLoop => "delivery_loop",
            Failure::Limit(l) => l.reason(),
            Failure::NoEndpoint => "no_endpoint",
            Failure::Hbone(reason) => reason,
            Failure::PlaintextRefused => "plaintext_refused",
            Failure::PolicyDenied(reason) => reason,
            Failure::RevokedByPolicy => "revoked_by_policy",
            Failure::PassthroughRefused => "passthrough_refused",
        }
    }
}

/// Dials `dst` from inside `netns` (the source workload's, so the peer sees
/// the workload's own address); the socket belongs to the tunnel's cgroup and
/// is therefore never captured.
pub async fn dial(
    netns: &Netns,
    dst: SocketAddr,
    timeout: Duration,
    sockets: &SocketPolicy,
) -> Result<TcpStream, (Failure, String)> {
    let socket = netns.tcp_socket(dst).await.map_err(|e| (Failure::Io, e.to_string()))?;
    sockets.apply(&socket);
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err((Failure::DestinationUnreachable, e.to_string())),
        Err(_) => Err((Failure::ConnectTimeout, format!("no answer from {dst} within {timeout:?}"))),
    }
}

/// [`accept_loop`] for one of pod `id`'s listeners: it starts accepting only
/// once the published state knows the pod. A listener can have connections
/// waiting before that (its workload's capture is marked ready just before
/// the state is published; after an upgrade the predecessor's queue is
/// already live), and a connection taken then would find no workload and be
/// reset.
pub async fn accept_loop_for_pod<F, Fut>(
    id: u32,
    listener: tokio::net::TcpListener,
    ctx: Arc<ProxyContext>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut state = ctx.state.clone();
    while !state.borrow_and_update().local.contains_key(&id) {
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = ctx.shutdown.cancelled() => return,
        }
    }
    accept_loop(listener, ctx, handle).await;
}

/// Accepts forever (until shutdown), handing each connection to `handle` on a
/// tracked task. Accept errors (a full fd table) pause briefly instead of
/// spinning.
pub async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, ctx: Arc<ProxyContext>, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ctx.shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                ctx.sockets.apply(&stream);
                ctx.connections.spawn(handle(stream, peer));
            }
            Err(e) => {
                tracing::warn!("accept on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
