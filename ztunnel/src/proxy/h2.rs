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

use std::{
    io,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
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
    /// The CONNECT's fate, for the writer (client streams).
    answer: Option<watch::Sender<Answer>>,
    /// Sends the CONNECT again once if the server never processed it.
    reopen: Option<Reopen>,
    /// What the writer sent before the answer, shared with it.
    unanswered: Option<Arc<Mutex<Unanswered>>>,
    /// A reopened stream's slot on its connection.
    _reopened_slot: Option<Box<dyn Send + Sync>>,
}

enum ReaderState {
    /// A client stream whose response has not arrived: data may already be
    /// flowing the other way (the server buffers it until it is connected).
    Awaiting(h2::client::ResponseFuture),
    Body(RecvStream),
}

/// Where a client stream's CONNECT stands, as its writer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Pending,
    /// Sent again on another connection, with the early data: the writer
    /// carries on there.
    Reopened,
    /// Answered (or failed for good): early data is unbounded from now on.
    Settled,
}

/// A CONNECT sent again on another connection.
pub struct Reopened {
    pub response: h2::client::ResponseFuture,
    pub send: SendStream<Bytes>,
    /// Keeps the stream's slot on its connection taken.
    pub slot: Box<dyn Send + Sync>,
}

/// Sends the CONNECT again on another connection, for a stream the server
/// never processed.
pub type Reopen = Box<dyn FnOnce() -> BoxFuture<'static, io::Result<Reopened>> + Send>;

/// Early data of a client stream not answered yet: kept so that a reopened
/// stream can carry it again, and the reopened stream's sending half until
/// the writer takes it.
#[derive(Default)]
struct Unanswered {
    sent: Vec<Bytes>,
    finished: bool,
    replacement: Option<SendStream<Bytes>>,
}

fn lock(u: &Mutex<Unanswered>) -> std::sync::MutexGuard<'_, Unanswered> {
    u.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a stream failed without the server having processed it: it was
/// above the last stream a graceful GOAWAY let through (RFC 9113 §6.8: such
/// a stream may be sent again). This is a server's graceful shutdown racing
/// a new stream: h2 answers the server's shutdown PING before it writes
/// HEADERS queued just earlier, so the final GOAWAY can exclude them.
fn never_processed(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::NO_ERROR)
}

/// A CONNECT that failed and was not sent again: whatever the writer waits
/// for is settled.
struct SettleOnDrop<'a>(&'a Option<watch::Sender<Answer>>);

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            a.send_if_modified(|s| {
                let changed = *s != Answer::Settled;
                *s = Answer::Settled;
                changed
            });
        }
    }
}

/// A CONNECT answered with something else than 200, seen by the first read.
#[derive(Debug, thiserror::Error)]
#[error("CONNECT answered {status}")]
pub struct ConnectRefused {
    pub status: u16,
}

