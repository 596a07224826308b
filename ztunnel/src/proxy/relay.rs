//! Copies bytes both ways between two connections.
//!
//! * Half-close is honoured: when one side finishes sending, the other side's
//!   write half is shut down (FIN, or END_STREAM on HBONE) and the opposite
//!   direction keeps flowing until it finishes too.
//! * Backpressure, not buffering: each direction holds one buffer and reads
//!   again only after the previous bytes were written.
//! * Buffers grow with the flow: an idle or chatty connection keeps 1 KiB per
//!   direction; one whose reads keep filling the buffer grows to 16 KiB, then
//!   256 KiB, so bulk transfers make few, large syscalls.
//! * An error on one side ends both; the caller turns a reset into a reset.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 256 * 1024;
const GROWTH: usize = 16;
/// Consecutive full reads before the buffer grows.
const FULL_READS_TO_GROW: u32 = 4;

/// Which side of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that opened the connection (the captured client).
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
    /// Whether the peer on `side` reset its connection.
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
    DR: AsyncRead + Unpin,
    DW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let outbound =
        copy_one_way(&mut down_read, &mut up_write, &transferred.sent, Side::Downstream, Side::Upstream);
    let inbound =
        copy_one_way(&mut up_read, &mut down_write, &transferred.received, Side::Upstream, Side::Downstream);
    tokio::try_join!(outbound, inbound).map(|_| ())
}

/// Copies `from` to `to` until `from` ends, then shuts `to`'s write half.
async fn copy_one_way<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    from_side: Side,
    to_side: Side,
) -> Result<(), RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut full_reads = 0;
    loop {
        let n =
            from.read(&mut buf).await.map_err(|source| RelayError { side: from_side, op: "read", source })?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).await.map_err(|source| RelayError { side: to_side, op: "write", source })?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() && buf.len() < MAX_BUFFER {
            full_reads += 1;
            if full_reads >= FULL_READS_TO_GROW {
                buf.resize((buf.len() * GROWTH).min(MAX_BUFFER), 0);
                full_reads = 0;
            }
        } else {
            full_reads = 0;
        }
    }
    to.flush().await.map_err(|source| RelayError { side: to_side, op: "flush", source })?;
    to.shutdown().await.map_err(|source| RelayError { side: to_side, op: "shutdown", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// client <-> [down | relay | up] <-> server, over real sockets.
    #[tokio::test]
    async fn relays_both_ways_and_honours_half_close() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let transferred = std::sync::Arc::new(Transferred::default());
        let t = transferred.clone();
        let relay = tokio::spawn(async move {
            let (dr, dw) = down.split();
            let (ur, uw) = up.split();
            relay((dr, dw), (ur, uw), &t).await
        });

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
        let (dr, dw) = down.split();
        let (ur, uw) = up.split();
        let err = relay((dr, dw), (ur, uw), &t).await.unwrap_err();
        assert_eq!(err.side, Side::Downstream);
        assert!(err.is_reset(), "{err}");
    }
}
