//! Copies bytes both ways between two connections.
//!
//! * Half-close is honoured: when one side finishes sending, the other side's
//!   write half is shut down (FIN, or END_STREAM on HBONE) and the opposite
//!   direction keeps flowing until it finishes too.
//! * Backpressure, not buffering: each direction holds one chunk at a time and
//!   reads again only after it was written; an HBONE stream's flow-control
//!   window is released only once its bytes were written onwards.
//! * No copy that is not needed: chunks are `Bytes` handed from reader to
//!   writer. A TCP read lands in a buffer that becomes the chunk; an HTTP/2
//!   DATA frame is the chunk.
//! * Buffers grow with the flow: a chatty connection reads 1 KiB at a time;
//!   one whose reads keep filling the buffer grows to 16 KiB, then 256 KiB.
//! * An error on one side ends both; the caller turns a reset into a reset.

use std::{
    future::Future,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 256 * 1024;
const GROWTH: usize = 16;
/// Consecutive full reads before the buffer grows.
const FULL_READS_TO_GROW: u32 = 4;

/// A source of chunks.
pub trait ChunkRead {
    /// The next chunk, or None at end of stream.
    fn read_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
    /// `n` bytes of earlier chunks were written onwards (flow control).
    fn consumed(&mut self, _n: usize) {}
}

/// A sink of chunks.
pub trait ChunkWrite {
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// No more data: FIN, or END_STREAM.
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send;
}

/// Reads any `AsyncRead` into a buffer that grows with the flow.
pub struct BufReader<R> {
    inner: R,
    buf: BytesMut,
    size: usize,
    full_reads: u32,
}

impl<R> BufReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, buf: BytesMut::new(), size: INITIAL_BUFFER, full_reads: 0 }
    }
}

impl<R: AsyncRead + Unpin + Send> ChunkRead for BufReader<R> {
    async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        // Reuses the allocation once earlier chunks are gone.
        self.buf.reserve(self.size);
        let n = self.inner.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Ok(None);
        }
        if n >= self.size && self.size < MAX_BUFFER {
            self.full_reads += 1;
            if self.full_reads >= FULL_READS_TO_GROW {
                self.size = (self.size * GROWTH).min(MAX_BUFFER);
                self.full_reads = 0;
            }
        } else {
            self.full_reads = 0;
        }
        Ok(Some(self.buf.split().freeze()))
    }
}

impl<T: ChunkRead + Send> ChunkRead for &mut T {
    fn read_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send {
        (**self).read_chunk()
    }
    fn consumed(&mut self, n: usize) {
        (**self).consumed(n);
    }
}

impl<T: ChunkWrite + Send> ChunkWrite for &mut T {
    fn write_chunk(&mut self, chunk: Bytes) -> impl Future<Output = io::Result<()>> + Send {
        (**self).write_chunk(chunk)
    }
    fn finish(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        (**self).finish()
    }
}

/// Writes chunks to any `AsyncWrite`.
pub struct Writer<W>(pub W);

impl<W: AsyncWrite + Unpin + Send> ChunkWrite for Writer<W> {
    async fn write_chunk(&mut self, chunk: Bytes) -> io::Result<()> {
        self.0.write_all(&chunk).await
    }

    async fn finish(&mut self) -> io::Result<()> {
        self.0.flush().await?;
        self.0.shutdown().await
    }
}

/// Which side of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that opened the connection (the captured client, or the
    /// HBONE caller).
    Downstream,
    /// The side the tunnel dialled.
    Upstream,
}

/// How a relay ended badly.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} {op}: {source}")]
pub struct RelayError {
    pub side: Side,
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

impl RelayError {
    /// Whether the peer on `side` reset its connection (or stream).
    pub fn is_reset(&self) -> bool {
        matches!(
            self.source.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
        )
    }
}

/// Bytes moved so far, readable while the relay runs.
#[derive(Debug, Default)]
pub struct Transferred {
    /// Downstream -> upstream.
    pub sent: AtomicU64,
    /// Upstream -> downstream.
    pub received: AtomicU64,
}

impl Transferred {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Relays until both directions have finished, or one fails.
pub async fn relay<DR, DW, UR, UW>(
    (mut down_read, mut down_write): (DR, DW),
    (mut up_read, mut up_write): (UR, UW),
    transferred: &Transferred,
) -> Result<(), RelayError>
where
    DR: ChunkRead,
    DW: ChunkWrite,
    UR: ChunkRead,
    UW: ChunkWrite,
{
    let outbound =
        copy_one_way(&mut down_read, &mut up_write, &transferred.sent, Side::Downstream, Side::Upstream);
    let inbound =
        copy_one_way(&mut up_read, &mut down_write, &transferred.received, Side::Upstream, Side::Downstream);
    tokio::try_join!(outbound, inbound).map(|_| ())
}

/// Copies `from` to `to` until `from` ends, then finishes `to`.
async fn copy_one_way<R: ChunkRead, W: ChunkWrite>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    from_side: Side,
    to_side: Side,
) -> Result<(), RelayError> {
    while let Some(chunk) =
        from.read_chunk().await.map_err(|source| RelayError { side: from_side, op: "read", source })?
    {
        let n = chunk.len();
        to.write_chunk(chunk).await.map_err(|source| RelayError { side: to_side, op: "write", source })?;
        from.consumed(n);
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    to.finish().await.map_err(|source| RelayError { side: to_side, op: "finish", source })
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn halves(
        s: &mut TcpStream,
    ) -> (BufReader<tokio::net::tcp::ReadHalf<'_>>, Writer<tokio::net::tcp::WriteHalf<'_>>) {
        let (r, w) = s.split();
        (BufReader::new(r), Writer(w))
    }

    /// client <-> [down | relay | up] <-> server, over real sockets.
    #[tokio::test]
    async fn relays_both_ways_and_honours_half_close() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let transferred = std::sync::Arc::new(Transferred::default());
        let t = transferred.clone();
        let relay = tokio::spawn(async move { relay(halves(&mut down), halves(&mut up), &t).await });

        // 3 MiB upstream so the buffer grows, then the client half-closes.
        let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected, "server got the client's bytes, then EOF");
        // The other direction still works after the client's half-close.
        server.write_all(b"reply after half-close").await.unwrap();
        server.shutdown().await.unwrap();
        let mut client = writer.await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply after half-close");
        relay.await.unwrap().unwrap();
        assert_eq!(transferred.sent(), expected.len() as u64);
        assert_eq!(transferred.received(), 22);
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_a_reset_error() {
        let (client, mut down) = pair().await;
        let (mut up, _server) = pair().await;
        // Abortive close: RST instead of FIN.
        crate::sockopt::reset_on_close(&client);
        drop(client);
        let t = Transferred::default();
        let err = relay(halves(&mut down), halves(&mut up), &t).await.unwrap_err();
        assert_eq!(err.side, Side::Downstream);
        assert!(err.is_reset(), "{err}");
    }
}