impl H2Reader {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            state: ReaderState::Body(recv),
            answer: None,
            reopen: None,
            unanswered: None,
            _reopened_slot: None,
        }
    }

    async fn body(&mut self) -> io::Result<&mut RecvStream> {
        if let ReaderState::Awaiting(response) = &mut self.state {
            let _settle = SettleOnDrop(&self.answer);
            let mut response = response.await;
            if let Err(e) = &response
                && never_processed(e)
                && let Some(reopen) = self.reopen.take()
                && let Some(unanswered) = &self.unanswered
            {
                tracing::debug!(
                    "HBONE stream refused by the server's GOAWAY before it was processed: sending it again"
                );
                let reopened = reopen().await?;
                {
                    let mut u = lock(unanswered);
                    let mut send = reopened.send;
                    for b in &u.sent {
                        send.send_data(b.clone(), false).map_err(h2_to_io)?;
                    }
                    if u.finished {
                        send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                    }
                    u.replacement = Some(send);
                }
                self._reopened_slot = Some(reopened.slot);
                if let Some(a) = &self.answer {
                    let _ = a.send(Answer::Reopened);
                }
                response = reopened.response.await;
            }
            // Answered (or failed for good): nothing is sent again from here.
            self.reopen = None;
            if let Some(u) = self.unanswered.take() {
                lock(&u).sent = Vec::new();
            }
            drop(_settle);
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

/// A client CONNECT stream whose answer has not come: its reader and writer,
/// which share the early data (bounded by `per_stream` and the source's
/// `budget`) so that `reopen` can send it again on another connection if
/// the server turns the stream away unprocessed.
pub fn client_stream(
    response: h2::client::ResponseFuture,
    send: SendStream<Bytes>,
    per_stream: usize,
    budget: Arc<Budget>,
    reopen: Option<Reopen>,
) -> (H2Reader, H2Writer) {
    let (answer, answered) = watch::channel(Answer::Pending);
    let unanswered = Arc::new(Mutex::new(Unanswered::default()));
    let reader = H2Reader {
        state: ReaderState::Awaiting(response),
        answer: Some(answer),
        reopen,
        unanswered: Some(unanswered.clone()),
        _reopened_slot: None,
    };
    let early = EarlyData { answered, per_stream, sent: 0, budget, held: 0, unanswered };
    (reader, H2Writer { send, early: Some(early), switched: false })
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
    /// Writing to a reopened stream: a second loss is final.
    switched: bool,
}

/// Bytes a client sends before its CONNECT is answered: the tunnel holds
/// them for a destination that may be slow to answer, so they are bounded
/// per stream and, through the source workload's budget, per workload. Past
/// either bound the client is read no further until the answer comes.
pub struct EarlyData {
    answered: watch::Receiver<Answer>,
    per_stream: usize,
    sent: usize,
    budget: Arc<Budget>,
    /// Bytes taken from the budget, given back once answered.
    held: usize,
    unanswered: Arc<Mutex<Unanswered>>,
}

impl EarlyData {
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
        Self { send, early: None, switched: false }
    }

    /// Takes the reopened stream's sending half if the reader made one.
    fn take_replacement(&mut self, u: &mut Unanswered) {
        if let Some(send) = u.replacement.take() {
            self.send = send;
            self.switched = true;
        }
    }

    /// The answer came (or the reader is gone): no bound from now on.
    fn settle(&mut self) {
        if let Some(mut early) = self.early.take() {
            early.release();
            let unanswered = early.unanswered.clone();
            self.take_replacement(&mut lock(&unanswered));
        }
    }

    /// How much of `len` bytes may go now; waits for the answer when nothing
    /// may. Once the stream is answered there is no bound.
    async fn early_allowance(&mut self, len: usize) -> usize {
        loop {
            let Some(early) = &mut self.early else { return len };
            if *early.answered.borrow_and_update() == Answer::Settled {
                self.settle();
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
                self.settle();
                return len;
            }
        }
    }

    /// Sends early data, kept until the answer so that a reopened stream
    /// carries it too.
    async fn send_early(&mut self, part: Bytes) -> io::Result<()> {
        let Some(early) = &self.early else { return self.send_all(part).await };
        let unanswered = early.unanswered.clone();
        {
            let mut u = lock(&unanswered);
            self.take_replacement(&mut u);
            u.sent.push(part.clone());
        }
        match self.send_all(part).await {
            Ok(()) => Ok(()),
            Err(e) => self.after_loss(e).await,
        }
    }

    /// A send failed before the answer: if the reader sends the stream
    /// again, what was sent went with it and writing goes on there.
    async fn after_loss(&mut self, e: io::Error) -> io::Result<()> {
        loop {
            let Some(early) = &mut self.early else { return Err(e) };
            if self.switched {
                return Err(e);
            }
            let answer = *early.answered.borrow_and_update();
            if answer != Answer::Pending {
                let unanswered = early.unanswered.clone();
                let mut u = lock(&unanswered);
                // Not switched yet: a replacement here is the reopen.
                if u.replacement.is_none() {
                    return Err(e);
                }
                self.take_replacement(&mut u);
                return Ok(());
            }
            if early.answered.changed().await.is_err() {
                return Err(e);
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
            self.send_early(part).await?;
        }
        self.send_all(chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        if let Some(early) = &self.early {
            let unanswered = early.unanswered.clone();
            let mut u = lock(&unanswered);
            self.take_replacement(&mut u);
            u.finished = true;
        }
        match self.send.send_data(Bytes::new(), true).map_err(h2_to_io) {
            Err(e) if self.early.is_some() => self.after_loss(e).await,
            r => r,
        }
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

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    fn connect() -> Request<()> {
        Request::builder().method(Method::CONNECT).uri("198.18.0.9:5432").body(()).unwrap_or_default()
    }

    fn budget() -> Arc<Budget> {
        Arc::new(Budget {
            early_data: tokio::sync::Semaphore::new(1 << 20),
            deliveries: tokio::sync::Semaphore::new(16),
        })
    }

    /// A server shutting down as h2's graceful shutdown does when the race
    /// goes against the client: it takes the client's first stream (HEADERS
    /// and DATA) and then sends the final GOAWAY with a last stream id below
    /// it, so the stream was never processed. Raw frames, since no server
    /// API chooses the last stream id. Tells `sent` once the GOAWAY is out.
    async fn turns_the_first_stream_away(mut io: DuplexStream, sent: tokio::sync::oneshot::Sender<()>) {
        let mut preface = [0u8; 24];
        if io.read_exact(&mut preface).await.is_err() {
            return;
        }
        // SETTINGS (empty), then frames as they come.
        let _ = io.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
        let mut sent = Some(sent);
        let (mut headers, mut data) = (false, false);
        loop {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return;
            }
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            match head[3] {
                // SETTINGS without ACK: acknowledge it.
                4 if head[4] & 1 == 0 => {
                    let _ = io.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                }
                1 if stream == 1 => headers = true,
                0 if stream == 1 => data = true,
                _ => {}
            }
            if headers
                && data
                && let Some(s) = sent.take()
            {
                // GOAWAY: last stream 0, NO_ERROR.
                let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                let _ = io.write_all(&goaway).await;
                let _ = s.send(());
            }
        }
    }

    /// An HBONE-like server that answers every CONNECT 200 and echoes it.
    async fn echoes(io: DuplexStream) {
        let Ok(mut conn) = server_builder().handshake::<_, Bytes>(io).await else { return };
        while let Some(Ok((request, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let Ok(mut send) = respond.send_response(Response::new(()), false) else { return };
                let mut body = request.into_body();
                while let Some(Ok(b)) = body.data().await {
                    let _ = body.flow_control().release_capacity(b.len());
                    let _ = send.send_data(b, false);
                }
                let _ = send.send_data(Bytes::new(), true);
            });
        }
    }

    async fn client(io: DuplexStream) -> h2::client::SendRequest<Bytes> {
        let (send, conn) = client_builder().handshake::<_, Bytes>(io).await.unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(conn);
        send
    }

    /// A stream on a connection whose server turns it away, and a reopen
    /// that sends it again to an echo server; tells `goaway` once the first
    /// server has sent its GOAWAY.
    async fn lost_stream(with_reopen: bool) -> (H2Reader, H2Writer, tokio::sync::oneshot::Receiver<()>) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (goaway_tx, goaway) = tokio::sync::oneshot::channel();
        tokio::spawn(turns_the_first_stream_away(server_io, goaway_tx));
        let mut lost = client(client_io).await;
        let (echo_client_io, echo_server_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(echoes(echo_server_io));
        let echo = client(echo_client_io).await;

        lost = lost.ready().await.unwrap_or_else(|e| panic!("{e}"));
        let (response, send) = lost.send_request(connect(), false).unwrap_or_else(|e| panic!("{e}"));
        let reopen: Option<Reopen> = with_reopen.then(|| -> Reopen {
            Box::new(move || {
                Box::pin(async move {
                    let mut ready = echo.ready().await.map_err(h2_to_io)?;
                    let (response, send) = ready.send_request(connect(), false).map_err(h2_to_io)?;
                    Ok(Reopened { response, send, slot: Box::new(()) })
                })
            })
        });
        let (reader, writer) = client_stream(response, send, 64 * 1024, budget(), reopen);
        (reader, writer, goaway)
    }

    async fn read_all(reader: &mut H2Reader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(b) = reader.read_chunk().await? {
            reader.consumed(b.len());
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_stream_a_goaway_turned_away_unprocessed_goes_again_with_its_early_data() {
        let (mut reader, mut writer, goaway) = lost_stream(true).await;
        let write = async {
            writer.write_chunk(Bytes::from_static(b"sent before the GOAWAY, ")).await?;
            let _ = goaway.await;
            // Written to the lost stream or the new one, whichever the
            // writer finds: it must arrive once, in order.
            writer.write_chunk(Bytes::from_static(b"after it, ")).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_chunk(Bytes::from_static(b"after the answer")).await?;
            writer.finish().await
        };
        let (written, read) = tokio::join!(write, read_all(&mut reader));
        written.unwrap_or_else(|e| panic!("writing: {e}"));
        let read = read.unwrap_or_else(|e| panic!("reading: {e}"));
        assert_eq!(String::from_utf8_lossy(&read), "sent before the GOAWAY, after it, after the answer");
    }

    /// The same stream without a reopen fails: what the test above survives
    /// is a real loss.
    #[tokio::test]
    async fn without_a_reopen_the_stream_turned_away_fails() {
        let (mut reader, mut writer, _goaway) = lost_stream(false).await;
        writer.write_chunk(Bytes::from_static(b"early")).await.unwrap_or_else(|e| panic!("{e}"));
        let read = read_all(&mut reader).await;
        // The GOAWAY's NO_ERROR, as h2_to_io words it.
        assert_eq!(read.map_err(|e| e.kind()).err(), Some(io::ErrorKind::UnexpectedEof));
    }
}
