//! The HBONE client: streams multiplexed over pooled mutual-TLS HTTP/2
//! connections.
//!
//! One pool entry per (source workload, source identity, destination
//! identity, destination address): the source workload fixes the namespace
//! the connection is dialled from and so its source address (Istio keys on the
//! source IP for the same reason); the destination address is the pod's
//! `ip:15008`, because with in-pod listeners every pod terminates its own
//! connections. Each connection carries at most 100 streams at once; more
//! open another connection. Only one connection per entry is being set up at
//! a time, so a burst of first streams does not open a connection each, and
//! when that setup fails the streams that waited for it fail with it instead
//! of each trying again. Idle connections are dropped after `idle_timeout`.
//!
//! A connection takes new streams only while the handshake it was made with
//! still holds: the source certificate it presented is the current one, the
//! peer's certificate has not expired, and the trust bundle has not changed
//! since. Otherwise it is retired: its open streams finish on it, new streams
//! go to a fresh handshake, and it closes once its last stream ends.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::client::SendRequest;
use http::Request;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{ALPN_H2, HboneError};
use crate::{
    identity::{cert::Credential, spiffe::SpiffeId},
    netns::Netns,
    proxy::h2::{
        H2Reader, H2Writer, MAX_STREAMS_PER_CONNECTION, Reopen, Reopened, client_builder, client_stream,
        keepalive,
    },
    tls::{self, BundleSource, verify::Expect},
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source_workload: u32,
    pub source_identity: SpiffeId,
    pub destination_identity: SpiffeId,
    pub destination: SocketAddr,
    /// The destination is a node address shared by plain-host workloads:
    /// the handshake names the destination port in SNI, so the node presents
    /// that port's workload's certificate.
    pub shared_address: bool,
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_streams: usize,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub clock_skew: Duration,
    /// How long a stream waits for a connection to open or to have room.
    pub wait_timeout: Duration,
    pub sockets: crate::sockopt::SocketPolicy,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_streams: MAX_STREAMS_PER_CONNECTION,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            clock_skew: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(10),
            sockets: crate::sockopt::SocketPolicy::default(),
        }
    }
}

/// What a new stream may send before its CONNECT is answered.
pub struct EarlyBounds {
    pub per_stream: usize,
    /// The source workload's budget.
    pub budget: Arc<crate::limits::Budget>,
}

/// The SNI that names destination `port` of a shared node address.
pub fn sni_for_port(port: u16) -> String {
    format!("port-{port}.hbone.ztunnel.invalid")
}

/// The destination port an SNI of [`sni_for_port`] names.
pub fn port_from_sni(sni: &str) -> Option<u16> {
    sni.strip_prefix("port-")?.strip_suffix(".hbone.ztunnel.invalid")?.parse().ok()
}

struct Connection {
    id: u64,
    sender: SendRequest<Bytes>,
    /// Streams open now.
    streams: AtomicUsize,
    /// No new streams: the connection died, or was retired.
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
    /// Serial of the source certificate the handshake presented.
    serial: String,
    /// When the peer's certificate expires.
    peer_not_after: SystemTime,
    /// The trust bundle as of the handshake: a change retires the connection.
    bundle: BundleSource,
}

impl Connection {
    /// Takes a stream slot if the connection has one and its handshake still
    /// holds for `credential`; retires it otherwise.
    fn reserve(&self, max: usize, credential: &Credential) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let stale = if self.serial != credential.serial {
            Some("the source certificate was renewed")
        } else if SystemTime::now() >= self.peer_not_after {
            Some("the peer's certificate expired")
        } else if self.bundle.has_changed().unwrap_or(true) {
            Some("the trust bundle changed")
        } else {
            None
        };
        if let Some(why) = stale {
            self.closed.store(true, Ordering::Release);
            tracing::debug!(
                connection = self.id,
                "HBONE connection retired ({why}); open streams finish on it"
            );
            return false;
        }
        self.streams.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
    }

    fn release(&self) {
        if self.streams.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut t) = self.idle_since.lock()
        {
            *t = Instant::now();
        }
    }
}

#[derive(Default)]
struct Entry {
    connections: Vec<Arc<Connection>>,
    /// Held while a connection for this entry is being set up; holds the
    /// last setup failure and when it happened.
    opening: Arc<tokio::sync::Mutex<Option<(Instant, HboneError)>>>,
}

/// A CONNECT sent: its slot, the answer to come, and its sending half.
type SentConnect = (Slot, h2::client::ResponseFuture, h2::SendStream<Bytes>);

