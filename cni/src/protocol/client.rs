//! The plugin's half: one blocking request, bounded by one deadline.
//!
//! Blocking on purpose: the plugin is a short-lived process that does one
//! thing at a time, and every step (connect, send, receive) is bounded by
//! what is left of the caller's timeout, so a tunnel that accepts and never
//! answers cannot hang the container runtime.

use std::{
    io::{self, IoSlice, Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, BorrowedFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::Path,
    thread,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::socket::{ControlMessage, MsgFlags, sendmsg},
};
use socket2::{Domain, SockAddr, Socket, Type};

use super::{MAX_RESPONSE_LEN, ProtocolError, Request, Response, encode_line, find_line_end};

/// Sends `req` to the tunnel listening on `socket`, with the pod's network
/// namespace when `netns` is given, and returns the tunnel's answer. The
/// whole exchange, connect included, takes at most `timeout`.
///
/// A [`Response`] is returned whatever its `result`; the caller decides what
/// an `error` answer means (see [`super::Command::success`]).
pub fn request(
    socket: &Path,
    req: &Request,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Response, ProtocolError> {
    let deadline = Deadline::after(timeout);
    let stream = connect(socket, &deadline)?;
    exchange(&stream, req, netns, &deadline)
}

/// One request and its answer over an already connected stream.
fn exchange(
    stream: &UnixStream,
    req: &Request,
    netns: Option<BorrowedFd<'_>>,
    deadline: &Deadline,
) -> Result<Response, ProtocolError> {
    let line = encode_line(req)?;
    send(stream, &line, netns, deadline)?;
    let answer = receive_line(stream, deadline)?;
    serde_json::from_slice(&answer).map_err(ProtocolError::Malformed)
}

struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    fn after(budget: Duration) -> Self {
        Self { at: Instant::now() + budget, budget }
    }

    /// What is left, or the timeout error once nothing is.
    fn remaining(&self) -> Result<Duration, ProtocolError> {
        match self.at.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(ProtocolError::Timeout(self.budget)),
        }
    }

    fn timeout(&self) -> ProtocolError {
        ProtocolError::Timeout(self.budget)
    }
}

/// A blocked `SO_SNDTIMEO`/`SO_RCVTIMEO` operation reports `WouldBlock`.
fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn connect(path: &Path, deadline: &Deadline) -> Result<UnixStream, ProtocolError> {
    let connect_error = |source| ProtocolError::Connect { path: path.to_owned(), source };
    let addr = SockAddr::unix(path).map_err(connect_error)?;
    loop {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(connect_error)?;
        match socket.connect_timeout(&addr, deadline.remaining()?) {
            Ok(()) => {
                socket.set_nonblocking(false).map_err(connect_error)?;
                return Ok(UnixStream::from(OwnedFd::from(socket)));
            }
            // A full accept backlog (the tunnel is not accepting): a
            // non-blocking connect to a unix socket fails with EAGAIN
            // instead of waiting, so wait here, within the deadline.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(deadline.remaining()?.min(Duration::from_millis(20)));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(deadline.timeout()),
            Err(e) => return Err(connect_error(e)),
        }
    }
}

