//! HTTP/2 for HBONE: the settings both sides use (Istio's), and a CONNECT
//! stream as a chunk reader and writer for the relay.
//!
//! * Windows: 4 MiB per stream, 16 MiB per connection, 1 MiB frames. A stream
//!   whose reader stalls only stops its own window: the others keep flowing.
//! * A received DATA frame is handed on as is; its window is released only
//!   after it was written onwards (backpressure end to end).
//! * Half-close is END_STREAM. A reset of the TCP side becomes
//!   RST_STREAM(CONNECT_ERROR) (RFC 9113 §8.5) and a reset stream becomes a
//!   TCP reset; NO_ERROR counts as a clean end.
//! * Both sides send a PING every 10 s and drop a connection that does not
//!   answer within 20 s.

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::sync::watch;

use super::relay::{ChunkRead, ChunkWrite};
use crate::limits::Budget;

pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per pooled connection (Istio's default).
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// What a server accepts at once on one connection.
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .initial_max_send_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .enable_push(false);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(SERVER_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(64 * 1024)
        .max_send_buffer_size(400 * 1024);
    b
}

/// Keeps a connection alive and notices a dead peer: returns when a PING is
/// not answered in time (or the connection is gone).
pub async fn keepalive(mut ping_pong: h2::PingPong) -> io::Error {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tick.tick().await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return h2_to_io(e),
            Err(_) => return io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 PING not answered within 20s"),
        }
    }
}

/// An h2 error as an I/O error: a reset stream is a reset connection.
pub fn h2_to_io(e: h2::Error) -> io::Error {
    if let Some(reason) = e.reason() {
        let kind = match reason {
            Reason::NO_ERROR => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::ConnectionReset,
        };
        return io::Error::new(kind, format!("HTTP/2 stream reset: {reason}"));
    }
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::other(e.to_string())
}

/// The receiving half of a CONNECT stream.
pub struct H2Reader {
    state: ReaderState,
    /// Told when the CONNECT is answered (client streams).
    answered: Option<watch::Sender<bool>>,
}

enum ReaderState {
    /// A client stream whose response has not arrived: data may already be
    /// flowing the other way (the server buffers it until it is connected).
    Awaiting(h2::client::ResponseFuture),
    Body(RecvStream),
}

/// A CONNECT answered with something else than 200, seen by the first read.
#[derive(Debug, thiserror::Error)]
#[error("CONNECT answered {status}")]
pub struct ConnectRefused {
    pub status: u16,
}

impl H2Reader {
    pub fn new(recv: RecvStream) -> Self {
        Self { state: ReaderState::Body(recv), answered: None }
    }

    /// The response side of a client stream whose CONNECT is still pending;
    /// `answered` learns when it is answered (the writer's early data waits
    /// on it).
    pub fn awaiting(response: h2::client::ResponseFuture, answered: watch::Sender<bool>) -> Self {
        Self { state: ReaderState::Awaiting(response), answered: Some(answered) }
    }

    async fn body(&mut self) -> io::Result<&mut RecvStream> {
        if let ReaderState::Awaiting(response) = &mut self.state {
            let response = response.await;
            if let Some(a) = self.answered.take() {
                let _ = a.send(true);
            }
            let response = response.map_err(h2_to_io)?;
            let status = response.status().as_u16();
            if status != 200 {
                return Err(io::Error::new(io::ErrorKind::ConnectionRefused, ConnectRefused { status }));
            }
            self.state = ReaderState::Body(response.into_body());
        }
        match &mut self.state {
            ReaderState::Body(recv) => Ok(recv),
            ReaderState::Awaiting(_) => Err(io::Error::other("HTTP/2 response missing")),
        }
    }
}