/// A stream slot; dropping it frees the slot.
struct Slot(Arc<Connection>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// An open CONNECT stream.
pub struct HboneStream {
    pub reader: H2Reader,
    pub writer: H2Writer,
    /// Which pooled connection carries it (for logs and tests).
    pub connection_id: u64,
    _slot: SlotGuard,
}

/// Keeps the stream's slot taken for as long as the stream lives.
pub struct SlotGuard(#[allow(dead_code)] Slot);

pub struct Pool {
    entries: Mutex<HashMap<PoolKey, Entry>>,
    settings: PoolSettings,
    bundle: BundleSource,
    next_id: AtomicUsize,
}

impl Pool {
    pub fn new(settings: PoolSettings, bundle: BundleSource) -> Arc<Self> {
        let pool = Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            settings,
            bundle,
            next_id: AtomicUsize::new(1),
        });
        let weak = Arc::downgrade(&pool);
        let every =
            (pool.settings.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.reap();
            }
        });
        pool
    }

    /// Connections open per entry, for tests and the admin endpoint.
    pub fn connections(&self) -> usize {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries
            .values()
            .map(|e| e.connections.iter().filter(|c| !c.closed.load(Ordering::Acquire)).count())
            .sum()
    }

    /// Connections taking streams, and the streams open on the connections
    /// the pool holds (a retired one is let go once reaped), for the metrics.
    pub fn stats(&self) -> crate::metrics::PoolStats {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stats = crate::metrics::PoolStats::default();
        for c in entries.values().flat_map(|e| &e.connections) {
            stats.connections += u64::from(!c.closed.load(Ordering::Acquire));
            stats.streams += c.streams.load(Ordering::Acquire) as u64;
        }
        stats
    }

    /// Drops closed connections and idle ones.
    fn reap(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for entry in entries.values_mut() {
            entry.connections.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && c.idle_since.lock().is_ok_and(|t| t.elapsed() > self.settings.idle_timeout);
                !c.closed.load(Ordering::Acquire) && !idle
            });
        }
        entries.retain(|_, e| !e.connections.is_empty());
    }

    fn reserve(&self, key: &PoolKey, credential: &Credential) -> Option<Slot> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = entries.get(key)?;
        entry
            .connections
            .iter()
            .find(|c| c.reserve(self.settings.max_streams, credential))
            .map(|c| Slot(c.clone()))
    }

    fn opening_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<Option<(Instant, HboneError)>>> {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.entry(key.clone()).or_default().opening.clone()
    }

    /// Opens a CONNECT stream: on a pooled connection with room, or a new
    /// one; gives up after `wait_timeout`.
    pub async fn open(
        self: &Arc<Self>,
        key: PoolKey,
        netns: &Netns,
        credential: Arc<Credential>,
        request: Request<()>,
        early: &EarlyBounds,
    ) -> Result<HboneStream, HboneError> {
        let (slot, response, send) = self.stream_in_time(&key, netns, &credential, &request).await?;
        // Sent again on another connection if the server turns it away
        // unprocessed (its graceful shutdown raced this stream).
        let reopen: Reopen = {
            let (pool, netns) = (self.clone(), netns.clone());
            let lost_on = slot.0.clone();
            Box::new(move || {
                Box::pin(async move {
                    lost_on.closed.store(true, Ordering::Release);
                    let (slot, response, send) = pool
                        .stream_in_time(&key, &netns, &credential, &request)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok(Reopened { response, send, slot: Box::new(slot) })
                })
            })
        };
        // The caller's bytes may follow the CONNECT at once (the server
        // buffers them until it has reached the destination), within
        // `early`'s bounds. The answer is awaited by the first read; a
        // refusal (401, 503, ...) surfaces there.
        let (reader, writer) =
            client_stream(response, send, early.per_stream, early.budget.clone(), Some(reopen));
        Ok(HboneStream { reader, writer, connection_id: slot.0.id, _slot: SlotGuard(slot) })
    }

    /// Sends the CONNECT on a pooled connection with room, or a new one;
    /// gives up after `wait_timeout`.
    async fn stream_in_time(
        &self,
        key: &PoolKey,
        netns: &Netns,
        credential: &Credential,
        request: &Request<()>,
    ) -> Result<SentConnect, HboneError> {
        let wait = self.settings.wait_timeout;
        let attempts = async {
            let port = request.uri().port_u16().unwrap_or(0);
            // A connection can die between its last use and this one (GOAWAY,
            // peer restart): one retry on a fresh connection.
            for attempt in 0..2 {
                let slot = match self.reserve(key, credential) {
                    Some(s) => s,
                    None => {
                        let lock = self.opening_lock(key);
                        let waited_from = Instant::now();
                        let mut opening = lock.lock().await;
                        // The setup this stream waited for failed: so does it.
                        if let Some((at, e)) = opening.as_ref()
                            && *at >= waited_from
                        {
                            return Err(e.clone());
                        }
                        match self.reserve(key, credential) {
                            Some(s) => s,
                            None => match self.open_connection(key, netns, credential, port).await {
                                Ok(s) => s,
                                Err(e) => {
                                    *opening = Some((Instant::now(), e.clone()));
                                    return Err(e);
                                }
                            },
                        }
                    }
                };
                match send(&slot.0, key.destination, clone_request(request)).await {
                    Ok((response, send)) => return Ok((slot, response, send)),
                    Err(SendError::Connection(e)) => {
                        slot.0.closed.store(true, Ordering::Release);
                        if attempt == 1 {
                            return Err(e);
                        }
                    }
                }
            }
            Err(HboneError::Protocol { target: key.destination, error: "no usable connection".into() })
        };
        match tokio::time::timeout(wait, attempts).await {
            Ok(r) => r,
            Err(_) => Err(HboneError::PoolTimeout { target: key.destination, waited: wait }),
        }
    }

    /// Dials, handshakes mTLS and HTTP/2, and adds the connection to the pool
    /// with one slot already taken.
    async fn open_connection(
        &self,
        key: &PoolKey,
        netns: &Netns,
        credential: &Credential,
        port: u16,
    ) -> Result<Slot, HboneError> {
        let target = key.destination;
        let unreachable = |error: String| HboneError::Unreachable { target, error };
        let setup = async {
            let socket = netns.tcp_socket(target).await.map_err(|e| unreachable(e.to_string()))?;
            self.settings.sockets.apply(&socket);
            let tcp = socket.connect(target).await.map_err(|e| unreachable(e.to_string()))?;
            let config = tls::client_config(
                credential.certified.clone(),
                self.bundle.clone(),
                Expect::Identity(key.destination_identity.clone()),
                self.settings.clock_skew,
                &[ALPN_H2],
                key.shared_address,
            )
            .map_err(|e| HboneError::Tls {
                target,
                reason: "tls_config",
                error: e.to_string(),
                certificate: None,
            })?;
            // Without SNI the name only satisfies the API.
            let name = if key.shared_address {
                ServerName::try_from(sni_for_port(port)).map_err(|e| HboneError::Tls {
                    target,
                    reason: "tls_config",
                    error: e.to_string(),
                    certificate: None,
                })?
            } else {
                ServerName::IpAddress(target.ip().into())
            };
            let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| {
                let (reason, error, certificate) = tls::verify::handshake_failure(&e, "tls_error");
                HboneError::Tls { target, reason, error, certificate }
            })?;
            let (_, session) = tls.get_ref();
            let peer_not_after = session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::verify::not_after)
                .ok_or_else(|| HboneError::Tls {
                    target,
                    reason: "bad_certificate",
                    error: "the peer's certificate has no readable validity".into(),
                    certificate: None,
                })?;
            let (sender, connection) =
                client_builder().handshake::<_, Bytes>(tls).await.map_err(|e| h2_failure(target, &e))?;
            Ok::<_, HboneError>((sender, connection, peer_not_after))
        };
        // The bundle as the handshake saw it (or newer: then the connection
        // is retired at its first use, which is only cautious).
        let mut bundle = self.bundle.clone();
        bundle.borrow_and_update();
        let (sender, mut connection, peer_not_after) =
            tokio::time::timeout(self.settings.connect_timeout, setup).await.map_err(|_| {
                unreachable(format!("no connection within {:?}", self.settings.connect_timeout))
            })??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        let conn = Arc::new(Connection {
            id,
            sender,
            streams: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            serial: credential.serial.clone(),
            peer_not_after,
            bundle,
        });
        let ping_pong = connection.ping_pong();
        // Only a weak reference: the connection must close once the pool and
        // its streams let go of it (h2 closes when no sender is left).
        let driven = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let outcome = match ping_pong {
                Some(pp) => tokio::select! {
                    r = &mut connection => r.err().map(|e| e.to_string()),
                    e = keepalive(pp) => Some(e.to_string()),
                },
                None => connection.await.err().map(|e| e.to_string()),
            };
            if let Some(c) = driven.upgrade() {
                c.closed.store(true, Ordering::Release);
            }
            match outcome {
                Some(e) => tracing::debug!(connection = id, %target, "HBONE connection ended: {e}"),
                None => tracing::debug!(connection = id, %target, "HBONE connection closed"),
            }
        });
        tracing::debug!(connection = id, %target, identity = %key.destination_identity, "HBONE connection opened");
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        entries.entry(key.clone()).or_default().connections.push(conn.clone());
        Ok(Slot(conn))
    }
}