fn send(
    stream: &UnixStream,
    line: &[u8],
    netns: Option<BorrowedFd<'_>>,
    deadline: &Deadline,
) -> Result<(), ProtocolError> {
    stream.set_write_timeout(Some(deadline.remaining()?)).map_err(ProtocolError::Send)?;
    let fds = netns.map(|fd| [fd.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> =
        fds.as_ref().map(|fds| ControlMessage::ScmRights(fds)).into_iter().collect();
    let sent = loop {
        match sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(line)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(deadline.timeout()),
            Err(e) => return Err(ProtocolError::Send(e.into())),
        }
    };
    // The fd travelled with the first byte; whatever a short send left over
    // goes without it.
    if sent < line.len() {
        stream.set_write_timeout(Some(deadline.remaining()?)).map_err(ProtocolError::Send)?;
        (&*stream)
            .write_all(&line[sent..])
            .map_err(|e| if is_timeout(&e) { deadline.timeout() } else { ProtocolError::Send(e) })?;
    }
    Ok(())
}

/// Reads one line, without its newline. Anything after it is ignored: the
/// tunnel closes after its one answer.
fn receive_line(stream: &UnixStream, deadline: &Deadline) -> Result<Vec<u8>, ProtocolError> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find_line_end(&line, MAX_RESPONSE_LEN)? {
            line.truncate(end);
            return Ok(line);
        }
        stream.set_read_timeout(Some(deadline.remaining()?)).map_err(ProtocolError::Receive)?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(deadline.timeout()),
            Err(e) => return Err(ProtocolError::Receive(e)),
        };
        if n == 0 {
            return Err(ProtocolError::Closed { received: line.len() });
        }
        line.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::AsFd as _, os::unix::fs::MetadataExt as _};

    use super::*;
    use crate::protocol::{
        Command, DEFAULT_MAX_REQUEST_LEN, Outcome, PROTOCOL_VERSION,
        server::{read_request, serve_connection, write_response},
    };

    pub(crate) fn add_request() -> Request {
        Request {
            version: PROTOCOL_VERSION,
            command: Command::Add,
            container_id: "4f1c".into(),
            pod_namespace: "shop".into(),
            pod_name: "cart".into(),
            pod_uid: "0b6e".into(),
            netns_path: "/proc/self/ns/net".into(),
            interface: "eth0".into(),
            ips: vec!["10.244.1.5".parse().unwrap()],
        }
    }

    fn tokio_end(std: UnixStream) -> tokio::net::UnixStream {
        std.set_nonblocking(true).unwrap();
        tokio::net::UnixStream::from_std(std).unwrap()
    }

    /// The client's exchange and the server's halves over a socketpair, with
    /// a real network namespace fd: the tunnel holds the very namespace.
    #[tokio::test]
    async fn round_trip_over_a_socketpair_passes_the_netns() {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let server_end = tokio_end(server_end);
        let client = tokio::task::spawn_blocking(move || {
            let netns = File::open("/proc/self/ns/net").unwrap();
            exchange(
                &client_end,
                &add_request(),
                Some(netns.as_fd()),
                &Deadline::after(Duration::from_secs(30)),
            )
        });

        let (req, fd) = read_request(&server_end, DEFAULT_MAX_REQUEST_LEN).await.unwrap();
        assert_eq!(req, add_request());
        let fd = fd.expect("the netns fd");
        let received = File::from(fd).metadata().unwrap();
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert_eq!((received.dev(), received.ino()), (ours.dev(), ours.ino()));
        write_response(&server_end, &Response::new(Outcome::Enrolled, "")).await.unwrap();

        let resp = client.await.unwrap().unwrap();
        assert_eq!(resp, Response::new(Outcome::Enrolled, ""));
    }

    #[tokio::test]
    async fn request_over_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            serve_connection(stream, DEFAULT_MAX_REQUEST_LEN, Duration::from_secs(30), |req, fd| async move {
                assert!(fd.is_some());
                Response::new(Outcome::Enrolled, format!("{}/{}", req.pod_namespace, req.pod_name))
            })
            .await
        });
        let resp = tokio::task::spawn_blocking(move || {
            let netns = File::open("/proc/self/ns/net").unwrap();
            request(&path, &add_request(), Some(netns.as_fd()), Duration::from_secs(30))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(resp, Response::new(Outcome::Enrolled, "shop/cart"));
        server.await.unwrap().unwrap();
    }

    #[test]
    fn a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(&dir.path().join("absent.sock"), &add_request(), None, Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(&err, ProtocolError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err}"
        );
        assert!(err.is_unreachable());
    }

    /// A tunnel that accepts and never answers: the client gives up at its
    /// deadline. The server end stays open throughout, so only the deadline
    /// can end the wait.
    #[test]
    fn a_silent_tunnel_times_out() {
        let (client_end, _server_end) = UnixStream::pair().unwrap();
        let err = exchange(&client_end, &add_request(), None, &Deadline::after(Duration::from_millis(200)))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Timeout(_)), "{err}");
        assert!(err.is_unreachable());
    }

    #[test]
    fn a_tunnel_that_hangs_up_is_closed() {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        drop(server_end);
        let err = exchange(&client_end, &add_request(), None, &Deadline::after(Duration::from_secs(30)))
            .unwrap_err();
        assert!(err.is_unreachable(), "{err}");
    }
}