impl ChunkRead for H2Reader {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let recv = self.body().await?;
        loop {
            match recv.data().await {
                None => return Ok(None),
                Some(Ok(b)) if b.is_empty() => {}
                Some(Ok(b)) => return Ok(Some(b)),
                Some(Err(e)) => {
                    // A stream the peer ended with NO_ERROR is a clean end.
                    if e.reason() == Some(Reason::NO_ERROR) {
                        return Ok(None);
                    }
                    return Err(h2_to_io(e));
                }
            }
        }
    }

    fn consumed(&mut self, n: usize) {
        if let ReaderState::Body(recv) = &mut self.state {
            let _ = recv.flow_control().release_capacity(n);
        }
    }
}

/// The sending half of a CONNECT stream.
pub struct H2Writer {
    send: SendStream<Bytes>,
    early: Option<EarlyData>,
}

/// Bytes a client sends before its CONNECT is answered: the tunnel holds
/// them for a destination that may be slow to answer, so they are bounded
/// per stream and, through the source workload's budget, per workload. Past
/// either bound the client is read no further until the answer comes.
pub struct EarlyData {
    answered: watch::Receiver<bool>,
    per_stream: usize,
    sent: usize,
    budget: Arc<Budget>,
    /// Bytes taken from the budget, given back once answered.
    held: usize,
}

impl EarlyData {
    /// A pair for one stream: the reader's side, and the writer's gate.
    pub fn new(per_stream: usize, budget: Arc<Budget>) -> (watch::Sender<bool>, Self) {
        let (tx, answered) = watch::channel(false);
        (tx, Self { answered, per_stream, sent: 0, budget, held: 0 })
    }

    fn release(&mut self) {
        self.budget.early_data.add_permits(std::mem::take(&mut self.held));
    }
}

impl Drop for EarlyData {
    fn drop(&mut self) {
        self.release();
    }
}

impl H2Writer {
    pub fn new(send: SendStream<Bytes>) -> Self {
        Self { send, early: None }
    }

    /// A client stream whose early data is bounded by `early`.
    pub fn with_early_data(send: SendStream<Bytes>, early: EarlyData) -> Self {
        Self { send, early: Some(early) }
    }

    /// How much of `len` bytes may go now; waits for the answer when nothing
    /// may. Once the stream is answered there is no bound.
    async fn early_allowance(&mut self, len: usize) -> usize {
        let Some(early) = &mut self.early else { return len };
        loop {
            if *early.answered.borrow() {
                early.release();
                self.early = None;
                return len;
            }
            let room = early.per_stream.saturating_sub(early.sent).min(len);
            let available = early.budget.early_data.available_permits().min(room);
            if available > 0
                && let Ok(p) = early.budget.early_data.try_acquire_many(available as u32)
            {
                p.forget();
                early.held += available;
                early.sent += available;
                return available;
            }
            // Nothing may go until the answer (or the stream's end).
            if early.answered.changed().await.is_err() {
                early.release();
                self.early = None;
                return len;
            }
        }
    }

    /// Resets the stream: how a TCP reset crosses HBONE.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
    }
}

impl ChunkWrite for H2Writer {
    async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while self.early.is_some() && !chunk.is_empty() {
            let n = self.early_allowance(chunk.len()).await;
            let part = chunk.split_to(n);
            self.send_all(part).await?;
        }
        self.send_all(chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.send.send_data(Bytes::new(), true).map_err(h2_to_io)
    }
}

impl H2Writer {
    async fn send_all(&mut self, mut chunk: Bytes) -> io::Result<()> {
        while !chunk.is_empty() {
            self.send.reserve_capacity(chunk.len());
            let granted = std::future::poll_fn(|cx| self.send.poll_capacity(cx)).await;
            let n = match granted {
                Some(Ok(n)) => n.min(chunk.len()),
                Some(Err(e)) => return Err(h2_to_io(e)),
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HTTP/2 stream closed")),
            };
            if n == 0 {
                continue;
            }
            self.send.send_data(chunk.split_to(n), false).map_err(h2_to_io)?;
        }
        Ok(())
    }
}