enum SendError {
    /// The connection failed before the request left: worth a retry on a
    /// new one.
    Connection(HboneError),
}

async fn send(
    conn: &Connection,
    target: SocketAddr,
    request: Request<()>,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), SendError> {
    let protocol = |e: h2::Error| SendError::Connection(h2_failure(target, &e));
    let mut sender = conn.sender.clone().ready().await.map_err(protocol)?;
    sender.send_request(request, false).map_err(protocol)
}

/// An HTTP/2 failure, with the TLS reason when the peer's TLS refused us:
/// in TLS 1.3 a client learns that its certificate was refused only after
/// its side of the handshake, from the alert that ends the first read.
fn h2_failure(target: SocketAddr, e: &h2::Error) -> HboneError {
    let tls = e.get_io().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<rustls::Error>());
    match tls {
        Some(t) => {
            let (reason, error, certificate) = tls::verify::rustls_failure(t);
            HboneError::Tls { target, reason, error, certificate }
        }
        None => HboneError::Protocol { target, error: e.to_string() },
    }
}

fn clone_request(r: &Request<()>) -> Request<()> {
    let mut c = Request::new(());
    *c.method_mut() = r.method().clone();
    *c.uri_mut() = r.uri().clone();
    *c.version_mut() = r.version();
    *c.headers_mut() = r.headers().clone();
    c
}
